"""polmctl/models/peft_variants.py: what each peft.method / peft.init builds, and the combinations
refused at validation with the key and the fix."""

from __future__ import annotations

import pytest
import torch

from polmctl.compose import compose_config
from polmctl.config.schema import ModelConfig, PeftConfig
from polmctl.errors import ConfigError, TrainingError
from polmctl.models import apply_peft, load_model, load_tokenizer, trainable_parameter_summary
from polmctl.models.peft_variants import (
    AdaLoraBudget,
    AdaLoraOrthogonality,
    adalora_schedule,
    step_hooks,
    step_penalties,
)
from polmctl.validate import validate

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")


def validated(*overrides: str):
    return validate(compose_config(["recipe=lora", "model=tiny", *overrides]))


@pytest.mark.parametrize(
    "option,peft_type,marker",
    [
        ("ia3", "IA3", "ia3_l"),
        ("vera", "VERA", "vera_lambda"),
        ("loha", "LOHA", "hada_"),
        ("lokr", "LOKR", "lokr_"),
        ("oft", "OFT", "oft_"),
        ("boft", "BOFT", "boft_"),
        ("adalora", "ADALORA", "lora_E"),
        ("ln_tuning", "LN_TUNING", "ln_tuning_layers"),
    ],
)
def test_each_peft_option_builds_its_peft_type_and_trains_only_its_parameters(option, peft_type, marker):
    cfg = validated(f"peft={option}").peft
    model = apply_peft(load_model(TINY), cfg, load_tokenizer(TINY), total_steps=10)
    assert model.active_peft_config.peft_type.value == peft_type
    trainable, total = trainable_parameter_summary(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert 0 < trainable < total and any(marker in n for n in names), names[:4]
    assert bool(step_hooks(model)) == (option == "adalora")


def test_lora_options_reach_peft_rank_pattern_alpha_pattern_and_init():
    cfg = PeftConfig(method="lora", r=4, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 16}, init="gaussian")
    model = apply_peft(load_model(TINY), cfg)
    config = model.active_peft_config
    assert config.rank_pattern == {"q_proj": 2} and config.alpha_pattern == {"v_proj": 16}
    assert config.init_lora_weights == "gaussian"
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape[0] == 2
    assert model.base_model.model.model.layers[0].self_attn.k_proj.lora_A["default"].weight.shape[0] == 4


