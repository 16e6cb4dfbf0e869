"""Sampling from a LoRA policy with its adapters merged (polmctl.rollout.backends.merged_lora):
the same tokens as the unmerged policy, the base weights back bit for bit, the adapters active
again, and no merge where it would be lossy or wrong.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/rollout/test_backends_merged_lora.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from polmctl.config.schema import PeftConfig
from polmctl.data import format_prompt
from polmctl.models import apply_peft
from polmctl.models.tiny import build_tiny_model
from polmctl.rollout.backends import TransformersBackend, merged_lora
from polmctl.rollout.sampling import SamplingOptions
from tests.rollout.test_backends import varied_base

pytestmark = pytest.mark.unit
TEXTS = ("hi", "a much longer prompt here", "2+2")


def lora_model(tok, method: str = "lora", dtype=torch.float32):
    """The tiny model with large random weights (its greedy text varies) and a LoRA whose B
    matrices are seeded random, so the adapters change the output."""
    g = torch.Generator().manual_seed(0)
    model = varied_base(tok, g)
    model = apply_peft(model.to(dtype), PeftConfig(method=method, r=4, dropout=0.0, num_virtual_tokens=4), tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def lora_calls(model) -> list[int]:
    """A counter of the adapters' own forward calls (none while merged) and its hooks."""
    calls = [0]
    hooks = [
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for name, m in model.named_modules()
        if name.endswith("lora_A.default")
    ]
    assert hooks
    return calls, hooks


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_restored(model, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, p in after.items():  # the bound is 0: an exact restore, not (W + dW) - dW
        assert torch.equal(p, before[name]), name
    assert not any(getattr(m, "merged", False) for m in model.modules())


def logits(model, tok) -> torch.Tensor:
    ids = tok(format_prompt("2+2", tok), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_greedy_tokens_equal_merged_and_unmerged_and_the_weights_come_back(tiny_tokenizer, method):
    tok = tiny_tokenizer
    model = lora_model(tok, method)
    prompts = [format_prompt(t, tok) for t in TEXTS]
    before, out_before = snapshot(model), logits(model, tok)
    calls, hooks = lora_calls(model)
    runs = {}
    for merge in (True, False):
        calls[0] = 0
        runs[merge] = TransformersBackend().generate(
            model, tok, prompts, 2, max_new_tokens=12, do_sample=False, merge_adapters=merge
        )
        assert (calls[0] == 0) == merge  # merged: the lora_A/lora_B matmuls never ran
    for h in hooks:
        h.remove()
    assert runs[True] == runs[False]
    assert len({tuple(c) for c in runs[True]}) > 1  # the prompts' completions differ: a real check
    assert_restored(model, before)
    torch.testing.assert_close(logits(model, tok), out_before, rtol=0, atol=0)
    with model.disable_adapter():  # the adapters are what change the output, and they are on again
        assert not torch.allclose(logits(model, tok), out_before)


def test_sampling_with_the_option_off_or_on_gives_the_same_samples(tiny_tokenizer):
    tok = tiny_tokenizer
    model = lora_model(tok)
    prompts = [format_prompt(t, tok) for t in TEXTS]
    assert SamplingOptions().merge_adapters_for_sampling is True
    samples = {}
    for merge in (True, False):
        options = SimpleNamespace(
            temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=10, stop=[], merge_adapters_for_sampling=merge
        )
        torch.manual_seed(3)
        samples[merge] = TransformersBackend().sample(model, tok, prompts, 4, options)
    assert samples[True] == samples[False]


def test_many_rollouts_with_a_changing_adapter_leave_the_base_weights_exact(tiny_tokenizer):
    """100 merge/unmerge cycles, the adapter moving between them as training moves it: peft's own
    unmerge, W' = (W + dW) - dW, drifts (within 1e-6 relative here); merged_lora does not at all."""
    tok = tiny_tokenizer
    drifting, exact = lora_model(tok), lora_model(tok)
    base = {n: p.detach().clone() for n, p in exact.named_parameters() if "base_layer" in n}
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        steps = {n: torch.randn(p.shape, generator=g) * 1e-2 for n, p in exact.named_parameters() if "lora_B" in n}
        for model in (drifting, exact):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in steps:
                        p.add_(steps[n])
        drifting.merge_adapter()
        drifting.unmerge_adapter()
        with merged_lora(exact) as merged:
            assert merged
    drift = max(((p - base[n]).norm() / base[n].norm()).item() for n, p in drifting.named_parameters() if n in base)
    assert 0 < drift < 1e-6
    for n, p in exact.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_an_error_while_merged_still_restores(tiny_tokenizer):
    tok = tiny_tokenizer
    model = lora_model(tok)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with merged_lora(model) as merged:
            assert merged and any(getattr(m, "merged", False) for m in model.modules())
            raise RuntimeError("boom")
    assert_restored(model, before)


def test_no_merge_where_it_would_be_lossy_or_wrong(tiny_tokenizer):
    tok = tiny_tokenizer
    half = lora_model(tok, dtype=torch.bfloat16)  # bf16 base: W + dW rounded to bf16 loses most of dW
    with merged_lora(half) as merged:
        assert not merged
    model = lora_model(tok)
    with merged_lora(model, enabled=False) as merged:
        assert not merged
    with model.disable_adapter(), merged_lora(model) as merged:  # the adapters are off: nothing to merge
        assert not merged
    with merged_lora(lora_model(tok, "prompt_tuning")) as merged:
        assert not merged
    with merged_lora(build_tiny_model(tok)) as merged:  # no adapter at all
        assert not merged
