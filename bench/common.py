"""Shared pieces of the benchmarks: generated conversations with a realistic long-tailed length mix (and preference
pairs made of them), each measured method run in a child process of its own, which reports its figures in one
RESULT line, and a free port for the launches."""

from __future__ import annotations

import json
import math
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

WORDS = (
    "the cat river model garden question answer story bridge language weather city teacher student "
    "explains remembers builds writes visits reads every morning small old new many books today 问题 天气 "
    "中文 这本书 学习 喜欢 长城 新闻 1 2 3 42 100 , . ! ?"
).split()


def lognormal_length(
    rng: random.Random, low: int = 20, high: int = 2000, median: float = 180, sigma: float = 1.0
) -> int:
    """A conversation length in (roughly) tokens: lognormal around `median`, clipped to [low, high]."""
    return max(low, min(high, int(rng.lognormvariate(math.log(median), sigma))))


def iter_conversations(count: int, seed: int = 0, high: int = 2000) -> Iterator[list[dict[str, str]]]:
    """Multi-turn chats (1-4 user/assistant turns, some with a system message) whose rendered length in tokens
    of the tiny tokenizer roughly follows `lognormal_length` (a word here is about 1.6 of its tokens; the chat
    template adds about 10 tokens, plus 5 per message), one at a time: millions can be written to a file."""
    rng = random.Random(seed)
    for _ in range(count):
        turns = rng.randint(1, 4)
        words = int((lognormal_length(rng, high=high) - 10 - 10 * turns) / 1.6)
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a careful assistant."})
        for _ in range(turns):
            share = max(2, words // turns)
            user = max(1, share // 3)
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=user))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=max(1, share - user)))})
        yield messages


def generate_conversations(count: int, seed: int = 0, high: int = 2000) -> list[list[dict[str, str]]]:
    """`iter_conversations` as a list."""
    return list(iter_conversations(count, seed, high))


RESULT = "RESULT "


def print_result(result: dict) -> None:
    """A child's figures, as the line `child_result` reads."""
    print(RESULT + json.dumps(result), flush=True)


def child_result(method: str, command: list[str], cwd: Path) -> dict | None:
    """Runs one method's child process and returns its figures (its last RESULT line); None after printing the end of
    its error output when it failed."""
    completed = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT)]
    if completed.returncode or not lines:
        print(f"{method}: failed\n{completed.stderr[-3000:]}")
        return None
    print(f"  {method} done", flush=True)
    return json.loads(lines[-1][len(RESULT) :])


def write_pairs(path: Path, count: int, seed: int = 0, high: int = 900) -> Path:
    """Preference pairs in trl's conversational explicit-prompt form: generated conversations (`iter_conversations`)
    whose last answer is the chosen one, and a shorter answer of random words the rejected one."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for messages in iter_conversations(count, seed=seed, high=high):
            prompt, chosen = messages[:-1], messages[-1]
            rejected = {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 40)))}
            out.write(json.dumps({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
