"""The baseline of bench_preprocess.py: the Qwen-1 recipe's preprocessing, written here from its description.

What the recipe (QwenLM/Qwen, finetune.py) does, and so what this does, sample by sample:

- The text is ChatML, built turn by turn: a system turn first (the sample's own system message if it starts with
  one, else "You are a helpful assistant."), then the conversation, which must start with a user turn (a leading
  assistant message is dropped). A turn is "<|im_start|>" + role + "\\n" + content + "<|im_end|>" + "\\n".
- Each piece is tokenised on its own: the header "<|im_start|>" + role, the "\\n", the content; the ids of
  <|im_start|> and <|im_end|> are put in directly. No call sees the whole conversation.
- Labels: a system or user turn keeps only its first and last two labels (<|im_start|>, <|im_end|>, "\\n"), the
  rest are ignored. An assistant turn keeps <|im_start|>, ignores the role name and its newline, and trains on
  the content, <|im_end|> and "\\n".
- Every sample is padded with the pad id to `max_len` (labels ignored there) and cut at `max_len`; the result is
  three int32 tensors of shape (samples, max_len): input_ids, labels, and attention_mask (ids that are not the pad
  id).

The recipe reads the ids of <|im_start|>/<|im_end|> from its tiktoken tokenizer's attributes; here they are looked
up by token, so that any tokenizer with the ChatML tokens works. It also tokenises an assistant turn's header
three times (once for the ids, twice more for its length); that is kept, so the baseline costs what the recipe
costs. One slip of the recipe's code is not kept: after a sample with its own system message, it goes on using
that message for the samples without one; here those get the default, as the recipe means to.
"""

from __future__ import annotations

import torch

IGNORE_TOKEN_ID = -100
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."


def preprocess(
    sources: list[list[dict[str, str]]], tokenizer, max_len: int, system_message: str = DEFAULT_SYSTEM_MESSAGE
) -> dict[str, torch.Tensor]:
    """Padded ids, labels and attention mask of each conversation ({"role", "content"} messages)."""
    start_id, end_id = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    newline = tokenizer("\n").input_ids
    system_header = tokenizer("system").input_ids + newline  # once per call, as in the recipe

    all_ids, all_labels = [], []
    for messages in sources:
        system = system_message
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if messages and messages[0]["role"] != "user":
            messages = messages[1:]

        system_turn = [start_id, *system_header, *tokenizer(system).input_ids, end_id, *newline]
        ids = list(system_turn)
        labels = _keep_only_the_ends(system_turn, start_id)
        for message in messages:
            role = message["role"]
            if role not in ("user", "assistant"):
                raise ValueError(f"the Qwen-1 recipe takes user and assistant turns after the system one, not {role!r}")
            header = tokenizer(f"<|im_start|>{role}").input_ids
            turn = [*header, *newline, *tokenizer(message["content"]).input_ids, end_id, *newline]
            ids += turn
            if role == "user":
                labels += _keep_only_the_ends(turn, start_id)
            else:
                # The recipe measures the header again (twice) here rather than reusing `header`: kept for its cost.
                role_name_and_newline = len(tokenizer(f"<|im_start|>{role}").input_ids)
                content_starts = len(tokenizer(f"<|im_start|>{role}").input_ids) + 1
                content = turn[content_starts : -1 - len(newline)]
                labels += [start_id, *[IGNORE_TOKEN_ID] * role_name_and_newline, *content, end_id, *newline]

        padding = max_len - len(ids)
        all_ids.append((ids + [tokenizer.pad_token_id] * padding)[:max_len])
        all_labels.append((labels + [IGNORE_TOKEN_ID] * padding)[:max_len])

    input_ids = torch.tensor(all_ids, dtype=torch.int)
    return {
        "input_ids": input_ids,
        "labels": torch.tensor(all_labels, dtype=torch.int),
        "attention_mask": input_ids.ne(tokenizer.pad_token_id),
    }


def _keep_only_the_ends(turn: list[int], start_id: int) -> list[int]:
    """A system or user turn's labels: <|im_start|>, then ignored up to its last two ids (<|im_end|>, "\\n")."""
    return [start_id, *[IGNORE_TOKEN_ID] * (len(turn) - 3), *turn[-2:]]
