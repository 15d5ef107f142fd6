"""Packing of preference pairs: whole pairs per row, log-probs and the preference loss per pair equal to unpacked
batches (rows and flat layouts), precomputed reference log-probs carried with their pairs."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import sft.packing
from sft.data import IGNORE_INDEX
from sft.data.pairs import PairCollator, tokenize_pair
from sft.loss import fused_loss_for
from sft.packing_pairs import pack_pairs, pair_packing_collator
from sft.preference_loss import preference_loss
from sft.sequence_logps import sequence_logps

MAX_LENGTH = 64


def random_pairs(count: int, vocabulary: int, seed: int = 0) -> list[dict]:
    """Pairs of a shared prompt (labels -100) and two answers, of varied lengths; pair 2 longer than a row."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocabulary, (n,), generator=generator).tolist()

    pairs = []
    for k in range(count):
        prompt = ids(3 + 5 * k % 17)
        chosen, rejected = ids(2 + 7 * k % 11), ids(1 + 3 * k % 5)
        if k == 2:
            prompt, chosen = ids(30), ids(20)  # 50 + 31 + ... tokens: more than MAX_LENGTH for the pair
        pairs.append(
            {
                "chosen_input_ids": prompt + chosen,
                "chosen_labels": [IGNORE_INDEX] * len(prompt) + chosen,
                "rejected_input_ids": prompt + rejected,
                "rejected_labels": [IGNORE_INDEX] * len(prompt) + rejected,
            }
        )
    return pairs


def chat_pairs(tokenizer, count: int = 5) -> list[dict]:
    pairs = []
    for k in range(count):
        pair = {
            "prompt": [{"role": "user", "content": f"Tell me about number {k}" + " please" * k}],
            "chosen": {"role": "assistant", "content": f"It is {k}, a fine number" + "!" * (3 * k)},
            "rejected": {"role": "assistant", "content": "No." * (k + 1)},
        }
        t = tokenize_pair(tokenizer, pair, 256)
        pairs.append({"chosen_input_ids": t.chosen_ids, "chosen_labels": t.chosen_labels,
                      "rejected_input_ids": t.rejected_ids, "rejected_labels": t.rejected_labels})  # fmt: skip
    return pairs


def packed_logps(model, pairs: list[dict], max_length: int, fused=None, rows_per_batch: int = 2):
    """Per-pair (chosen, rejected) log-probs and counts over all packed batches, in the pairs' original order (found
    by their tokens: the packed rows know no pair index)."""
    packed = pack_pairs(datasets.Dataset.from_list(pairs), max_length)
    collator = pair_packing_collator(model, pad_token_id=0, device_type="cpu")
    found = {}
    for start in range(0, len(packed), rows_per_batch):
        rows = [packed[k] for k in range(start, min(start + rows_per_batch, len(packed)))]
        batch = collator(rows)
        logps, counts = sequence_logps(model, batch, fused)
        pairs_here = logps.shape[0] // 2
        k = 0
        for row in rows:
            offset = 0
            for chosen_length, rejected_length in zip(row["sides"][0::2], row["sides"][1::2]):
                chosen = tuple(row["input_ids"][offset : offset + chosen_length])
                offset += chosen_length + rejected_length
                found[chosen] = (logps[k], logps[pairs_here + k], counts[k], counts[pairs_here + k])
                k += 1
    ordered = [found[tuple(pair["chosen_input_ids"])] for pair in pairs]
    return [torch.stack(column) for column in zip(*ordered)], collator.layout


def check_same_as_unpacked(model, pairs: list[dict], max_length: int, fused=None) -> str:
    (chosen, rejected, chosen_counts, rejected_counts), layout = packed_logps(model, pairs, max_length, fused)
    unpacked, counts = sequence_logps(model, PairCollator(0)(pairs), fused)
    half = len(pairs)
    torch.testing.assert_close(chosen, unpacked[:half], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rejected, unpacked[half:], rtol=1e-5, atol=1e-4)
    assert chosen_counts.tolist() == counts[:half].tolist() and rejected_counts.tolist() == counts[half:].tolist()
    # The loss against a reference that differs per pair, from the same per-pair log-probs.
    reference = -torch.arange(2 * half, dtype=torch.float32)
    losses = [
        preference_loss("sigmoid", c, r, cc, rc, reference[:half], reference[half:]).loss
        for c, r, cc, rc in ((chosen, rejected, chosen_counts, rejected_counts),
                             (unpacked[:half], unpacked[half:], counts[:half], counts[half:]))
    ]  # fmt: skip
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    return layout


