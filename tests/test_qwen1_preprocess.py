"""bench/qwen1_preprocess.py, the benchmark's baseline, labels and pads as the Qwen-1 recipe describes.

The benchmark's code runs in a process of its own (tests do not import bench): it prints the batches as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANSWER = "The cat reads many books."
CONVERSATIONS = [
    [{"role": "user", "content": "What does the cat do?"}, {"role": "assistant", "content": ANSWER}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
]
# Prints {max_len: {"input_ids": [...], "labels": [...], "attention_mask": [...], "ignore": IGNORE_TOKEN_ID}}.
PREPROCESS = """
import json, sys
from bench.qwen1_preprocess import IGNORE_TOKEN_ID, preprocess
from sft.modeling import load_tokenizer
model, conversations = sys.argv[1], json.loads(sys.argv[2])
tokenizer = load_tokenizer(model)
batches = {}
for max_len in (64, 10):
    batch = preprocess(conversations, tokenizer, max_len=max_len)
    batches[max_len] = {name: tensor.tolist() for name, tensor in batch.items()} | {"ignore": IGNORE_TOKEN_ID}
print(json.dumps(batches))
"""


def test_turns_are_labelled_padded_and_cut_as_the_recipe_says(tiny_model, tokenizer):
    done = subprocess.run(
        [sys.executable, "-c", PREPROCESS, tiny_model, json.dumps(CONVERSATIONS)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    batches = json.loads(done.stdout.splitlines()[-1])
    batch, ignore = batches["64"], batches["64"]["ignore"]
    assert ignore == -100
    assert {name: (len(rows), len(rows[0])) for name, rows in batch.items() if name != "ignore"} == {
        "input_ids": (2, 64),
        "labels": (2, 64),
        "attention_mask": (2, 64),
    }
    answer = ANSWER
    start, end, newline = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) + tokenizer("\n").input_ids
    ids, labels, mask = (batch[name][0] for name in ("input_ids", "labels", "attention_mask"))
    length = sum(mask)
    assert tokenizer.decode(ids[:length]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat does the cat do?"
        f"<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    )
    assert ids[length:] == [tokenizer.pad_token_id] * (64 - length)
    assert labels[length:] == [ignore] * (64 - length)
    trained = [label for label in labels if label != ignore]
    # System and user turns: <|im_start|>, <|im_end|>, "\n" only; the answer: <|im_start|>, content, <|im_end|>, "\n".
    assert trained == [start, end, newline] * 2 + [start, *tokenizer(answer).input_ids, end, newline]
    assert "Be brief." in tokenizer.decode(batch["input_ids"][1])

    cut = batches["10"]["input_ids"]
    assert (len(cut), len(cut[0])) == (2, 10) and cut[0] == ids[:10]
