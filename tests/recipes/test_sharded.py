"""Sharded training in two CPU processes (gloo): FSDP2 and DeepSpeed ZeRO-3 run the training methods
(SFT, LoRA, DPO, KTO, reward model, distillation, GRPO, PPO; under ZeRO-3 also online DPO, rejection
sampling, step DPO, PRM and unlearning); what ran is recorded (summary.json, the log).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/recipes/test_sharded.py

Each run goes through the real path, ``polmctl run launcher=accelerate launcher.config_file=fsdp
launcher.num_processes=2``, on model=tiny in float32 (exact comparisons), for a few steps. The GPU
tests at the end are written for a machine with two or more CUDA devices and skip without them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polmctl.commands.export import export
from polmctl.engine.checkpoint import SafeCheckpointReader
from polmctl.engine.metrics import read_metrics
from polmctl.errors import TrainingError

from .test_multiprocess import _free_port, run_two_processes

pytestmark = pytest.mark.recipes

FAST = ["model=tiny", "model.dtype=float32", "eval=none", "eval.tasks=[]", "logger.progress=false"]
FAST += ["trainer.warmup_ratio=0"]
LETTER_A = "method.rewards=[{_target_: tests.recipes.test_online_recipes.letter_a}]"
LOWERCASE = "method.rewards=[{_target_: tests.recipes.test_online_recipes.lowercase}]"


def launch(run_dir: Path, *overrides: str, config: str = "fsdp", check: bool = True, timeout: int = 400):
    """``polmctl run <overrides> launcher=accelerate launcher.config_file=<config>`` in two processes."""
    command = [sys.executable, "-m", "polmctl", "run", *FAST, *overrides]
    command += ["launcher=accelerate", "launcher.num_processes=2", f"launcher.config_file={config}"]
    command += [f"launcher.main_process_port={_free_port()}", f"hydra.run.dir={run_dir}"]
    return run_two_processes(command, check=check, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl")]


def grad_norms(run_dir: Path) -> list[float]:
    return [m["grad_norm"] for m in read_metrics(run_dir / "metrics.jsonl")]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def assert_same_weights(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tolerance)


def test_fsdp_trains_like_one_process_records_it_resumes_and_exports(train_recipe, tmp_path):
    # One process: 2 rows x 2 micro-batches per step. FSDP: 1 row x 2 micro-batches on each of 2 ranks.
    steps = ["trainer.max_steps=4", "trainer.save_every=2", "data.max_rows=40", "trainer.lr=1e-2"]
    one = train_recipe("sft", "model.dtype=float32", *steps, "trainer.micro_batch_size=2", "trainer.grad_accum=2")
    run_dir = tmp_path / "fsdp"
    launch(run_dir, "recipe=sft", *steps, "trainer.micro_batch_size=1", "trainer.grad_accum=2")

    assert losses(run_dir) == pytest.approx(one.losses, rel=1e-4)  # the DDP test's tolerance
    distributed = json.loads((run_dir / "summary.json").read_text())["distributed"]
    assert distributed["strategy"] == "fsdp2" and (distributed["processes"], distributed["backend"]) == (2, "gloo")
    assert distributed["wrapped"] == ["LlamaDecoderLayer"] and "fully_shard" in distributed["applied_by"]
    assert "distributed: fsdp2, 2 process(es), backend gloo on cpu" in (run_dir / "polmctl.log").read_text()

    # Checkpoints are sharded: one file per rank, written by both into one atomically renamed dir.
    ckpt = run_dir / "checkpoints" / "step-4"
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "trainable.safetensors").exists() and (ckpt / "run_config.yaml").exists()
    assert not list((run_dir / "checkpoints").glob("*.tmp-*"))

    # final/ holds the gathered weights: from_pretrained loads them, close to the one-process run's.
    final = weights(run_dir / "final")
    assert_same_weights(final, weights(one.dir / "final"), rtol=1e-3, atol=1e-4)
    # polmctl export turns the sharded checkpoint into a plain model dir: the same weights as final/.
    export(str(ckpt), tmp_path / "exported")
    assert_same_weights(weights(tmp_path / "exported"), final, rtol=0, atol=0)

    # Resume from step 2 in two processes: steps 3 and 4, and the final weights, come out the same.
    first = losses(run_dir)
    shutil.rmtree(ckpt)
    shutil.move(run_dir / "final", tmp_path / "first_final")
    launch(run_dir, "recipe=sft", *steps, "trainer.micro_batch_size=1", "trainer.grad_accum=2", "resume=auto")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-2") and summary["steps"] == 4
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert losses(run_dir)[2:] == pytest.approx(first[2:], rel=1e-6)
    assert_same_weights(weights(run_dir / "final"), weights(tmp_path / "first_final"), rtol=1e-6, atol=1e-7)

    # A sharded checkpoint resumes under FSDP only: one process stops with the way out.
    with pytest.raises(TrainingError, match="written by a sharded run \\(FSDP2\\); resume it with the strategy"):
        train_recipe("sft", "model.dtype=float32", *steps, "resume=auto", run_dir=run_dir)


def test_fsdp_lora_trains_the_adapters_like_one_process_and_exports_its_checkpoint(train_recipe, tmp_path):
    steps = ["trainer.max_steps=3", "trainer.save_every=3", "data.max_rows=40", "trainer.lr=1e-2"]
    steps += ["trainer.grad_accum=1", "peft.dropout=0"]  # dropout masks come from each rank's own RNG stream
    one = train_recipe("lora", "model.dtype=float32", *steps, "trainer.micro_batch_size=2")
    run_dir = tmp_path / "fsdp_lora"
    launch(run_dir, "recipe=lora", *steps, "trainer.micro_batch_size=1")

    assert losses(run_dir) == pytest.approx(one.losses, rel=1e-4)
    assert json.loads((run_dir / "summary.json").read_text())["distributed"]["strategy"] == "fsdp2"
    # final/ is the adapter alone, gathered on rank 0: the same LoRA tensors as the one-process run's.
    adapter = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert not (run_dir / "final" / "model.safetensors").exists()
    assert_same_weights(adapter, load_file(one.dir / "final" / "adapter_model.safetensors"), rtol=1e-3, atol=1e-5)

    # The sharded checkpoint holds the trainable (LoRA) weights only; export merges them into a plain model.
    ckpt = run_dir / "checkpoints" / "step-3"
    stored = SafeCheckpointReader(ckpt / "sharded").read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    # ... and the tiny model's LM head, tied to the frozen embedding: torch's get_state_dict keeps a tied
    # weight under its second name even with ignore_frozen_params (it is loaded back unchanged).
    assert model_keys and [k for k in model_keys if "lora_" not in k] == ["model.base_model.model.lm_head.weight"]
    export(str(ckpt), tmp_path / "merged", merge=True)
    export(str(run_dir / "final"), tmp_path / "merged_final", merge=True)
    assert_same_weights(weights(tmp_path / "merged"), weights(tmp_path / "merged_final"), rtol=0, atol=0)


def test_fsdp_lora_on_bf16_weights_gathers_in_bf16(train_recipe, tmp_path):
    """model.dtype=bfloat16 keeps float32 adapters beside bf16 weights; FSDP gathers a layer in one
    dtype, the weights' (reduced in float32), as the unsharded run computes in bf16."""
    steps = ["model.dtype=bfloat16", "trainer.max_steps=2", "trainer.save_every=0", "peft.dropout=0"]
    one = train_recipe("lora", *steps, "trainer.micro_batch_size=4", "trainer.grad_accum=1")
    run_dir = tmp_path / "fsdp_lora_bf16"
    launch(run_dir, "recipe=lora", *steps, "trainer.micro_batch_size=2", "trainer.grad_accum=1")
    assert losses(run_dir) == pytest.approx(one.losses, rel=1e-3)  # bf16 rounding, summed in another order
    assert load_file(run_dir / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("grpo", [LETTER_A, "method.num_generations=4", "method.max_new_tokens=8", "trainer.micro_batch_size=4"]),
        ("ppo", [LOWERCASE, "method.max_new_tokens=8", "trainer.micro_batch_size=4"]),
    ],
)
def test_fsdp_runs_online_rl_with_rollouts_from_the_sharded_model(recipe, overrides, tmp_path, monkeypatch):
    """Every rank samples its own completions from the sharded policy (all ranks step generate()
    together); PPO's value head trains beside it and final/ is the policy alone."""
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", "tests")  # the reward _target_ lives in tests/
    run_dir = tmp_path / recipe
    launch(run_dir, f"recipe={recipe}", *overrides, "trainer.max_steps=2", "trainer.grad_accum=1")
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) and "reward" in m for m in lines)
    assert json.loads((run_dir / "summary.json").read_text())["distributed"]["strategy"] == "fsdp2"
    assert weights(run_dir / "final")  # the gathered policy loads with from_pretrained


