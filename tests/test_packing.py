"""Packing: every sample once, positions restarting per sample, the same loss as unpacked, refusal where it leaks."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import sft.packing
from sft.data import IGNORE_INDEX, load_conversations, make_collator, tokenize_conversations
from sft.packing import (
    LeakProbe,
    PackedCollator,
    PackingError,
    best_fit_decreasing,
    check_no_leak,
    pack_dataset,
    packing_layout,
    prepare_packing,
)

EXAMPLES = "data/example_chatml.jsonl"


def causal_attention_ignoring_mask(module, query, key, value, attention_mask, **kwargs):
    """Plain causal attention over the whole row, as many models' own code does: it ignores sample boundaries."""
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


AttentionInterface.register("leaky_causal", causal_attention_ignoring_mask)
ALL_MASK_ATTENTION_FUNCTIONS.register("leaky_causal", sdpa_mask)


@pytest.fixture(scope="module")
def samples(tokenizer, tmp_path_factory):
    conversations = load_conversations(EXAMPLES)
    rng = random.Random(0)
    words = ["cat", "river", "book", "garden", "问题", "天气", "42", "!"]
    for _ in range(24):  # varied lengths, so that bins hold several samples
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 30)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 40)))})
        conversations.append(turns)
    dataset, _ = tokenize_conversations(
        conversations, tokenizer, max_length=256, cache_dir=tmp_path_factory.mktemp("cache")
    )
    return dataset


def split_rows(packed) -> list[tuple[tuple[int, ...], tuple[int, ...], list[int]]]:
    """The samples in packed rows: (input_ids, labels, position_ids) of each, cut where positions restart."""
    found = []
    for row in packed:
        starts = [i for i, position in enumerate(row["position_ids"]) if position == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:]):
            found.append(
                (tuple(row["input_ids"][start:end]), tuple(row["labels"][start:end]), row["position_ids"][start:end])
            )
    return found


def test_packing_keeps_every_sample_once_with_its_labels(samples):
    packed = pack_dataset(samples, max_length=256)
    assert len(packed) < len(samples)
    assert all(len(row["input_ids"]) <= 256 for row in packed)
    found = split_rows(packed)
    # The first label of each sample is never a target (the model shifts labels by one); the rest are unchanged.
    expected = Counter((tuple(s["input_ids"]), (IGNORE_INDEX, *s["labels"][1:])) for s in samples)
    assert Counter((ids, labels) for ids, labels, _ in found) == expected
    assert sum(packed["length"]) == sum(samples["length"])


def test_packed_rows_follow_the_bins_and_are_cached_next_to_the_tokenised_data(samples):
    packed = pack_dataset(samples, max_length=256)
    lengths = samples["length"]
    bins = best_fit_decreasing(lengths, 256)
    assert packed["length"] == [sum(lengths[index] for index in members) for members in bins]
    assert packed[0]["input_ids"] == [token for index in bins[0] for token in samples[index]["input_ids"]]
    files = [file["filename"] for file in packed.cache_files]
    assert [Path(file).parent for file in files] == [Path(samples.cache_files[0]["filename"]).parent]
    assert [file["filename"] for file in pack_dataset(samples, max_length=256).cache_files] == files


