"""The rollout server (`polmctl rollout-server`, transformers engine) and its client, over real HTTP on
the loopback interface: after a push the server's greedy completions are the trainer's, LoRA
policies push their adapter only, and bad requests get one clear line.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/rollout/test_server.py

Each test starts its own server process on a free port (``--port 0``); it is stopped when the test
ends, and stops by itself after ``--idle-timeout`` seconds if the test process dies first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from polmctl.config.schema import PeftConfig
from polmctl.data import format_prompt
from polmctl.errors import TrainingError
from polmctl.models import apply_peft
from polmctl.models.tiny import build_tiny_model
from polmctl.rollout.backends import TransformersBackend
from polmctl.rollout.client import RemoteBackend, RolloutClient
from polmctl.rollout.weights import pack
from tests.rollout.serving import Server

pytestmark = pytest.mark.unit
PROMPTS = ("hi", "a much longer prompt here", "2+2")


@pytest.fixture()
def server():
    started = Server("--engine", "transformers", "--dtype", "float32", "--idle-timeout", "600")
    yield started
    started.stop()


def call(url: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=body)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def trainer_model(tok, peft: str = "none"):
    """builtin:tiny (what the server starts from) made different, the way training would: large
    random weights (its greedy text varies), an adapter with random weights."""
    g = torch.Generator().manual_seed(1)
    model = build_tiny_model(tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = apply_peft(model, PeftConfig(method=peft, r=4), tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and peft != "none":
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def train_step(model, tok, lr: float = 0.5) -> None:
    """One optimizer step on a small batch, as the trainer's (in place: the parameters' versions move)."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = tok(["2+2=4", "hello there"], return_tensors="pt", padding=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def greedy_local(model, tok, prompts) -> list[list[int]]:
    return TransformersBackend().generate(model, tok, prompts, 1, max_new_tokens=8, do_sample=False)