@torch.no_grad()
def test_packed_pairs_score_as_unpacked_through_the_fused_layer(tiny_model, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    fused = fused_loss_for(model)
    assert fused is not None
    pairs = chat_pairs(tokenizer)
    longest = max(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
    assert check_same_as_unpacked(model, pairs, longest, fused) == "rows"


@torch.no_grad()
def test_packed_pairs_score_as_unpacked_on_a_hybrid_in_one_flat_row():
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_5_text", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2,
        layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert check_same_as_unpacked(model, random_pairs(6, 96), MAX_LENGTH) == "flat"


@pytest.mark.parametrize("window_tokens", [None, 100])
def test_a_pair_is_never_split_and_each_sequence_starts_afresh(monkeypatch, window_tokens):
    if window_tokens:  # several windows of consecutive pairs, each packed on its own
        monkeypatch.setattr(sft.packing, "PACK_WINDOW_TOKENS", window_tokens)
        monkeypatch.setattr(sft.packing, "PACK_WINDOW_ROWS", 1)
    pairs = random_pairs(12, 1000)
    packed = pack_pairs(datasets.Dataset.from_list(pairs), MAX_LENGTH)
    seen = []
    for row in packed:
        sides = row["sides"]
        assert len(sides) % 2 == 0 and sum(sides) == len(row["input_ids"]) == row["length"]
        offset = 0
        for length in sides:
            assert row["position_ids"][offset : offset + length] == list(range(length))
            assert row["labels"][offset] == IGNORE_INDEX
            offset += length
        offset = 0
        for chosen_length, rejected_length in zip(sides[0::2], sides[1::2]):
            chosen = row["input_ids"][offset : offset + chosen_length]
            rejected = row["input_ids"][offset + chosen_length : offset + chosen_length + rejected_length]
            seen.append((chosen, rejected))
            offset += chosen_length + rejected_length
        if row["length"] > MAX_LENGTH:
            assert len(sides) == 2  # a pair longer than a row is alone in its own
    expected = [(p["chosen_input_ids"], p["rejected_input_ids"]) for p in pairs]
    assert sorted(seen) == sorted(expected)
    assert len(packed) < len(pairs)


def test_pair_numbers_travel_with_their_pairs(tiny_model):
    # A precomputed reference finds each packed pair's log-probs by its number.
    pairs = random_pairs(12, 1000)
    for k, pair in enumerate(pairs):
        pair["pair_id"] = 100 + k
    packed = pack_pairs(datasets.Dataset.from_list(pairs), MAX_LENGTH)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = pair_packing_collator(model, pad_token_id=0, device_type="cpu")([packed[k] for k in range(3)])
    index = {tuple(p["chosen_input_ids"]): k for k, p in enumerate(pairs)}
    owners = batch["sequence_index"]
    count = batch["pair_ids"].shape[0]
    assert 2 * count == int(owners.max()) + 1
    for slot in range(count):
        row, columns = (owners == slot).nonzero(as_tuple=True)
        k = index[tuple(batch["input_ids"][row[0], columns].tolist())]
        assert batch["pair_ids"][slot].item() == 100 + k
        assert row.unique().tolist() == (owners == count + slot).nonzero(as_tuple=True)[0].unique().tolist()


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_padding_belongs_to_no_sequence(tiny_model, layout):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    packed = pack_pairs(datasets.Dataset.from_list(random_pairs(6, 1000)), MAX_LENGTH)
    collator = pair_packing_collator(model, pad_token_id=0, pad_to_multiple_of=16, device_type="cpu")
    collator.packed.layout = collator.layout = layout
    batch = collator([packed[k] for k in range(2)])
    owners, labels = batch["sequence_index"], batch["labels"]
    assert owners.shape == labels.shape and labels.shape[-1] % 16 == 0
    assert labels[owners == -1].eq(IGNORE_INDEX).all()
    pairs = sum(len(packed[k]["sides"]) // 2 for k in range(2))
    assert sorted(set(owners.unique().tolist()) - {-1}) == list(range(2 * pairs))
