"""The official Qwen-1 finetune.py `preprocess`, the baseline of bench_preprocess.py.

Copied from QwenLM/Qwen finetune.py (Apache-2.0) with only what a non-tiktoken tokenizer needs changed: the
ids of <|im_start|> / <|im_end|> are looked up instead of read from `tokenizer.im_start_id`, and messages use
this project's {"role", "content"} form. It tokenises each turn with its own tokenizer calls, pads every sample
to `max_len` and truncates, as the official recipe does.
"""

from __future__ import annotations

import torch

IGNORE_TOKEN_ID = -100


def preprocess(sources, tokenizer, max_len: int, system_message: str = "You are a helpful assistant.") -> dict:
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}

    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    nl_tokens = tokenizer("\n").input_ids
    _system = tokenizer("system").input_ids + nl_tokens

    # Apply prompt templates
    input_ids, targets = [], []
    for source in sources:
        if source[0]["role"] == "system":
            system_message, source = source[0]["content"], source[1:]
        if roles[source[0]["role"]] != roles["user"]:
            source = source[1:]

        input_id, target = [], []
        system = [im_start] + _system + tokenizer(system_message).input_ids + [im_end] + nl_tokens
        input_id += system
        target += [im_start] + [IGNORE_TOKEN_ID] * (len(system) - 3) + [im_end] + nl_tokens
        assert len(input_id) == len(target)
        for sentence in source:
            role = roles[sentence["role"]]
            _input_id = (
                tokenizer(role).input_ids + nl_tokens + tokenizer(sentence["content"]).input_ids + [im_end] + nl_tokens
            )
            input_id += _input_id
            if role == "<|im_start|>user":
                _target = [im_start] + [IGNORE_TOKEN_ID] * (len(_input_id) - 3) + [im_end] + nl_tokens
            elif role == "<|im_start|>assistant":
                _target = (
                    [im_start]
                    + [IGNORE_TOKEN_ID] * len(tokenizer(role).input_ids)
                    + _input_id[len(tokenizer(role).input_ids) + 1 : -2]
                    + [im_end]
                    + nl_tokens
                )
            else:
                raise NotImplementedError
            target += _target
        assert len(input_id) == len(target)
        input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
        target += [IGNORE_TOKEN_ID] * (max_len - len(target))
        input_ids.append(input_id[:max_len])
        targets.append(target[:max_len])
    input_ids = torch.tensor(input_ids, dtype=torch.int)
    targets = torch.tensor(targets, dtype=torch.int)

    return dict(
        input_ids=input_ids,
        labels=targets,
        attention_mask=input_ids.ne(tokenizer.pad_token_id),
    )
