"""Whether a chat template given with --chat_template fits the tokenizer: the variables it reads, and its markers.

A template from another model family (Llama-3.1's on a ChatML tokenizer) may read a variable the tokenizer does not
define (`bos_token`), which jinja refuses, or write markers (`<|start_header_id|>`, `<|eot_id|>`) that the
tokenizer has no token for: each would be learned as several ordinary tokens, and generation would never stop on
one. Both are refused before anything is loaded, naming what the tokenizer lacks; with --train_special_tokens the
missing markers are added to the tokenizer as special tokens instead (the model's embeddings are then resized to
them and their rows trained).

Markers are found by rendering probe conversations whose words hold no brackets: what in the text looks like a
marker (`<|...|>`, `<word>`, `</word>`, `[INST]`) was written by the template.
"""

from __future__ import annotations

import logging
import re

from transformers import PreTrainedTokenizerBase

from sft.data.templates import render
from sft.errors import ConfigurationError

logger = logging.getLogger(__name__)

MARKER = re.compile(r"<\|[^<>|\s]{1,48}\|>|</?[A-Za-z_][\w.:-]{0,48}>|\[/?[A-Z][A-Z_]{1,24}\]")
# Conversations rendered to find what a chat template writes (its markers, its special tokens): with a system
# message (where the template takes one), two turns, and the generation prompt.
TEMPLATE_PROBES = (
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
        {"role": "assistant", "content": "Goodbye."},
    ],
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}],
)


def _undefined_name(error: Exception) -> str:
    """The variable named by jinja's "'bos_token' is undefined" (or the whole message)."""
    match = re.search(r"'([^']+)' is undefined", str(error))
    return match.group(1) if match else str(error)


def _undefined(where: str, name: str) -> ConfigurationError:
    lacks = f"has no {name}" if name.endswith("_token") else f"does not define {name!r}"
    return ConfigurationError(
        f"{where}: the chat template reads {name}, and this tokenizer {lacks}: the template is of another model "
        "family; use the model's own template or one written for its tokenizer"
    )


def template_markers(tokenizer: PreTrainedTokenizerBase, where: str) -> list[str]:
    """The marker-shaped pieces the tokenizer's chat template writes around the probe conversations, in order of
    first appearance. ConfigurationError when the template reads a variable the tokenizer does not define."""
    import jinja2
    from jinja2 import meta
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = tokenizer.chat_template
    environment = _compile_jinja_template(template).environment  # the one apply_chat_template renders with
    for name in sorted(meta.find_undeclared_variables(environment.parse(template))):
        # A special token the tokenizer lacks is left out of the render (as an empty string, or an error).
        if name.endswith("_token") and hasattr(tokenizer, name) and getattr(tokenizer, name) is None:
            raise _undefined(where, name)
    markers: dict[str, None] = {}
    rendered = 0
    for probe in TEMPLATE_PROBES:
        for generation in (False, True):
            try:
                text = render(tokenizer, list(probe[:-1] if generation else probe), add_generation_prompt=generation)
            except jinja2.UndefinedError as error:
                raise _undefined(where, _undefined_name(error)) from None
            except Exception:  # what a template refuses on purpose (a system message, ...) is checked per sample
                continue
            rendered += 1
            markers.update(dict.fromkeys(MARKER.findall(text)))
    return list(markers) if rendered else []


def fit_chat_template(tokenizer: PreTrainedTokenizerBase, where: str, add_markers: bool = False) -> list[str]:
    """Checks that every marker of the tokenizer's (given) chat template is one token of the tokenizer; with
    `add_markers`, the ones that are not are added as special tokens, and returned (the model's embeddings must
    then be resized to `len(tokenizer)`). ConfigurationError otherwise, naming them."""
    split = [marker for marker in template_markers(tokenizer, where) if not _single_token(tokenizer, marker)]
    if not split:
        return []
    if not add_markers:
        shown = ", ".join(f"{marker} ({_token_count(tokenizer, marker)} tokens)" for marker in split)
        raise ConfigurationError(
            f"{where}: the chat template's markers {shown} are not single tokens of this tokenizer: they would be "
            "learned as ordinary text and generation would not stop on them. Use a template written for this "
            "tokenizer, or pass --train_special_tokens to add them as special tokens and train their embeddings"
        )
    tokenizer.add_tokens(split, special_tokens=True)
    logger.info("--train_special_tokens: added the chat template's markers %s as special tokens", ", ".join(split))
    return split


def grow_embeddings(model, tokenizer: PreTrainedTokenizerBase) -> None:
    """The model's embeddings (and output layer) grown to the tokens added to its tokenizer (the markers of
    `fit_chat_template`), before an adapter trained with them is loaded onto it, or before training."""
    # The module's own row count: under ZeRO-3 its weight is partitioned at load, and its local shape is empty.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        logger.info("Embeddings resized to %d tokens for the added markers", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))


def _token_count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_token(tokenizer: PreTrainedTokenizerBase, marker: str) -> bool:
    return _token_count(tokenizer, marker) == 1
