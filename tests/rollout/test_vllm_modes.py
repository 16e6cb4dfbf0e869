"""method.generation_backend=vllm in its two modes: colocate (vLLM in the training process, asleep
between rollouts with method.vllm_sleep_mode) and server (a `polmctl rollout-server`). The options
are checked before anything loads; vLLM itself is faked here, and the real engine is the GPU check
at the end (skipped, with the reason, without vLLM and CUDA).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/rollout/test_vllm_modes.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from polmctl.compose import compose_validated
from polmctl.data import format_prompt
from polmctl.errors import ConfigError
from polmctl.rollout import server as server_module
from polmctl.rollout.backends import TransformersBackend, VLLMBackend, make_backend, vllm_sampling_params
from polmctl.rollout.client import RemoteBackend, trains_plain_lora
from tests.rollout.test_backends import TEXTS, FakeEngine, fake_vllm_backend, options, varied_model

pytestmark = pytest.mark.unit
HAS_VLLM_GPU = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
NEEDS_VLLM_GPU = pytest.mark.skipif(not HAS_VLLM_GPU, reason="needs vLLM (pip install 'polmctl[vllm]') and a CUDA GPU")


@pytest.mark.parametrize(
    "overrides,key,needle",
    [
        (["method.vllm_mode=remote"], "method.vllm_mode", "colocate, server"),
        (["method.vllm_mode=server"], "method.vllm_mode", "generation_backend=vllm"),
        (["method.vllm_sleep_mode=true"], "method.vllm_sleep_mode", "vllm_mode=colocate"),
        (
            ["method.generation_backend=vllm", "method.vllm_mode=server", "method.vllm_sleep_mode=true"],
            "method.vllm_sleep_mode",
            "keeps its own engine",
        ),
        (
            ["method.generation_backend=vllm", "method.vllm_mode=server", "method.vllm_server_url=localhost:8000"],
            "method.vllm_server_url",
            "http://host:port",
        ),
        (
            ["method.generation_backend=vllm", "method.vllm_mode=server", "method.vllm_server_url=http://h:80/v1"],
            "method.vllm_server_url",
            "http://host:port",
        ),
        (["method.vllm_server_timeout=0"], "method.vllm_server_timeout", ""),
    ],
)
def test_vllm_options_are_checked_naming_the_key(overrides, key, needle):
    with pytest.raises(ConfigError, match=key) as err:
        compose_validated(["recipe=grpo", *overrides])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_defaults_and_a_server_config_validate():
    run, _ = compose_validated(["recipe=grpo"])
    m = run.method
    assert (m.generation_backend, m.vllm_mode, m.vllm_server_url, m.vllm_sleep_mode) == (
        "transformers",
        "colocate",
        "http://127.0.0.1:8000",
        False,
    )
    for recipe in ("grpo", "ppo", "rejection_sampling", "online_dpo", "distill"):
        run, _ = compose_validated(
            [f"recipe={recipe}", "method.generation_backend=vllm", "method.vllm_mode=server",
             "method.vllm_server_url=http://node7:8001"]
        )  # fmt: skip
        assert run.method.vllm_server_url == "http://node7:8001"


def test_server_mode_needs_neither_vllm_nor_cuda_in_the_trainer(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` would raise ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend = make_backend(
        options(generation_backend="vllm", vllm_mode="server", vllm_server_url="http://h:1", vllm_server_timeout=7.0)
    )
    assert isinstance(backend, RemoteBackend) and (backend.client.url, backend.client.timeout) == ("http://h:1", 7.0)
    assert isinstance(make_backend(options(generation_backend="transformers")), TransformersBackend)


class SleepyEngine(FakeEngine):
    """FakeEngine that also records vLLM's sleep / wake_up calls, in order with loads and generates."""

    def __init__(self, outputs):
        super().__init__(outputs)
        self.calls: list[str] = []
        load = self.llm_engine.model_executor.driver_worker.model_runner.model.load_weights
        worker = self.llm_engine.model_executor.driver_worker
        worker.model_runner.model.load_weights = lambda pairs: (self.calls.append("load"), load(pairs))

    def sleep(self, level):
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags):
        self.calls.append("wake " + ",".join(tags))

    def reset_prefix_cache(self):
        self.calls.append("reset")
        super().reset_prefix_cache()

    def generate(self, requests, sampling_params, use_tqdm):
        self.calls.append("generate")
        return super().generate(requests, sampling_params, use_tqdm)