def greedy_served(url: str, tok, prompts) -> list[list[int]]:
    """What the server answers now, without pushing anything first."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return RolloutClient(url, 60).generate(ids, 1, max_new_tokens=8, do_sample=False)[0]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_after_a_push_the_server_answers_as_the_trainer(server, tiny_tokenizer, peft):
    tok = tiny_tokenizer
    prompts = [format_prompt(t, tok) for t in PROMPTS]
    model = trainer_model(tok, peft)
    train_step(model, tok)
    assert greedy_served(server.url, tok, prompts) != greedy_local(model, tok, prompts)  # not synced yet

    backend = RemoteBackend(server.url, timeout=60)
    pushes: list[tuple[str, bool, int]] = []
    push = backend.client.push
    backend.client.push = lambda tensors, **kw: (
        pushes.append((kw["kind"], kw["commit"], len(tensors))) or push(tensors, **kw)
    )
    remote = backend.generate(model, tok, prompts, 1, max_new_tokens=8, do_sample=False)
    assert remote == greedy_local(model, tok, prompts) == greedy_served(server.url, tok, prompts)
    assert backend.version == 1 and call(server.url, "/health")[1]["version"] == 1
    every = len(call(server.url, "/parameters")[1]["parameters"])
    if peft == "lora":  # the first push: the base weights as the policy has them, then the adapter
        adapter = sum(1 for n, p in model.named_parameters() if "lora_" in n)
        assert pushes == [("full", False, every), ("adapter", True, adapter)]
    else:
        assert pushes == [("full", True, every)]

    # nothing changed: nothing is pushed; a step: the next rollout pushes (the adapter only, for LoRA)
    backend.generate(model, tok, prompts, 1, max_new_tokens=8, do_sample=False)
    assert len(pushes) == (2 if peft == "lora" else 1) and backend.version == 1
    train_step(model, tok)
    pushes.clear()
    remote = backend.generate(model, tok, prompts, 1, max_new_tokens=8, do_sample=False)
    assert remote == greedy_local(model, tok, prompts) and backend.version == 2
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert pushes == [("adapter" if peft == "lora" else "full", True, trainable)]
    assert call(server.url, "/health")[1]["weights"] == ("adapter" if peft == "lora" else "full")


def test_samples_are_grouped_and_follow_the_seed(server, tiny_tokenizer):
    tok, G = tiny_tokenizer, 3
    prompts = [format_prompt(t, tok) for t in PROMPTS]
    model = trainer_model(tok)
    backend = RemoteBackend(server.url, timeout=60)
    options = type("Options", (), dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, stop=[]))
    torch.manual_seed(0)
    first = backend.sample(model, tok, prompts, G, options)
    torch.manual_seed(0)
    again = backend.sample(model, tok, prompts, G, options)
    assert first == again and len(first) == len(prompts) * G and all(1 <= len(c) <= 6 for c in first)
    assert len(set(map(tuple, first))) > len(prompts)  # sampled, not G copies
    # near-zero temperature: each sample is its prompt's greedy answer, so the order shows the grouping
    options.temperature = 1e-4
    greedy = TransformersBackend().generate(model, tok, prompts, 1, max_new_tokens=6, do_sample=False)
    assert backend.sample(model, tok, prompts, G, options) == [c for c in greedy for _ in range(G)]


def test_bad_requests_get_one_line_naming_what_is_wrong(server, tiny_tokenizer):
    url = server.url
    status, health = call(url, "/health")
    assert status == 200 and health["engine"] == "transformers" and health["model"] == "builtin:tiny"
    assert health["dtype"] == "float32" and health["weights"] == "as loaded"
    assert (health["version"], health["vocab_size"], health["eos_token_id"]) == (0, len(tiny_tokenizer), 258)
    cases = [
        ("/generate", b"not json", 400, "not JSON"),
        ("/generate", b'{"prompts": [], "max_new_tokens": 2}', 400, "prompts:"),
        ("/generate", b'{"prompts": [[1, 2]], "max_new_tokens": 0}', 400, "max_new_tokens"),
        ("/generate", b'{"prompts": [[1, 2]], "max_new_tokens": 2, "top_p": 2}', 400, "top_p"),
        ("/generate", b'{"prompts": [[1, 2]], "max_new_tokens": 2, "stop": [""]}', 400, "stop:"),
        ("/generate", b'{"prompts": [[1, 2]], "max_new_tokens": 2, "version": 7}', 409, "expects weights version 7"),
        ("/weights", b"\x00" * 16, 400, "not safetensors"),
        ("/weights", pack({"nope.weight": torch.zeros(2)}, kind="full", commit="true"), 400, "does not have"),
        (
            "/weights",
            pack({"model.norm.weight": torch.zeros(3)}, kind="full", commit="true"),
            400,
            "has shape [3], the model's is [64]",
        ),
        ("/weights", pack({}, kind="pickle", commit="true"), 400, "kind 'pickle'"),
        ("/nowhere", b"{}", 404, "POST /generate, /weights"),
    ]
    for path, body, status, needle in cases:
        got, answer = call(url, path, body)
        assert (got, needle in answer["error"], "\n" in answer["error"]) == (status, True, False), (path, answer)
    assert call(url, "/health")[1]["version"] == 0  # nothing was committed
    status, answer = call(url, "/generate", b'{"prompts": [[1, 2]], "max_new_tokens": 2, "version": 0}')
    assert status == 200 and answer["version"] == 0 and len(answer["completions"]) == 1


def test_the_client_names_the_key_when_no_server_answers(tiny_tokenizer):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    backend = RemoteBackend(f"http://127.0.0.1:{port}", timeout=1.0)
    with pytest.raises(TrainingError, match="method.vllm_server_url: no rollout server answered .* within 1 s"):
        backend.generate(trainer_model(tiny_tokenizer), tiny_tokenizer, ["hi"], max_new_tokens=2)


def test_a_server_of_another_model_is_refused_before_any_push(server, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id)
    )  # fmt: skip
    with pytest.raises(TrainingError, match="serves builtin:tiny, and the policy (lacks its weights|has other shapes)"):
        RemoteBackend(server.url, timeout=60).generate(other, tok, ["hi"], max_new_tokens=2)
    assert call(server.url, "/health")[1]["version"] == 0


def test_the_server_stops_by_itself_when_idle():
    started = Server("--engine", "transformers", "--idle-timeout", "1")
    try:
        assert started.proc.wait(timeout=30) == 0
    finally:
        started.stop()
    assert "no request for 1 s, stopping" in started.rest()
    # its default dtype is the trainer's (model.dtype=auto_gpu): float32 on a CPU, even one with fast bf16
    assert "builtin:tiny (float32) on http://" in started.output


@pytest.mark.parametrize("option,value", [("--dtype", "auto16"), ("--engine", "onnx")])
def test_a_bad_option_is_one_line_before_anything_loads(option, value):
    done = subprocess.run(
        [sys.executable, "-m", "polmctl", "rollout-server", "builtin:tiny", option, value, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and f"{option} {value}: choose one of" in done.stderr, done.stderr


def test_vllm_engine_asked_for_without_vllm_is_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "polmctl", "rollout-server", "builtin:tiny", "--engine", "vllm", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    import importlib.util

    if importlib.util.find_spec("vllm") and torch.cuda.is_available():
        pytest.skip("vLLM and CUDA are here: the engine would start")
    assert done.returncode == 2
    assert "--engine vllm" in done.stderr and ("not installed" in done.stderr or "CUDA" in done.stderr)
