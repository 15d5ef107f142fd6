"""bench/qwen1_preprocess.py, the benchmark's baseline, labels and pads as the Qwen-1 recipe describes."""

from __future__ import annotations

from bench.qwen1_preprocess import IGNORE_TOKEN_ID, preprocess


def test_turns_are_labelled_padded_and_cut_as_the_recipe_says(tokenizer):
    answer = "The cat reads many books."
    conversations = [
        [{"role": "user", "content": "What does the cat do?"}, {"role": "assistant", "content": answer}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    batch = preprocess(conversations, tokenizer, max_len=64)
    assert {name: tuple(tensor.shape) for name, tensor in batch.items()} == {
        "input_ids": (2, 64),
        "labels": (2, 64),
        "attention_mask": (2, 64),
    }
    start, end, newline = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) + tokenizer("\n").input_ids
    ids, labels, mask = (batch[name][0].tolist() for name in ("input_ids", "labels", "attention_mask"))
    length = sum(mask)
    assert tokenizer.decode(ids[:length]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat does the cat do?"
        f"<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    )
    assert ids[length:] == [tokenizer.pad_token_id] * (64 - length)
    assert labels[length:] == [IGNORE_TOKEN_ID] * (64 - length)
    trained = [label for label in labels if label != IGNORE_TOKEN_ID]
    # System and user turns: <|im_start|>, <|im_end|>, "\n" only; the answer: <|im_start|>, content, <|im_end|>, "\n".
    assert trained == [start, end, newline] * 2 + [start, *tokenizer(answer).input_ids, end, newline]
    assert "Be brief." in tokenizer.decode(batch["input_ids"][1])

    cut = preprocess(conversations, tokenizer, max_len=10)
    assert cut["input_ids"].shape == (2, 10) and cut["input_ids"][0].tolist() == ids[:10]
