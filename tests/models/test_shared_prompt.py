"""The shared-prompt forward (polmctl/models/shared_prompt.py) gives the plain forward's log-probs,
entropies and gradients, in the same layout, and steps aside for batches it cannot share."""

from __future__ import annotations

import pytest
import torch

from polmctl.config.schema import PeftConfig
from polmctl.data.preference import IGNORE_INDEX, pad_sequences, preference_collate
from polmctl.models import apply_peft
from polmctl.models import forward as base
from polmctl.models.shared_prompt import shared_prompt_logps

pytestmark = pytest.mark.unit


@pytest.fixture()
def lora_model(tiny_model):
    torch.manual_seed(0)
    model = apply_peft(tiny_model, PeftConfig(method="lora", r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B = 0 at init would hide an adapter that is not applied
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def group_batch(pad_id: int, prompt_lengths=(7, 12, 4), group: int = 3, opening: list[int] = ()) -> dict:
    """Prompts of different lengths, each after ``opening`` (a system prompt), ``group`` answers of
    1-5 tokens each, as GRPO lays them out."""
    gen = torch.Generator().manual_seed(1)
    seqs, labels = [], []
    for n in prompt_lengths:
        prompt = list(opening) + torch.randint(5, 200, (n,), generator=gen).tolist()
        n += len(opening)
        for _ in range(group):
            answer = torch.randint(5, 200, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
            seqs.append(prompt + answer)
            labels.append([IGNORE_INDEX] * n + answer)
    return pad_sequences(seqs, labels, pad_id)


def forward_and_grad(model, batch, *, shared: bool):
    model.zero_grad(set_to_none=True)
    out = base.policy_forward(model, batch, entropy=True, share_prompts=shared)
    (out.logps.sum() + out.logps.pow(2).sum()).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out, grad


@pytest.mark.parametrize("make", ["groups", "groups_after_a_system_prompt", "preference"])
def test_shared_forward_matches_the_plain_one(lora_model, tiny_tokenizer, make):
    pad = tiny_tokenizer.pad_token_id
    if make.startswith("groups"):
        batch = group_batch(pad, opening=[7, 8, 9, 10, 11] if make.endswith("prompt") else [])
    else:  # chosen i and rejected i share prompt i, B rows apart
        examples = [
            {
                "prompt_ids": list(range(10 + i, 20 + 2 * i)),
                "chosen_ids": [40 + i, 41, 42][: 1 + i],
                "rejected_ids": [50, 51 + i],
            }
            for i in range(3)
        ]
        batch = preference_collate(examples, pad)
    assert shared_prompt_logps(lora_model, batch) is not None
    shared, g_shared = forward_and_grad(lora_model, batch, shared=True)
    plain, g_plain = forward_and_grad(lora_model, batch, shared=False)
    assert shared.logps.shape == plain.logps.shape and torch.equal(shared.mask, plain.mask)
    torch.testing.assert_close(shared.logps, plain.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.entropy, plain.entropy, atol=1e-5, rtol=1e-5)
    assert ((g_shared - g_plain).norm() / g_plain.norm()).item() < 1e-5
    assert (shared.logps[~shared.mask] == 0).all()


def test_batches_it_cannot_share_take_the_plain_path(lora_model, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():  # without share_prompts, or with hidden states asked for: the plain forward
        plain = base.policy_forward(lora_model, group_batch(pad))
        hidden = base.policy_forward(lora_model, group_batch(pad), share_prompts=True, hidden=True)
    assert torch.equal(plain.logps, hidden.logps) and hidden.hidden is not None
    distinct = group_batch(pad, group=1)
    assert shared_prompt_logps(lora_model, distinct) is None  # every prompt differs: nothing to share
    prompt, answer = list(range(10, 16)), [40, 41, 42]
    holes = pad_sequences([prompt + answer] * 2, [[IGNORE_INDEX] * 6 + [40, IGNORE_INDEX, 42]] * 2, pad)
    assert shared_prompt_logps(lora_model, holes) is None  # a hole inside the answer: not prompt-then-answer
    assert (
        shared_prompt_logps(lora_model, pad_sequences([prompt + answer] * 2, [[IGNORE_INDEX] * 6 + answer] * 2, pad))
        is not None
    )
    packed = {**group_batch(pad), "position_ids": torch.zeros(9, 1, dtype=torch.long)}
    assert shared_prompt_logps(lora_model, packed) is None


def test_the_opening_all_prompts_share_runs_once(lora_model, tiny_tokenizer):
    opening, lengths = [7, 8, 9, 10, 11], (7, 12, 4)
    batch = group_batch(tiny_tokenizer.pad_token_id, lengths, opening=opening)
    seen = []
    hook = lora_model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    with torch.no_grad():
        shared_prompt_logps(lora_model, batch)
    hook.remove()
    # the opening once; each prompt's rest less its last token, left-padded; then every row's tail
    assert seen[:2] == [(1, len(opening)), (len(lengths), max(lengths) - 1)]


def test_a_wrapped_model_shares_the_prompt_with_its_own_config(lora_model, tiny_tokenizer):
    """Under DeepSpeed the step gets accelerate's DeepSpeedEngine, whose ``config`` is DeepSpeed's dict;
    the KV cache is built from the wrapped model's (base.unwrapped: accelerate's unwrapping). A CPU
    DataParallel (forward: the module's) stands in for the engine here."""
    batch = group_batch(tiny_tokenizer.pad_token_id)
    wrapped = torch.nn.DataParallel(lora_model)
    wrapped.config = {"train_micro_batch_size_per_gpu": 1}  # as DeepSpeedEngine.config
    assert base.unwrapped(wrapped) is lora_model
    assert base.cache_keyword(wrapped) == base.cache_keyword(lora_model)
    with torch.no_grad():
        through, plain = shared_prompt_logps(wrapped, batch), shared_prompt_logps(lora_model, batch)
    assert through is not None and plain is not None
    torch.testing.assert_close(through[0], plain[0])
