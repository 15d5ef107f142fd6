"""Reading, checking, labelling and tokenising chat fine-tuning data: the data pipeline, one module per stage.

Every entry point (finetune.py, merge_lora.py, run_gptq.py, the demos) goes through this package, so a data file
means the same thing everywhere:

1. `files`, `reading`, `sources`, `folders`, `rows`, `arrow_files`, `splits`: a data file (by type, plain or
   compressed) read as a stream of records with their place ("line N", "sample N", "row N"); every source of
   `--data_path` (files, globs, folders, hub ids, a data config) read, checked, mixed, sampled and split: into a
   memory-mapped Arrow data set for training (`read_data`, one batch of samples in memory at a time), or into lists
   for the few samples of a check (`load_data`); `housekeeping`: the cache folder, listed and cleaned by
   `python -m sft.data.cache`;
2. `formats`: each record (Qwen `conversations`, ChatML `messages`, alpaca, prompt/completion, plain text, with
   tools) checked and turned into messages, a `DataError` naming file, place and field otherwise;
3. `templates`: a conversation rendered with the tokenizer's chat template, what the template refuses;
   `template_fit`: whether a --chat_template fits the tokenizer (the tokens it reads, its markers);
4. `profile`, `spans`, `labels`: the template profile (once per template) chooses how answers are found; each
   conversation's trained spans, checked for prompt leaks, with a stop token where the template writes none;
5. `tokenizing`: token ids and labels of labelled texts, truncated or dropped by length;
6. `cache`: whole data sets through `datasets.map` (batched, multi-process), from Arrow to Arrow, cached on disk
   (`tokenize_conversations`); packing (`sft.packing`) writes its rows from there the same way;
7. `collate`: padded batches;
8. `pairs`: preference pairs (dpo.py): read by stage 1 with their own parser, labelled by stage 4's rules.

Every public name is importable from `sft.data` itself.
"""

from sft.data.arrow_files import read_data
from sft.data.collate import CUDA_PAD_MULTIPLE, BucketedCollator, bucketed_length, make_collator, pad_multiple
from sft.data.formats import (
    ALPACA_KEYS,
    ROLE_NAMES,
    TEXT_ROLE,
    TOOLS_ROLE,
    Conversation,
    Message,
    TrainOn,
    load_conversations,
    load_tools,
    parse_record,
    record_format,
    with_default_system,
)
from sft.data.housekeeping import cache_folder
from sft.data.labels import IGNORE_INDEX, add_stops, label_many, label_spans, label_spans_many, repeated_prompt
from sft.data.profile import TemplateProfile, compute_profile, template_profile
from sft.data.reading import Conversations, DataError, read_records
from sft.data.rows import load_data, resample
from sft.data.sources import DataErrors, Source, parse_sources, source_names
from sft.data.spans import ANSWER_CLOSE, ANSWER_OPEN, spans_by_generation, spans_by_markers, spans_by_prefixes
from sft.data.splits import load_train_eval, split_validation
from sft.data.templates import (
    CHATML_TEMPLATE,
    TemplateRefusal,
    assistant_header,
    chat_template_of,
    end_of_turn,
    fold_system_message,
    missing_tool_text,
    render,
    render_for_training,
    render_many,
    split_tools,
    template_overhead,
    try_render_many,
    with_tools,
)
from sft.data.tokenizing import (
    Tokenized,
    labels_from_offsets,
    labels_of_encoding,
    tokenize_conversation,
    tokenize_many,
    tokenize_pieces,
    tokenize_samples,
    tokenize_text,
)

# The tokenising cache's names are imported on first use, so that `python -m sft.data.cache` (its command line)
# runs that module once, not after the package has imported it already.
_CACHE_NAMES = (
    "CACHE_FORMAT",
    "NothingToTrainError",
    "check_reasoning_rendered",
    "own_mapping",
    "tokenize_conversations",
)


# Preference pairs (sft.data.pairs) read through sft.data.cache, so they are loaded on first use too.
_PAIR_NAMES = ("PairCollator", "TokenizedPair", "pair_sample", "parse_pair", "tokenize_pair", "tokenize_pairs")


def __getattr__(name: str):
    if name in _CACHE_NAMES:
        from sft.data import cache

        return getattr(cache, name)
    if name in _PAIR_NAMES:
        from sft.data import pairs

        return getattr(pairs, name)
    raise AttributeError(f"module 'sft.data' has no attribute {name!r}")


__all__ = [
    "PairCollator",
    "TokenizedPair",
    "pair_sample",
    "parse_pair",
    "tokenize_pair",
    "tokenize_pairs",
    "check_reasoning_rendered",
    "with_default_system",
    "tokenize_text",
    "split_validation",
    "resample",
    "parse_sources",
    "source_names",
    "load_train_eval",
    "load_data",
    "cache_folder",
    "read_data",
    "ALPACA_KEYS",
    "ANSWER_CLOSE",
    "ANSWER_OPEN",
    "CACHE_FORMAT",
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "ROLE_NAMES",
    "TEXT_ROLE",
    "TOOLS_ROLE",
    "Conversation",
    "Conversations",
    "DataError",
    "DataErrors",
    "Message",
    "Source",
    "NothingToTrainError",
    "TemplateProfile",
    "TemplateRefusal",
    "Tokenized",
    "TrainOn",
    "add_stops",
    "assistant_header",
    "chat_template_of",
    "compute_profile",
    "end_of_turn",
    "fold_system_message",
    "label_many",
    "label_spans",
    "label_spans_many",
    "labels_from_offsets",
    "labels_of_encoding",
    "load_conversations",
    "load_tools",
    "make_collator",
    "pad_multiple",
    "bucketed_length",
    "BucketedCollator",
    "CUDA_PAD_MULTIPLE",
    "own_mapping",
    "missing_tool_text",
    "parse_record",
    "read_records",
    "record_format",
    "render",
    "render_for_training",
    "render_many",
    "repeated_prompt",
    "spans_by_generation",
    "spans_by_markers",
    "spans_by_prefixes",
    "split_tools",
    "template_overhead",
    "template_profile",
    "tokenize_conversation",
    "tokenize_conversations",
    "tokenize_many",
    "tokenize_pieces",
    "tokenize_samples",
    "try_render_many",
    "with_tools",
]