def test_fsdp_grpo_dynamic_sampling_samples_again_on_every_rank(tmp_path, monkeypatch):
    """GRPO's dynamic sampling (DAPO) keeps only groups whose rewards differ. Rank 1's first rollout has
    none (nothing_on_rank_1_at_first), so both ranks sample again together: each generate() from the
    sharded policy is a collective, and a rank sampling alone hung. Then each rank trains on as many
    groups as the rank that kept fewest, since each backward is a collective too."""
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", "tests")  # the reward _target_ lives in tests/
    run_dir = tmp_path / "grpo_dynamic"
    overrides = [RANK_1_AGAIN, "method.dynamic_sampling=true", "method.num_generations=4", "method.max_new_tokens=8"]
    overrides += ["trainer.micro_batch_size=4", "trainer.max_steps=2", "trainer.grad_accum=1"]
    launch(run_dir, "recipe=grpo", *overrides, timeout=300)
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)


@pytest.mark.parametrize(
    "recipe, overrides",
    [("dpo", []), ("kto", []), ("reward_model", []), ("distill", ["method.teacher=builtin:tiny"])],
)
def test_fsdp_runs_the_offline_methods(recipe, overrides, tmp_path):
    run_dir = tmp_path / recipe
    launch(run_dir, f"recipe={recipe}", *overrides, "trainer.max_steps=2", "trainer.micro_batch_size=2")
    assert len(losses(run_dir)) == 2 and all(torch.isfinite(torch.tensor(losses(run_dir))))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["distributed"]["strategy"] == "fsdp2"
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() or (final / "adapter_model.safetensors").is_file()


