"""Building online DPO's judges: which model an LLM judge runs on (the policy as it trains, the
reference with LoRA adapters off, a model of its own), and the models it refuses."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError
from polmctl.methods.judging import ModelJudge, RewardJudge, build_judge, load_judge_model
from polmctl.methods.online_dpo import OnlineDPOMethod
from polmctl.methods.reference import Reference
from polmctl.models import load_model, load_tokenizer

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
ROWS = [{"prompt": "What is 2 + 3?", "answer": "5"}]
ANSWERS = ["It is 5.", "6", "five"]


def lora_policy():
    """The tiny model with LoRA adapters whose B matrices are not zero, so adapters on and off differ."""
    torch.manual_seed(0)
    model = get_peft_model(load_model(TINY), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.train()


def judge(judge_model: str, **method):
    m = OnlineDPOMethod(judge="llm", judge_model=judge_model, judge_mode="score", judge_min_label_prob=1e-6, **method)
    return build_judge(m, tokenizer=load_tokenizer(TINY), model_cfg=TINY, device="cpu", reference=Reference())


def test_the_reference_judge_is_the_policy_with_its_adapters_off():
    policy = lora_policy()
    on_policy, note = judge("policy")
    as_reference, reference_note = judge("reference")
    own_copy, own_note = judge("builtin:tiny")  # the base model, loaded on its own
    assert isinstance(on_policy, ModelJudge) and "the policy as it trains" in note
    assert "started from" in reference_note and own_note.startswith("judge: builtin:tiny, score")
    scores = {name: j(policy, ROWS, ANSWERS, 3, 0)[0] for name, j in [("p", on_policy), ("r", as_reference)]}
    base, _ = own_copy(None, ROWS, ANSWERS, 3, 0)
    assert torch.allclose(scores["r"], base, atol=1e-5) and not torch.allclose(scores["p"], base, atol=1e-3)
    assert policy.training  # the judge left the policy in train mode


def test_reward_functions_judge_each_answer_and_a_reward_model_is_no_llm_judge(tmp_path):
    rewards, note = build_judge(
        OnlineDPOMethod(rewards=["math_answer"]), tokenizer=None, model_cfg=TINY, device="cpu", reference=Reference()
    )
    assert isinstance(rewards, RewardJudge) and note == "judge: reward functions math_answer"
    scores, metrics = rewards(None, ROWS, ANSWERS, 3, 0)
    assert scores.tolist() == [1.0, 0.0, 0.0] and metrics == {"rewards/math_answer": (1.0, 3)}

    tok = load_tokenizer(TINY)
    load_model(TINY, head="reward", pad_token_id=tok.pad_token_id).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    with pytest.raises(ConfigError, match="is a reward model .* use method.judge=reward_model"):
        judge(str(tmp_path / "rm"))
    reward_model, note = build_judge(
        OnlineDPOMethod(judge="reward_model", judge_model=str(tmp_path / "rm")),
        tokenizer=tok,
        model_cfg=TINY,
        device="cpu",
        reference=Reference(),
    )
    scores, metrics = reward_model(None, ROWS, ANSWERS, 3, 0)
    assert note.startswith("judge: reward model") and scores.shape == (3,) and "rewards/reward_model" in metrics


def test_a_judge_of_its_own_loads_in_the_policys_dtype():
    _, bf16 = load_judge_model("builtin:tiny", ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16"), "cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16
