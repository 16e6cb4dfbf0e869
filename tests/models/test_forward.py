"""The SFT loss against its formula on hand-computed inputs, and the LM head run only where a
label is predicted (polmctl/models/forward.py: labelled_logits)."""

from __future__ import annotations

import pytest
import torch

from polmctl.losses.sft import shifted_token_nll as token_nll
from polmctl.methods.sft import SFTMethod, SFTObjective
from polmctl.models.forward import labelled_logits, logits_window

pytestmark = pytest.mark.unit


def test_logits_window_keeps_one_position_before_the_first_label():
    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, -100, 4, 5, -100]])
    keep, cut = logits_window(labels)
    assert keep == 4  # positions 1..4: position 1 predicts the label at 2
    assert cut.tolist() == [[-100, -100, 5, 6], [-100, 4, 5, -100]]


def test_windowed_logits_give_the_same_loss_as_full_logits(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100
    full = tiny_model(input_ids=ids).logits
    keep, cut = logits_window(labels)
    part = tiny_model(input_ids=ids, logits_to_keep=keep).logits
    assert part.shape[1] == keep < full.shape[1]
    torch.testing.assert_close(token_nll(part, cut)[0], token_nll(full, labels)[0], rtol=1e-5, atol=1e-5)


def ragged_batch(pad_id: int = 0) -> tuple[dict, torch.Tensor]:
    """Two right-padded rows whose labelled answers start and end at different positions."""
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (2, 12))
    mask = torch.ones_like(ids)
    ids[1, 9:], mask[1, 9:] = pad_id, 0
    labels = ids.clone()
    labels[0, :5], labels[1, :7], labels[1, 9:] = -100, -100, -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def test_labelled_logits_run_the_head_on_labelled_positions_only(tiny_model):
    inputs, labels = ragged_batch()  # labels: row 0 at 5..11 (7), row 1 at 7..8 (2)
    seen = []
    spy = tiny_model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    head = labelled_logits(tiny_model, inputs, labels)
    spy.remove()
    assert seen == [torch.Size([9, tiny_model.config.hidden_size])]
    full = tiny_model(**inputs).logits  # position t predicts the label at t + 1
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    torch.testing.assert_close(head.logits, full[rows, cols], rtol=1e-5, atol=1e-5)
    assert head.targets.tolist() == labels[rows, cols + 1].tolist()
    # on_window lays [n] values out like logits_window's window: from one before the first label on
    keep, window = logits_window(labels)
    placed = head.on_window(torch.arange(1.0, 10.0))
    assert placed.shape == (2, keep - 1) and torch.equal(placed != 0, window[:, 1:] != -100)


def test_the_sft_loss_on_labelled_logits_equals_token_nll_on_full_logits(tiny_model):
    inputs, labels = ragged_batch()
    loss = SFTObjective(SFTMethod())(tiny_model, {**inputs, "labels": labels})
    nll, count = token_nll(tiny_model(**inputs).logits, labels)
    assert loss.weight == count.item() == 9
    torch.testing.assert_close(loss.loss_sum, nll, rtol=1e-5, atol=1e-5)


def test_a_model_without_an_output_embedding_gets_its_full_logits_cut_after_the_forward(tiny_model):
    inputs, labels = ragged_batch()
    expected = labelled_logits(tiny_model, inputs, labels).logits
    tiny_model.get_output_embeddings = lambda: None  # e.g. a head applied as a plain function
    head = labelled_logits(tiny_model, inputs, labels)
    torch.testing.assert_close(head.logits, expected, rtol=1e-5, atol=1e-5)