# -- DeepSpeed ZeRO-3 (pip install 'polmctl[deepspeed]'; on CPU DS_ACCELERATOR=cpu, gloo) -------------

ZERO3 = ["trainer.max_steps=2", "trainer.grad_accum=1", "trainer.save_every=0", "data.max_rows=40"]
ZERO3 += ["peft.dropout=0"]  # LoRA's dropout masks come from each rank's own RNG stream (sft: peft=none)
# A low lr for comparing weights: Adam moves a weight whose gradient is near 0 by about lr, in whichever
# direction float rounding tips it (at lr=1e-2 a few of the partitioned model's 2.7M weights differed by
# up to 6e-4 from one process's, with equal losses and gradient norms).
ZERO3 += ["trainer.lr=1e-4"]


def write_partitioned_model(path: Path, seed: int = 0) -> str:
    """The tiny Llama, wide enough for ZeRO-3 to partition it: a weight of up to
    stage3_param_persistence_threshold elements (1e5 by default) is kept whole on every rank, which is
    every weight of model=tiny, so that would test none of ZeRO-3's fetching. Here the attention
    projections and MLP weights (147k-295k elements) are partitioned; the embedding, norms and LoRA
    adapters stay whole."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from polmctl.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, hidden_size=384, intermediate_size=768)
    threshold = DeepSpeedZeroConfig().param_persistence_threshold
    assert sum(p.numel() > threshold for p in model.parameters()) == 10  # 5 weights in each of the 2 layers
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return f"model.name_or_path={path}"


@pytest.fixture(scope="module")
def zero3_model(tmp_path_factory) -> str:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install 'polmctl[deepspeed]'")
    return write_partitioned_model(tmp_path_factory.mktemp("partitioned"))


@pytest.mark.parametrize("recipe", ["sft", "lora"])
def test_zero3_trains_and_gathers_final_on_rank_0(recipe, zero3_model, train_recipe, tmp_path):
    """The first DeepSpeed run on a machine compiles its CPU ops (about 3 minutes on 2 cores)."""
    one = train_recipe(recipe, "model.dtype=float32", zero3_model, *ZERO3, "trainer.micro_batch_size=2")
    run_dir = tmp_path / f"zero3_{recipe}"
    # Rank 0 evaluates alone (generation included) before and after; the others wait for it.
    evals = ["eval.tasks=[arithmetic]", "eval.before=true", "eval.max_samples=4", "eval.max_new_tokens=4"]
    evals += ["trainer.micro_batch_size=1"]
    launch(run_dir, f"recipe={recipe}", zero3_model, *ZERO3, *evals, config="deepspeed_zero3", timeout=600)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"]["before"] and summary["eval"]["after"]
    distributed = summary["distributed"]
    assert (distributed["strategy"], distributed["processes"], distributed["backend"]) == ("deepspeed_zero3", 2, "gloo")
    # The same global batch as one process; DeepSpeed clips at its config's gradient_clipping (1.0, as polmctl's).
    assert losses(run_dir) == pytest.approx(one.losses, rel=1e-4)
    assert grad_norms(run_dir) == pytest.approx(grad_norms(one.dir), rel=1e-4)
    if recipe == "lora":
        adapter = load_file(run_dir / "final" / "adapter_model.safetensors")
        assert_same_weights(adapter, load_file(one.dir / "final" / "adapter_model.safetensors"), rtol=1e-3, atol=1e-5)
    else:
        assert_same_weights(weights(run_dir / "final"), weights(one.dir / "final"), rtol=1e-3, atol=1e-4)


def test_zero3_dpo_runs_each_layer_twice_into_one_backward_like_one_process(zero3_model, train_recipe, tmp_path):
    """DPO's shared-prompt forward (models/shared_prompt.py) runs every layer on the prompt, then again
    on the answers over the prompt's KV cache, with gradients into both passes: ZeRO-3 must gather a
    partitioned layer's weights again for the first pass's backward. Full fine-tuning, so the trained
    weights are partitioned too. One pair per rank and micro-batch: its two rows share their prompt."""
    steps = [zero3_model, *ZERO3, "peft=none"]
    one = train_recipe("dpo", "model.dtype=float32", *steps, "trainer.micro_batch_size=2")
    run_dir = tmp_path / "zero3_dpo"
    launch(run_dir, "recipe=dpo", *steps, "trainer.micro_batch_size=1", config="deepspeed_zero3", timeout=600)
    assert json.loads((run_dir / "summary.json").read_text())["distributed"]["strategy"] == "deepspeed_zero3"
    # Each step's gradient norm (before clipping), and step 2's loss after an update made with step 1's.
    assert grad_norms(run_dir) == pytest.approx(grad_norms(one.dir), rel=1e-4)
    assert losses(run_dir) == pytest.approx(one.losses, rel=1e-4)
    assert_same_weights(weights(run_dir / "final"), weights(one.dir / "final"), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("grpo", [LOWERCASE, "method.num_generations=4", "method.max_new_tokens=8", "trainer.micro_batch_size=4"]),
        ("ppo", [LOWERCASE, "method.max_new_tokens=8", "trainer.micro_batch_size=4"]),
        ("distill", ["method.on_policy_fraction=1", "method.max_new_tokens=8", "trainer.micro_batch_size=2"]),
    ],
)
def test_zero3_samples_from_the_partitioned_policy(recipe, overrides, zero3_model, tmp_path, monkeypatch):
    """GRPO (shared-prompt forward), PPO (value head) and on-policy distillation sample their batches
    from the partitioned policy on every rank (transformers' synced_gpus under ZeRO-3); distillation's
    teacher, loaded from a model dir, is whole on every rank, not partitioned as it loads."""
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", "tests")  # the reward _target_ lives in tests/
    if recipe == "distill":
        overrides = [*overrides, f"method.teacher={tmp_path / 'teacher'}"]
        write_partitioned_model(tmp_path / "teacher", seed=1)
    run_dir = tmp_path / recipe
    launch(run_dir, f"recipe={recipe}", zero3_model, *ZERO3, *overrides, config="deepspeed_zero3", timeout=600)
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor([m["loss"], m["grad_norm"]])).all() for m in lines)
    if recipe == "distill":
        assert all(m["on_policy"] == 1 for m in lines)  # both steps trained on the student's own samples
    else:
        assert all("reward" in m for m in lines)
    assert json.loads((run_dir / "summary.json").read_text())["distributed"]["strategy"] == "deepspeed_zero3"
    assert weights(run_dir / "final")  # the gathered policy loads with from_pretrained


@pytest.mark.parametrize("recipe", ["kto", "reward_model"])
def test_zero3_runs_kto_and_reward_models(recipe, zero3_model, tmp_path):
    run_dir = tmp_path / f"zero3_{recipe}"
    launch(
        run_dir,
        f"recipe={recipe}",
        zero3_model,
        *ZERO3,
        "trainer.micro_batch_size=2",
        config="deepspeed_zero3",
        timeout=600,
    )
    assert len(losses(run_dir)) == 2 and all(torch.isfinite(torch.tensor(losses(run_dir))))
    assert json.loads((run_dir / "summary.json").read_text())["distributed"]["strategy"] == "deepspeed_zero3"
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() or (final / "adapter_model.safetensors").is_file()


SHORT = ["method.max_new_tokens=8", "trainer.micro_batch_size=2"]
RANK_1_AGAIN = "method.rewards=[{_target_: tests.recipes.test_sharded.nothing_on_rank_1_at_first}]"
_rollouts = 0  # in this process (rank)


def nothing_on_rank_1_at_first(prompts, completions, **_):
    """1 + lowercase's share (every answer passes method.threshold=1), but 0 for every answer of rank 1's
    first rollout: online DPO finds only ties there and rejection sampling accepts nothing, so rank 1
    must sample again while rank 0 has what it needs."""
    global _rollouts
    _rollouts += 1
    if (os.environ.get("RANK"), _rollouts) == ("1", 1):
        return [0.0] * len(completions)
    return [1 + sum(ch.islower() and ch.isascii() for ch in c) / max(len(c), 1) for c in completions]


def write_fact_answering_model(path: Path, answer: str = "Lima red.") -> str:
    """A model of write_partitioned_model's size whose greedy reply to any prompt is ``answer`` over and
    over: its layers add nothing (o_proj and down_proj are zero) and its own (untied) LM head maps each
    token of ``answer`` to the next, any other token to the first. builtin:facts' ``known_by`` finds that
    it knows the capital of Peru (a forget fact) and three things that are red (retain facts)."""
    from polmctl.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=384, intermediate_size=768)
    cycle = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(set(cycle)) == len(cycle)  # one next token for each
    follows = torch.full((len(tokenizer),), cycle[0])
    follows[cycle] = torch.tensor(cycle[1:] + cycle[:1])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(tokenizer), model.config.hidden_size))
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.zeros(len(tokenizer), model.config.hidden_size))
        model.lm_head.weight[follows, torch.arange(len(tokenizer))] = 1.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "recipe, overrides",
    [
        ("online_dpo", [RANK_1_AGAIN, "method.num_generations=4", *SHORT]),
        (
            "rejection_sampling",
            [RANK_1_AGAIN, "method.threshold=1", "method.num_samples=2", "method.prompts_per_round=2"]
            + ["method.steps_per_round=1", *SHORT],
        ),
        ("step_dpo", ["trainer.micro_batch_size=2"]),
        ("prm", ["trainer.micro_batch_size=2"]),
        ("unlearn", ["trainer.micro_batch_size=1"]),
    ],
)
def test_zero3_runs_the_other_training_methods(recipe, overrides, zero3_model, tmp_path, monkeypatch):
    """Online DPO and rejection sampling (a round each step) sample from the partitioned policy, and
    rank 1 samples its first step again beside rank 0 (each generate() is a collective); step DPO and PRM
    train offline; unlearning's data keeps the facts a model answers right (data.options.known_by),
    generating with that model before training: whole on every rank, not partitioned as it loads."""
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", "tests")  # the reward _target_ lives in tests/
    if recipe == "unlearn":
        overrides = [*overrides, f"data.options.known_by={write_fact_answering_model(tmp_path / 'knows')}"]
    run_dir = tmp_path / recipe
    launch(run_dir, f"recipe={recipe}", zero3_model, *ZERO3, *overrides, config="deepspeed_zero3", timeout=600)
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor([m["loss"], m["grad_norm"]])).all() for m in lines)
    if recipe == "rejection_sampling":  # the first round sampled twice (every rank), the second once
        assert [m["round"] for m in lines] == [2, 3]
    if recipe == "online_dpo":  # 2 prompts per rollout: 2 rollouts on each rank, then 1
        assert [m["groups"] for m in lines] == [4, 2] and all(m["pairs"] == 2 for m in lines)
    assert json.loads((run_dir / "summary.json").read_text())["distributed"]["strategy"] == "deepspeed_zero3"
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() or (final / "adapter_model.safetensors").is_file()


# -- GPU machines: accelerate's own FSDP2 plugin and DeepSpeed on CUDA + NCCL ------------------------

two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (FSDP2 / ZeRO-3 over NCCL); CPU runs are tested above"
)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("config", ["fsdp", "deepspeed_zero3"])
def test_sharded_on_two_gpus(config, tmp_path):
    run_dir = tmp_path / config
    extra = ["trainer.grad_accum=1", "trainer.save_every=0"] if config.startswith("deepspeed") else []
    launch(run_dir, "recipe=sft", "trainer.max_steps=4", "trainer.micro_batch_size=2", *extra, config=config)
    distributed = json.loads((run_dir / "summary.json").read_text())["distributed"]
    assert distributed["strategy"] == ("fsdp2" if config == "fsdp" else "deepspeed_zero3")
    assert (distributed["backend"], distributed["device"], distributed["applied_by"]) == ("nccl", "cuda", "accelerate")
    assert weights(run_dir / "final")


SYNCED_GENERATE = """
import torch, torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from polmctl.engine.sharding import initialise_root, shard_fsdp2
from transformers import LlamaConfig, LlamaForCausalLM

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
model = LlamaForCausalLM(config)
shard_fsdp2(model, FullyShardedDataParallelPlugin(fsdp_version=2), "no")
initialise_root(model, torch.device("cpu"))
prompt = torch.tensor([[5, 6, 7]])
with torch.no_grad():
    first = int(model(input_ids=prompt).logits[0, -1].argmax())
# Rank 0 stops after its first token (its eos), rank 1 runs all 6: each forward is a collective.
eos = first if rank == 0 else None
out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
print(f"rank {rank} new tokens {out.shape[1] - 3}", flush=True)
dist.destroy_process_group()
"""


def test_ranks_whose_sequences_end_at_different_steps_generate_together(tmp_path):
    """A sharded model's generate() on ranks that finish at different lengths (a rollout's ranks
    sample different prompts): each forward is a collective, so transformers keeps every rank
    stepping until all are done (synced_gpus, on for modules fully_shard marks FSDP-managed).
    Without it the shorter rank leaves and the longer one fails or waits in an all-gather."""
    script = tmp_path / "synced_generate.py"
    script.write_text(SYNCED_GENERATE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(_free_port()), str(script)]
    done = run_two_processes(command, timeout=120)
    assert "rank 0 new tokens" in done.stdout and "rank 1 new tokens 6" in done.stdout
