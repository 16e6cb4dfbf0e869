"""Distillation: each divergence against its formula on hand-built logits, temperature and
masking, the objective's normalisation under the engine's contract, the on-policy schedule,
and the tokenizer check that stops a run before training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError
from polmctl.losses import distill as L
from polmctl.methods.distill import (
    DistillBatches,
    DistillMethod,
    DistillObjective,
    check_same_tokenizer,
    on_policy_step,
    prompt_length,
    teacher_model_config,
)
from polmctl.models.tiny import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.unit


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: [B, L, V], cut to the last logits_to_keep positions."""

    def __init__(self, logits):
        super().__init__()
        self.table = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=False):
        return SimpleNamespace(logits=self.table[:, -logits_to_keep:] if logits_to_keep else self.table)


def test_only_trained_positions_count_and_get_gradients():
    """Logits at prompt and padding positions (labels -100) and at the last position (it
    predicts nothing) may hold anything: the loss ignores them and their gradient is 0."""
    labels = torch.tensor([[-100, -100, 3, 1, 2], [-100, -100, 1, 2, -100]])
    batch = {
        "input_ids": torch.zeros_like(labels),
        "attention_mask": (labels != -100) | (torch.arange(5) < 2),
        "labels": labels,
    }
    gen = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 6, generator=gen)
    # position t predicts labels[:, t + 1]: (0, 1), (0, 2), (0, 3), (1, 1), (1, 2) are trained
    trained = torch.zeros(2, 5, dtype=torch.bool)
    trained[0, 1:4], trained[1, 1:3] = True, True
    garbage = 1e4 * torch.randn(2, 5, 6, generator=gen)
    for loss in L.LOSSES:
        objective = DistillObjective(DistillMethod(loss=loss, sft_weight=0.5))
        objective.set_teacher(FixedLogits(torch.where(trained[..., None], t_logits, garbage)))
        student = FixedLogits(torch.where(trained[..., None], s_logits, -garbage))
        terms = objective(student, batch)
        assert terms.weight == 5 == objective.weight(batch)
        expected = (
            L.divergence(s_logits[trained], t_logits[trained], loss=loss, beta=0.5)
            + 0.5
            * torch.nn.functional.cross_entropy(s_logits[trained], labels[:, 1:][trained[:, :-1]], reduction="none")
        ).sum()
        assert terms.loss_sum.item() == pytest.approx(expected.item(), rel=1e-5), loss
        terms.loss_sum.backward()
        assert (student.table.grad[~trained] == 0).all() and (student.table.grad[trained] != 0).any()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def objective_with(tok, teacher_seed=1, **method):
    objective = DistillObjective(DistillMethod(**method))
    teacher = build_tiny_model(tok, seed=teacher_seed)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)  # a confident teacher: peaked next-token distributions
    objective.set_teacher(teacher, len(tok))
    return objective


def encode(objective, tok, rows):
    data = SimpleNamespace(
        source="test", format="auto", max_length=64, overlong="truncate", completion_only_loss=True, packing=False
    )
    return objective.encode(rows, tok, data)[0]


ROWS = [
    {"prompt": "1+1?", "completion": "2"},
    {"prompt": "What is 3 + 4?", "completion": "3 + 4 = 7."},
    {"prompt": "9-2", "completion": "The answer is 7."},
    {"prompt": "2*3?", "completion": "6, of course"},
]


