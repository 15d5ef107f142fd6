"""Property-based tests of the data reader: any input parses into well-formed conversations or raises DataError.

Never another exception, never a hang. A few thousand cases per run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sft.data import DataError, load_conversations

FUZZ = settings(max_examples=1500, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
FUZZ_BYTES = settings(FUZZ, max_examples=1000)

KEYS = ["conversations", "messages", "instruction", "input", "output", "system", "from", "value", "role",
        "content", "id", "type", "instrution"]  # fmt: skip
ROLES = ["user", "assistant", "system", "human", "gpt", "bot", "USER", ""]

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n", "\ud800", "\x00", "你好", "<|im_end|>", "{{ raise }}", "a" * 5000]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12
)
turns = st.fixed_dictionaries(
    {},
    optional={"from": st.sampled_from(ROLES) | json_values, "value": texts | json_values,
              "role": st.sampled_from(ROLES) | json_values, "content": texts | json_values},
)  # fmt: skip
records = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(KEYS), texts | json_values, max_size=5),
    st.builds(
        lambda ts, extra: {"messages": ts, **extra},
        st.lists(turns, max_size=5),
        st.dictionaries(st.sampled_from(KEYS[2:]), texts, max_size=2),
    ),  # fmt: skip
    st.builds(lambda ts: {"conversations": ts}, st.lists(turns, max_size=5)),
)


def check(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "data.jsonl")
        path.write_bytes(content)
        try:
            conversations = load_conversations(path)
        except DataError as error:
            assert str(path) in str(error)
            return
    assert conversations
    for messages in conversations:
        assert any(message["role"] == "assistant" for message in messages)
        for index, message in enumerate(messages):
            assert set(message) == {"role", "content"}
            assert message["role"] in ("system", "user", "assistant")
            assert message["role"] != "system" or index == 0
            assert isinstance(message["content"], str) and message["content"].strip()
            message["content"].encode("utf-8")


@FUZZ
@given(st.lists(records, max_size=6), st.booleans(), st.booleans())
def test_records_as_json_list_or_jsonl(samples, as_jsonl, ascii_only):
    if as_jsonl:
        content = "".join(json.dumps(sample, ensure_ascii=ascii_only) + "\n" for sample in samples)
    else:
        content = json.dumps(samples, ensure_ascii=ascii_only, indent=1)
    check(content.encode("utf-8", errors="surrogatepass"))


@FUZZ_BYTES
@given(st.binary(max_size=300))
@example(b"[" * 100_000)
@example(b'{"messages": 1' + b"0" * 5000 + b"}")
@example(b"\xef\xbb\xbf" + b'{"instruction": "q", "output": "a"}')
@example(b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\xff"}]}')
def test_arbitrary_bytes(content):
    check(content)


@FUZZ_BYTES
@given(st.lists(records, min_size=1, max_size=4), st.integers(min_value=0), st.binary(min_size=1, max_size=8))
def test_valid_files_with_corrupted_bytes(samples, position, garbage):
    content = "".join(json.dumps(sample) + "\n" for sample in samples).encode()
    position %= len(content)
    check(content[:position] + garbage + content[position:])