def test_windows_pack_consecutive_samples_and_keep_every_sample_once(samples, monkeypatch):
    monkeypatch.setattr(sft.packing, "PACK_WINDOW_TOKENS", 600)
    monkeypatch.setattr(sft.packing, "PACK_WINDOW_ROWS", 1)
    packed = pack_dataset(samples, max_length=256)
    expected = Counter((tuple(s["input_ids"]), (IGNORE_INDEX, *s["labels"][1:])) for s in samples)
    assert Counter((ids, labels) for ids, labels, _ in split_rows(packed)) == expected
    # Each row holds samples of one window: a window closes with the sample that takes the running token count to
    # the next multiple of 600 or past it.
    index_of = {tuple(s["input_ids"]): k for k, s in enumerate(samples)}
    ends = np.cumsum(samples["length"])
    window_of = {k: int(ends[k - 1] // 600) if k else 0 for k in range(len(samples))}
    for row in packed:
        windows = {window_of[index_of[tuple(ids)]] for ids, _, _ in split_rows([row])}
        assert len(windows) == 1
    assert len(set(window_of.values())) > 2  # several windows


def test_position_ids_restart_at_every_sample(samples):
    packed = pack_dataset(samples, max_length=256)
    pieces = split_rows(packed)
    assert len(pieces) == len(samples)
    assert all(positions == list(range(len(ids))) for ids, _, positions in pieces)
    batch = PackedCollator(pad_token_id=0)([packed[0], packed[1]])
    assert "attention_mask" not in batch  # a mask would switch off transformers' packed-sample detection
    shorter = min(len(packed[0]["input_ids"]), len(packed[1]["input_ids"]))
    if shorter < batch["input_ids"].shape[1]:  # the padding is a block of its own, untrained
        row = 0 if len(packed[0]["input_ids"]) == shorter else 1
        assert batch["position_ids"][row, shorter].item() == 0
        assert (batch["labels"][row, shorter:] == IGNORE_INDEX).all()


def test_best_fit_decreasing_beats_greedy_concatenation():
    lengths = [6, 3, 5, 2, 4]
    bins = best_fit_decreasing(lengths, capacity=10)
    # 6 opens a bin, 5 another, 4 fills the first exactly (best fit), 3 and 2 fill the second.
    assert bins == [[0, 4], [2, 1, 3]]
    greedy = 1 + sum(1 for total in _running_totals(lengths, 10) if total)  # next-fit in data order: 3 bins
    assert len(bins) < greedy == 3

    rng = random.Random(1)
    for _ in range(20):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 60))]
        bins = best_fit_decreasing(lengths, capacity=128)
        assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in members) <= 128 for members in bins)
        assert len(bins) <= 1 + sum(1 for total in _running_totals(lengths, 128) if total)
        assert len(bins) >= -(-sum(lengths) // 128)
    with pytest.raises(ValueError, match="sample 1 has 11 tokens"):
        best_fit_decreasing([3, 11], capacity=10)


def _running_totals(lengths: list[int], capacity: int) -> list[int]:
    """For next-fit packing: 1 where a sample has to open a new bin, 0 where it joins the current one."""
    opens, total = [], 0
    for length in lengths:
        opens.append(1 if total + length > capacity else 0)
        total = length if opens[-1] else total + length
    return opens


def summed_token_loss(model, batch) -> tuple[float, int]:
    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits.float()
    targets = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss.item(), int((targets != IGNORE_INDEX).sum())


@pytest.mark.parametrize(("implementation", "layout"), [("sdpa", "rows"), ("eager", "rows"), ("sdpa", "flat")])
@torch.no_grad()
def test_packed_loss_equals_unpacked_loss(tiny_model, tokenizer, samples, implementation, layout):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=implementation).eval()
    features = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples]
    unpacked_sum, unpacked_count = summed_token_loss(model, make_collator(tokenizer)(features))
    packed = pack_dataset(samples, max_length=256)
    collate = PackedCollator(tokenizer.pad_token_id, layout)
    packed_sum, packed_count = 0.0, 0
    for start in range(0, len(packed), 4):
        loss, count = summed_token_loss(model, collate([packed[i] for i in range(start, min(start + 4, len(packed)))]))
        packed_sum, packed_count = packed_sum + loss, packed_count + count
    assert packed_count == unpacked_count
    assert packed_sum / packed_count == pytest.approx(unpacked_sum / unpacked_count, rel=1e-5)