def test_colocate_sleep_mode_wakes_loads_samples_and_sleeps_in_that_order(tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    outputs = [SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[5, eos], finish_reason="stop",
                                                         stop_reason=None)])]  # fmt: skip
    engine = SleepyEngine(outputs)
    backend = fake_vllm_backend(engine)
    backend.sleep_mode = True
    model = varied_model(tok, "lora")
    ids = backend.sample(model, tok, [format_prompt("hi", tok)], 1, options(max_new_tokens=2))
    assert ids == [[5, eos]]
    loads = engine.calls.count("load")
    assert loads > 0
    assert engine.calls == ["wake weights", *["load"] * loads, "reset", "wake kv_cache", "generate", "sleep 2"]
    # asleep also when sampling fails, so training gets its memory back
    engine.calls.clear()
    engine.generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        backend.sample(model, tok, [format_prompt("hi", tok)], 1, options(max_new_tokens=2))
    assert engine.calls[-1] == "sleep 2"
    # without sleep mode: load and generate, nothing else
    engine = SleepyEngine(outputs)
    plain = fake_vllm_backend(engine)
    plain.sample(model, tok, [format_prompt("hi", tok)], 1, options(max_new_tokens=2))
    assert [c for c in engine.calls if c != "load"] == ["reset", "generate"]


def test_colocate_sleep_mode_starts_vllm_asleep(tiny_tokenizer, monkeypatch, tmp_path):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.setenv(name, "x")  # restored after the test: the engine's start sets them
        monkeypatch.delenv(name)
    made = []

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.calls = kwargs, []
            made.append(self)

        def sleep(self, level):
            self.calls.append(("sleep", level))

    backend = object.__new__(VLLMBackend)
    backend.vllm = SimpleNamespace(LLM=LLM)
    backend.gpu_memory_utilization, backend.max_model_len, backend.sleep_mode = 0.3, None, True
    model = varied_model(tiny_tokenizer)
    model.config._name_or_path = str(tmp_path)
    backend._start(model)
    [llm] = made
    assert llm.kwargs["enable_sleep_mode"] is True and llm.kwargs["model"] == str(tmp_path)
    assert llm.calls == [("sleep", 2)]
    backend.vllm = SimpleNamespace(LLM=type("OldLLM", (), {}))  # a vLLM without sleep mode: one clear line
    with pytest.raises(Exception, match="method.vllm_sleep_mode=true: this vLLM has no sleep mode"):
        backend._start(model)


def test_vllm_sampling_params_follow_the_transformers_knobs():
    fake = SimpleNamespace(SamplingParams=lambda **kw: kw)
    sampled = vllm_sampling_params(fake, 3, max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=4, stop=["x"], seed=11)
    assert sampled == dict(
        n=3, temperature=0.7, top_p=0.9, top_k=4, max_tokens=5, stop=["x"], include_stop_str_in_output=True, seed=11
    )
    greedy = vllm_sampling_params(fake, 1, max_new_tokens=5, do_sample=False, temperature=0.7, top_k=4)
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"], greedy["stop"]) == (0.0, 1.0, -1, None)
    assert "seed" not in greedy


def test_only_a_plain_lora_policy_pushes_an_adapter(tiny_tokenizer):
    assert trains_plain_lora(varied_model(tiny_tokenizer, "lora"))
    assert not trains_plain_lora(varied_model(tiny_tokenizer, "dora"))
    assert not trains_plain_lora(varied_model(tiny_tokenizer, "ia3"))
    assert not trains_plain_lora(varied_model(tiny_tokenizer))