def test_pissa_starts_from_the_top_singular_vectors_and_keeps_the_model_function():
    base = load_model(TINY)
    ids = torch.tensor([[3, 50, 70, 90]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    w = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    model = apply_peft(base, PeftConfig(method="lora", r=4, init="pissa", dropout=0.0))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    top = torch.linalg.svdvals(w)[:4]
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], top, rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    assert model.polmctl_initial_adapter  # kept for the conversion at save time


def test_adalora_schedule_is_fractions_of_the_run_steps():
    cfg = PeftConfig(method="adalora", r=12, adalora_target_r=8, adalora_warmup=0.1, adalora_final=0.2)
    assert adalora_schedule(cfg, 60) == {"total_step": 60, "tinit": 6, "tfinal": 12, "deltaT": 1}


def test_adalora_budget_steps_peft_with_the_step_number_and_needs_gradients():
    model = apply_peft(load_model(TINY), PeftConfig(method="adalora", r=4, adalora_target_r=2), total_steps=4)
    hook = AdaLoraBudget()
    with pytest.raises(TrainingError, match="no gradient there"):
        hook(model)  # as under DeepSpeed, which keeps the gradients sharded
    ids = torch.tensor([[3, 50, 70, 90, 11]])
    calls = []
    model.base_model.update_and_allocate = calls.append
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        hook(model)
    assert calls == [0, 1, 2]


def test_adalora_orthogonality_is_peft_own_penalty_and_the_paper_formula():
    """peft adds w * mean(||P P^T - I||_F, ||Q^T Q - I||_F) to a loss the model computes from labels;
    polmctl's objectives do not, so AdaLoraOrthogonality computes the same term for the trainer."""
    model = apply_peft(load_model(TINY), PeftConfig(method="adalora", r=4, adalora_target_r=2), total_steps=4)
    penalty = AdaLoraOrthogonality()
    assert step_penalties(model) and penalty.name == "adalora_orth"
    ids = torch.tensor([[3, 50, 70, 90, 11]])
    with torch.no_grad():
        with_penalty = model(input_ids=ids, labels=ids).loss  # AdaLoraModel.forward adds it
        without = model.base_model.model(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(penalty(model), with_penalty - without, rtol=1e-5, atol=1e-6)
        # By hand: P and Q all zero give ||-I||_F = sqrt(r) = 2 for each matrix; w = 0.5 -> 1.0.
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.zero_()
        torch.testing.assert_close(penalty(model), torch.tensor(1.0))
        # Orthonormal rows of P (columns of Q): that matrix's term is 0, so the mean halves -> 0.5.
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.eye(*p.shape))
        torch.testing.assert_close(penalty(model), torch.tensor(0.5))
    off = apply_peft(
        load_model(TINY),
        PeftConfig(method="adalora", r=4, adalora_target_r=2, adalora_orth_reg_weight=0),
        total_steps=4,
    )
    assert step_penalties(off) == [] and step_penalties(load_model(TINY)) == []


@pytest.mark.parametrize(
    "overrides,key,hint",
    [
        (["peft.init=loftq", "trainer.device=cpu", "peft.merge_on_save=true"], "peft.init", "CUDA"),
        (["peft=loha", "model.quantization=nf4"], "model.quantization", "no 4/8-bit LoHa"),
        (["peft.init=pissa", "model.quantization=nf4"], "model.quantization", "full-precision"),
        (["peft=adalora", "resume=auto"], "resume", "not in checkpoints"),
        (["recipe=qlora", "peft.merge_on_save=true"], "peft.merge_on_save", "de-quantized copy"),
        (["peft=dora", "peft.init=pissa"], "peft.init", "only peft.method=lora"),
        (["peft.init=svd"], "peft.init", "pissa_niter_<N>"),
        (["peft=ia3", "peft.merge_on_save=true"], None, None),
        (["peft=ia3", "peft.feedforward_modules=[q_proj]"], "peft.feedforward_modules", "subset of"),
        (["peft.feedforward_modules=[down_proj]"], "peft.feedforward_modules", "only ia3"),
        (["peft=vera", "+peft.rank_pattern={q_proj: 2}"], "peft.rank_pattern", "only lora, dora, loha and lokr"),
        (["peft=ln_tuning", "peft.target_modules=[all-linear]"], "peft.target_modules", "norm layers"),
        (["peft=adalora", "peft.adalora_target_r=20"], "peft.adalora_target_r", "exceeds the starting rank"),
        (["peft=adalora", "peft.adalora_warmup=0.5", "peft.adalora_final=0.5"], "peft.adalora_final", "below 1"),
        (["peft=adalora", "peft.adalora_orth_reg_weight=-1"], "peft.adalora_orth_reg_weight", "0 turns it off"),
        (["peft=prompt_tuning", "data.packing=false", "peft.merge_on_save=true"], "peft.merge_on_save", "virtual"),
        (
            ["peft.init=pissa", "peft.use_rslora=true", "+peft.rank_pattern={q_proj: 2}"],
            "peft.init",
            "cannot be saved",
        ),
    ],
)
def test_combinations_that_cannot_work_fail_at_validation(overrides, key, hint):
    if key is None:  # fine: every adapter but prompt/prefix tuning merges
        validated(*overrides)
        return
    with pytest.raises(ConfigError) as info:
        validated(*overrides)
    assert info.value.key == key and hint in str(info.value), str(info.value)


def test_loftq_on_cpu_is_refused_even_with_merge_on_save_and_needs_merge_on_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="peft.merge_on_save: peft.init=loftq replaces the base weights"):
        validated("peft.init=loftq")
    validated("peft.init=loftq", "peft.merge_on_save=true")


@pytest.mark.parametrize("option", ["ia3", "vera", "loha", "lokr", "oft", "boft", "adalora", "ln_tuning"])
def test_each_peft_option_trains_with_gradient_checkpointing(option):
    cfg = validated(f"peft={option}", "model.gradient_checkpointing=true")
    model = apply_peft(load_model(cfg.model), cfg.peft, total_steps=10)
    ids = torch.tensor([[3, 50, 70, 90, 11, 12]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_lora_options_map_each_init_to_peft():
    from peft import EvaConfig, LoftQConfig

    from polmctl.models.peft_variants import lora_options

    assert lora_options(PeftConfig(method="lora"), weights_known=True) == {"rank_pattern": {}, "alpha_pattern": {}}
    assert lora_options(PeftConfig(method="lora", init="pissa_niter_4"), weights_known=True)["init_lora_weights"] == (
        "pissa_niter_4"
    )
    loftq = lora_options(PeftConfig(method="lora", init="loftq"), weights_known=True)
    assert loftq["init_lora_weights"] == "loftq" and isinstance(loftq["loftq_config"], LoftQConfig)
    assert loftq["loftq_config"].loftq_bits == 4
    eva = lora_options(PeftConfig(method="lora", init="eva"), weights_known=True)
    assert eva["init_lora_weights"] == "eva" and isinstance(eva["eva_config"], EvaConfig)
    # a model on the meta device (polmctl plan) has no weights or data to start from: peft's default
    assert "init_lora_weights" not in lora_options(PeftConfig(method="lora", init="pissa"), weights_known=False)