@pytest.mark.parametrize("loss", L.LOSSES)
def test_the_step_loss_is_a_per_token_mean_however_the_step_is_split(tok, loss):
    """loss_sum / weight over micro-batches = the mean of (T^2 divergence + sft_weight x NLL)
    over every trained token: the engine's contract, with any split."""
    objective = objective_with(tok, loss=loss, temperature=2.0, sft_weight=0.3)
    student = build_tiny_model(tok, seed=0)
    examples = encode(objective, tok, ROWS)
    whole = objective(student, objective.collate(examples))
    parts = [objective(student, objective.collate(examples[:1])), objective(student, objective.collate(examples[1:]))]
    assert whole.weight == objective.weight(objective.collate(examples)) == sum(p.weight for p in parts)
    split = sum(p.loss_sum for p in parts) / sum(p.weight for p in parts)
    assert (whole.loss_sum / whole.weight).item() == pytest.approx(split.item(), rel=1e-5)
    # ... and equals the per-token formula computed by hand, row by row
    per_token = []
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        s_logits, t_logits = student(input_ids=ids).logits[0, :-1], objective.teacher(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(e["labels"][1:])
        keep = targets != -100
        d = L.divergence(s_logits[keep], t_logits[keep], loss=loss, beta=0.5, temperature=2.0)
        nll = torch.nn.functional.cross_entropy(s_logits[keep], targets[keep], reduction="none")
        per_token.append(d + 0.3 * nll)
    assert (whole.loss_sum / whole.weight).item() == pytest.approx(torch.cat(per_token).mean().item(), rel=1e-4)
    assert set(whole.metrics) == {"loss/distill", "loss/sft", "kl_to_teacher"}
    whole.loss_sum.backward()  # the teacher is frozen, in eval mode, and never gets a gradient
    assert not objective.teacher.training and all(p.grad is None for p in objective.teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_on_policy_batches_get_no_sft_term_and_a_teacher_of_the_same_model_gives_zero(tok):
    objective = objective_with(tok, teacher_seed=0, sft_weight=1.0)
    with torch.no_grad():
        objective.teacher.model.norm.weight.div_(8.0)  # now exactly the student's weights
    student = build_tiny_model(tok, seed=0)
    batch = objective.collate(encode(objective, tok, ROWS))
    offline = objective(student, batch)
    assert offline.metrics["kl_to_teacher"].item() == pytest.approx(0.0, abs=1e-5)
    assert offline.loss_sum.item() == pytest.approx(offline.metrics["loss/sft"][0].item(), rel=1e-5)
    on_policy = objective(student, {**batch, "on_policy": torch.ones(len(ROWS), dtype=torch.bool)})
    assert on_policy.loss_sum.item() == pytest.approx(0.0, abs=1e-5)
    assert on_policy.metrics["loss/sft"][1] == 0  # the engine leaves a count-0 metric out


def test_a_head_padded_past_the_tokenizer_is_cut_to_it(tok):
    """A teacher whose LM head has extra rows (vocab padded, e.g. 49152 -> 49280) scores the
    same as without them: the logits are cut to the tokenizer's length."""
    objective = objective_with(tok)
    student = build_tiny_model(tok, seed=0)
    batch = objective.collate(encode(objective, tok, ROWS))
    reference = objective(student, batch).loss_sum
    padded = objective.teacher
    padded.resize_token_embeddings(len(tok) + 12)
    with torch.no_grad():
        padded.get_output_embeddings().weight[len(tok) :] = 5.0  # would dominate the softmax if kept
    assert objective(student, batch).loss_sum.item() == pytest.approx(reference.item(), rel=1e-5)


def test_teacher_model_config_takes_the_method_keys_and_the_students_cache():
    method = DistillMethod(teacher="some/teacher", teacher_dtype="bfloat16", teacher_quantization="nf4")
    cfg = teacher_model_config(method, ModelConfig(name_or_path="builtin:tiny", cache_dir="/c", dtype="float32"))
    assert (cfg.name_or_path, cfg.dtype, cfg.quantization, cfg.cache_dir) == ("some/teacher", "bfloat16", "nf4", "/c")


@pytest.mark.parametrize(
    "key,value,hint",
    [
        ("loss", "kl", "forward_kl"),
        ("beta", 1.5, "[0, 1]"),
        ("on_policy_fraction", -0.1, "[0, 1]"),
        ("temperature", 0.0, "> 0"),
        ("sft_weight", -1.0, ">= 0"),
        ("teacher_quantization", "q4", "nf4"),
        ("rollout_temperature", 0.0, "> 0"),
    ],
)
def test_bad_method_values_name_the_key(key, value, hint):
    with pytest.raises(ConfigError, match=rf"method\.{key}: .*{hint}"):
        DistillMethod(**{key: value}).check("method")


def test_tokenizers_that_differ_stop_the_run_in_one_line_naming_both(tok):
    check_same_tokenizer(tok, build_tiny_tokenizer(), student="builtin:tiny", teacher="a/teacher")  # same: fine
    bigger = build_tiny_tokenizer()
    bigger.add_tokens(["<extra>"])
    with pytest.raises(ConfigError) as info:
        check_same_tokenizer(tok, bigger, student="builtin:tiny", teacher="big/teacher")
    message = str(info.value)
    assert "\n" not in message and message.startswith("method.teacher: ")
    assert "big/teacher" in message and "builtin:tiny" in message and "vocab size 260 vs 261" in message
    assert "model family" in message  # and how to fix it
    other_eos = build_tiny_tokenizer()
    other_eos.eos_token = "<|endoftext|>"
    with pytest.raises(ConfigError, match="eos_token '<\\|im_end\\|>' vs '<\\|endoftext\\|>'"):
        check_same_tokenizer(tok, other_eos, student="s", teacher="t")


def test_the_on_policy_schedule_is_seeded_per_step_and_has_the_asked_share():
    draws = [on_policy_step(42, n, 0.3) for n in range(1, 2001)]
    assert draws == [on_policy_step(42, n, 0.3) for n in range(1, 2001)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert not any(on_policy_step(1, n, 0.0) for n in range(50)) and all(on_policy_step(1, n, 1.0) for n in range(50))


class FakeBackend:
    """Samples 'ab' + eos for every prompt; records what it was asked."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def sample(self, model, tokenizer, prompts, n, options):
        self.calls.append((list(prompts), n, options.temperature))
        return [tokenizer("ab", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]] * len(prompts) * n


def test_the_batch_source_mixes_steps_keeps_one_data_position_and_resumes(tok):
    objective = DistillObjective(DistillMethod(on_policy_fraction=0.5, temperature=2.0, rollout_temperature=0.7))
    examples = encode(objective, tok, ROWS * 4)
    trainer_cfg = SimpleNamespace(micro_batch_size=2, grad_accum=2)
    acc = SimpleNamespace(process_index=0, num_processes=1)

    def source():
        return DistillBatches(
            examples,
            collate=objective.collate,
            method=objective.method,
            tokenizer=tok,
            trainer_cfg=trainer_cfg,
            seed=3,
            shuffle=True,
            accelerator=acc,
            backend=FakeBackend(tok),
        )

    first = source()
    kinds = []
    for _ in range(8):
        batches, metrics = first.next_step(model=None)
        kinds.append(metrics["on_policy"])
        assert len(batches) == 2 and all(b["input_ids"].size(0) == 2 for b in batches)
        if metrics["on_policy"]:
            for b in batches:
                assert b["on_policy"].all()
                ab = tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                trained = b["labels"][b["labels"] != -100].view(2, -1)
                assert trained.tolist() == [ab, ab]  # only the sampled completion is trained
    assert 0 < sum(kinds) < 8 and first.progress_epochs == pytest.approx(8 * 4 / 16)
    assert first.backend.calls[0][1:] == (1, 0.7)  # one sample per prompt, at the rollout temperature
    assert first.backend.calls[0][0][0].startswith("<|im_start|>user\n")  # the rendered prompt
    state = first.state_dict()
    resumed = source()
    resumed.load_state_dict(state)
    for _ in range(4):
        a, b = first.next_step(None), resumed.next_step(None)
        assert a[1]["on_policy"] == b[1]["on_policy"]
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a[0], b[0]))


def test_on_policy_steps_need_prompts(tok):
    objective = DistillObjective(DistillMethod(on_policy_fraction=1.0))
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 4
    assert prompt_length(examples[0]) == 0
    with pytest.raises(ConfigError, match="method.on_policy_fraction: .*example 0 has none"):
        DistillBatches(
            examples,
            collate=objective.collate,
            method=objective.method,
            tokenizer=tok,
            trainer_cfg=SimpleNamespace(micro_batch_size=2, grad_accum=1),
            seed=0,
            shuffle=False,
            accelerator=SimpleNamespace(process_index=0, num_processes=1),
            backend=FakeBackend(tok),
        )