def test_the_vllm_server_engine_serves_each_adapter_version_from_its_own_dir(tiny_tokenizer, monkeypatch):
    """VLLMEngine without vLLM: its adapter bookkeeping (rank check, one dir and LoRARequest per version,
    old dirs removed) against a fake LLM; the real engine is test_vllm_server_engine_serves_the_pushed_policy."""
    requests_module = types.ModuleType("vllm.lora.request")
    requests_module.LoRARequest = lambda name, int_id, path: SimpleNamespace(name=name, id=int_id, path=path)
    for name, module in (("vllm", types.ModuleType("vllm")), ("vllm.lora", types.ModuleType("vllm.lora"))):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", requests_module)
    engine = object.__new__(server_module.VLLMEngine)
    resets = []
    engine.llm = SimpleNamespace(reset_prefix_cache=lambda: resets.append(1))
    engine.max_lora_rank, engine._staged, engine.lora = 8, None, None
    import tempfile
    from pathlib import Path

    engine._adapters = Path(tempfile.mkdtemp())
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64)}
    with pytest.raises(server_module.Refused, match="rank 16: start the server with --max-lora-rank 16"):
        engine.load_adapter(tensors, {"r": 16})
    for version in (1, 2, 3):
        engine.load_adapter(tensors, {"r": 4, "peft_type": "LORA"})
        engine.commit(version)
        assert (engine.lora.name, engine.lora.id) == (f"policy-v{version}", version)
        assert json.loads((Path(engine.lora.path) / "adapter_config.json").read_text())["r"] == 4
        loaded = load_file(str(Path(engine.lora.path) / "adapter_model.safetensors"))
        assert torch.equal(loaded[next(iter(tensors))], torch.ones(4, 64))
    assert sorted(p.name for p in engine._adapters.iterdir()) == ["v2", "v3"]  # the one in use and the one before
    assert len(resets) == 3


# -- GPU checks: a real vLLM ----------------------------------------------------------------------


def _train_step(model, tok):
    from tests.rollout.test_server import train_step

    train_step(model, tok)


@pytest.mark.gpu
@NEEDS_VLLM_GPU
def test_vllm_colocate_sleep_mode_frees_its_memory_and_samples_the_current_policy(tiny_tokenizer, tmp_path):
    from polmctl.rollout.generate import generate

    tok = tiny_tokenizer
    model = varied_model(tok, "lora")
    model.get_base_model().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model.get_base_model().config._name_or_path = str(tmp_path)
    model = model.cuda()
    prompts = [format_prompt(t, tok) for t in TEXTS]
    backend = make_backend(options(generation_backend="vllm", vllm_sleep_mode=True, vllm_gpu_memory_utilization=0.3))

    def check_sample() -> None:  # near-greedy: the first token of each sample is the policy's argmax
        cold = backend.sample(model, tok, prompts, 2, options(temperature=1e-4, max_new_tokens=4))
        expected = generate(model, tok, prompts, max_new_tokens=1, decode=False)
        assert [c[:1] for c in cold] == [e for e in expected for _ in range(2)]

    check_sample()  # starts the engine
    awake = []
    real = backend.llm.generate

    def generate_noting_free_memory(*args, **kwargs):
        awake.append(torch.cuda.mem_get_info()[0])
        return real(*args, **kwargs)

    backend.llm.generate = generate_noting_free_memory
    _train_step(model, tok)
    check_sample()  # woken, loaded with the new weights, asleep again
    free, total = torch.cuda.mem_get_info()
    assert len(awake) == 1 and free > awake[0] + 0.1 * total  # its KV cache (0.3 of the GPU) went back


@pytest.mark.gpu
@NEEDS_VLLM_GPU
def test_vllm_server_engine_serves_the_pushed_policy(tiny_tokenizer):
    from tests.rollout.serving import Server
    from tests.rollout.test_server import greedy_local, trainer_model

    tok = tiny_tokenizer
    started = Server("--engine", "vllm", "--dtype", "float32", "--max-lora-rank", "8",
                     "--gpu-memory-utilization", "0.3", "--idle-timeout", "600")  # fmt: skip
    try:
        assert "vllm engine" in started.output
        prompts = [format_prompt(t, tok) for t in TEXTS]
        model = trainer_model(tok, "lora").cuda()
        backend = RemoteBackend(started.url, timeout=300)
        for _ in range(2):  # the first push (base + adapter), then an adapter-only one
            remote = backend.generate(model, tok, prompts, 1, max_new_tokens=4, do_sample=False)
            local = greedy_local(model, tok, prompts)
            # vLLM's kernels are not transformers': the first token (the widest margin) must agree
            assert [r[:1] for r in remote] == [x[:1] for x in local]
            _train_step(model, tok)
        assert backend.version == 2
    finally:
        started.stop()
