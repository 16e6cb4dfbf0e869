"""Collators: right padding, and padding-free packing that gives the padded batch's loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polmctl.data import encode_dataset, load_rows, pack_collate, pad_collate

pytestmark = pytest.mark.unit
EXAMPLES = [
    {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
    {"input_ids": [4], "labels": [4]},
    {"input_ids": [5, 6], "labels": [5, 6]},
]


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Plain shifted cross-entropy, summed over the labelled tokens, and their count."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((shift_labels != -100).sum())


def test_pad_collate_pads_right_with_ignored_labels():
    batch = pad_collate(EXAMPLES, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100], [5, 6, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pack_collate_concatenates_with_restarting_positions():
    batch = pack_collate(EXAMPLES)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: positions mark the rows
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    # Each row's first token is never a target, so nothing is predicted across a boundary.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100, 6]]


@pytest.mark.parametrize("collate", [pack_collate, lambda e: pad_collate(e, 0)])
def test_collators_refuse_empty_or_misaligned_examples(collate):
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    with pytest.raises(ValueError, match="example 0: input_ids and labels .* got 2 and 1"):
        collate([{"input_ids": [1, 2], "labels": [1]}])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_has_the_padded_batch_loss(tiny_tokenizer, tiny_model, attn):
    tiny_model.set_attn_implementation(attn)
    rows = load_rows("builtin:arithmetic", options={"n": 4}) + load_rows("builtin:domain_text", options={"n": 2})
    examples = (
        encode_dataset(rows[:4], tiny_tokenizer, source="a")[0]
        + encode_dataset(rows[4:], tiny_tokenizer, source="d", completion_only_loss=False)[0]
    )
    padded = pad_collate(examples, tiny_tokenizer.pad_token_id)
    packed = pack_collate(examples)
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    with torch.no_grad():
        ref = summed_loss(
            tiny_model(**{k: v for k, v in padded.items() if k != "labels"}, use_cache=False).logits, padded["labels"]
        )
        got = summed_loss(
            tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits,
            packed["labels"],
        )
        # The same packed row with positions that do not restart: rows attend to earlier rows.
        running = torch.arange(packed["input_ids"].shape[1]).unsqueeze(0)
        leaky = summed_loss(
            tiny_model(input_ids=packed["input_ids"], position_ids=running, use_cache=False).logits, packed["labels"]
        )
        # With a KV cache (the model's default) transformers skips packed-sequence detection:
        # callers of packed batches must pass use_cache=False.
        cached = summed_loss(
            tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits, packed["labels"]
        )
    assert got[1] == ref[1]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)  # fp32 sums of ~1e3 tokens
    torch.testing.assert_close(got[0] / got[1], ref[0] / ref[1], rtol=0, atol=1e-4)  # mean token loss
    assert abs(leaky[0] - ref[0]) > 1e-2 and abs(cached[0] - ref[0]) > 1e-2