@pytest.mark.parametrize("layout", ["rows", "flat"])
@torch.no_grad()
def test_bucketed_packed_rows_keep_the_loss_and_meet_few_shapes(tiny_model, tokenizer, samples, layout):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    packed = pack_dataset(samples, max_length=256)
    plain = PackedCollator(tokenizer.pad_token_id, layout)
    bucketed = PackedCollator(tokenizer.pad_token_id, layout, pad_to_multiple_of=64, max_length=256)
    sums, shapes = {"plain": [0.0, 0], "bucketed": [0.0, 0]}, {"plain": set(), "bucketed": set()}
    start, size = 0, 1
    while start < len(packed):  # batches of 1, 2 and 3 rows
        rows = [packed[i] for i in range(start, min(start + size, len(packed)))]
        for name, collate in (("plain", plain), ("bucketed", bucketed)):
            batch = collate(rows)
            shapes[name].add(batch["input_ids"].shape[1])
            if layout == "flat":  # the pad block is a segment of its own in the varlen boundaries
                real = sum(len(row["input_ids"]) for row in rows)
                ends = batch["cu_seq_lens_q"].tolist()
                assert real in ends and ends[-1] == batch["input_ids"].shape[1]
                varlen_keys = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
                batch = {key: value for key, value in batch.items() if key not in varlen_keys}  # sdpa reads positions
            loss, count = summed_token_loss(model, batch)
            sums[name][0] += loss
            sums[name][1] += count
        start, size = start + size, size % 3 + 1
    assert sums["bucketed"][1] == sums["plain"][1]
    assert sums["bucketed"][0] == pytest.approx(sums["plain"][0], rel=1e-5)
    assert all(length % 64 == 0 for length in shapes["bucketed"])
    if layout == "rows":
        assert shapes["bucketed"] <= {64, 128, 192, 256} and len(shapes["bucketed"]) < len(shapes["plain"])


def test_packing_refused_where_attention_would_leak(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    check_no_leak(model, packing_layout(model))  # transformers' sdpa keeps packed samples apart
    leaky = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="leaky_causal")
    with pytest.raises(PackingError, match="not known to keep packed samples apart"):
        packing_layout(leaky)  # an implementation we know nothing about is refused outright...
    with pytest.raises(PackingError, match="lets packed samples attend to each other") as refusal:
        check_no_leak(leaky, "rows")  # ...and the probe catches one that ignores the boundaries
    # The way out named is one that reads the boundaries otherwise, never the implementation in use.
    assert str(refusal.value).endswith(
        "Use --attn_implementation flash_attention_2 (a GPU with flash-attn); or train without --packing"
    )
    leaky._supports_flash_attn = False  # a model class without flash attention: no attention would help
    with pytest.raises(PackingError) as refusal:
        check_no_leak(leaky, "rows")
    assert str(refusal.value).endswith("cross-sample attention). Train without --packing")
    with pytest.raises(PackingError, match="use_cache"):
        prepare_packing(model, 0, 256, None, use_cache=True)


def test_finetune_trains_packed_and_refuses_a_leaking_attention(tiny_model, tmp_path, run_finetune, common_args):
    def finetune_args(model: str, output, *extra: str) -> list[str]:
        # A repeated flag takes its last value: batch 2 here, so that a packed row holds several samples.
        return [*common_args(model, output, steps=6), "--per_device_train_batch_size", "2", "--packing", *extra]

    trainer = run_finetune(*finetune_args(tiny_model, tmp_path / "packed", "--pad_to_multiple_of", "64"))
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch
    assert batch["input_ids"].shape[1] % 64 == 0  # --pad_to_multiple_of reaches the collator
    assert (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]  # several samples per row
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]

    with pytest.raises(PackingError, match="--packing: attention implementation 'leaky_causal'"):
        run_finetune(*finetune_args(tiny_model, tmp_path / "leaky", "--attn_implementation", "leaky_causal"))


def test_the_leak_probe_runs_when_training_begins_in_the_training_precision(tiny_model, tmp_path, run_finetune,
                                                                            common_args):  # fmt: skip
    # bf16 autocast on the CPU stands for a GPU run in bf16: the probe runs where and as training does (a
    # flash-attention kernel refuses the fp32 of a model still on the CPU), not right after loading.
    trainer = run_finetune(*common_args(tiny_model, tmp_path / "out", steps=2), "--packing", "--bf16", "--use_cpu")
    probes = [callback for callback in trainer.callback_handler.callbacks if isinstance(callback, LeakProbe)]
    assert len(probes) == 1 and probes[0].ran_with == ("cpu", torch.bfloat16)
