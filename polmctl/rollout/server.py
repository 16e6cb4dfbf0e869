"""``polmctl rollout-server MODEL``: a model served for rollouts over HTTP, whose weights the trainer
replaces as it trains (``method.generation_backend=vllm method.vllm_mode=server``).

    polmctl rollout-server builtin:smollm2-135m                       # http://127.0.0.1:8000
    polmctl rollout-server Qwen/Qwen2.5-1.5B-Instruct --max-lora-rank 64 --gpu-memory-utilization 0.9
    polmctl rollout-server outputs/sft/2026-12-01/10-00-00 --engine transformers --port 8001

The engine is vLLM when it is installed and a CUDA GPU is present (``--engine vllm`` insists on it),
else transformers: the same ``TransformersBackend`` the trainer samples with, on the GPU or the
CPU. The protocol (polmctl's own: JSON, and safetensors bytes for weights) is described in
polmctl/rollout/client.py. The server listens on the loopback interface unless ``--host`` says
otherwise; whoever reaches its port can replace the weights it serves. It stops on Ctrl-C or
SIGTERM, or by itself after ``--idle-timeout`` seconds without a request.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import torch

from polmctl.errors import CommandError
from polmctl.models.precision import check_dtype_flag, choose_dtype
from polmctl.rollout.backends import (
    VLLM_MISSING,
    TransformersBackend,
    import_vllm,
    start_vllm,
    vllm_completions,
    vllm_model,
    vllm_sampling_params,
)
from polmctl.rollout.client import PROTOCOL
from polmctl.rollout.weights import base_weights, shapes, unpack

ENGINES = ("auto", "vllm", "transformers")
MAX_JSON_BODY = 256 * 2**20
MAX_WEIGHTS_BODY = 16 * 2**30


class Refused(ValueError):
    """A request the server cannot take, answered with ``status`` and one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# -- engines --------------------------------------------------------------------------------------


class TransformersEngine:
    """The model in this process with transformers, sampled by ``TransformersBackend`` (LoRA merged
    for sampling, one prefill per prompt shared by its samples): the trainer's own sampling code."""

    name = "transformers"

    def __init__(self, name_or_path: str, *, device: str, dtype: str):
        from polmctl.config.schema import ModelConfig
        from polmctl.models import load_model, load_tokenizer

        cfg = ModelConfig(name_or_path=name_or_path, dtype=dtype)
        model = load_model(cfg, device=_device(device), for_training=False)
        if hasattr(model, "merge_and_unload"):  # a run dir holding an adapter: its merged model is served
            model = model.merge_and_unload()
        self.model, self.tokenizer = model, load_tokenizer(cfg)
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.weights = dict(base_weights(model))  # base name -> parameter; still theirs once peft wraps them
        self.adapter_config: dict | None = None

    def parameters(self) -> dict[str, list[int]]:
        return shapes(self.weights.items())

    @torch.no_grad()
    def load_full(self, tensors: dict[str, torch.Tensor]) -> None:
        _check_names(tensors, self.parameters())
        for name, tensor in tensors.items():
            self.weights[name].copy_(tensor)

    @torch.no_grad()
    def load_adapter(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        if self.adapter_config is None:
            self._wrap(config)
        elif config != self.adapter_config:
            raise Refused("an adapter of another shape than the first one pushed; restart the server", 409)
        expected = set(get_peft_model_state_dict(self.model))
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)[:3]
            raise Refused(f"the adapter's tensors do not match its config ({odd} ...)")
        set_peft_model_state_dict(self.model, tensors)

    def _wrap(self, config: dict) -> None:
        from peft import get_peft_config, get_peft_model

        from polmctl.models.fused_lora import fuse_lora_layers

        # The weights come next: no initialisation that would rewrite the base (PiSSA, OLoRA, LoftQ, EVA).
        settings = {k: v for k, v in config.items() if k not in ("loftq_config", "eva_config", "corda_config")}
        settings.update(init_lora_weights=True, inference_mode=True)
        try:
            peft_config = get_peft_config(settings)
        except (KeyError, TypeError, ValueError) as err:
            raise Refused(f"not a peft adapter config: {err}") from None
        self.model = get_peft_model(self.model, peft_config)
        fuse_lora_layers(self.model)  # the forward the trainer's LoRA layers run (models/fused_lora.py)
        self.model.eval()
        self.adapter_config = config

    def commit(self, version: int) -> None:
        pass  # pushed tensors went straight into the model

    def generate(self, prompts: list[list[int]], n: int, knobs: dict, seed: int | None) -> list[list[int]]:
        if seed is not None:
            torch.manual_seed(seed)  # under the server's lock: one request at a time draws from it
        return TransformersBackend().generate(self.model, self.tokenizer, prompts, n, **knobs)


class VLLMEngine:
    """A vLLM engine in this process (one GPU). Full weights go into it with its ``load_weights``,
    a LoRA adapter is written to a dir and served as a ``LoRARequest`` (``--max-lora-rank`` > 0)."""

    name = "vllm"

    def __init__(
        self,
        name_or_path: str,
        *,
        dtype: str,
        gpu_memory_utilization: float,
        max_model_len: int | None,
        max_lora_rank: int,
    ):
        from polmctl.config.schema import ModelConfig
        from polmctl.models import load_tokenizer, resolve_model_path

        self.vllm = import_vllm()
        if not torch.cuda.is_available():
            raise CommandError("--engine vllm: vLLM needs a CUDA GPU and none is available; use --engine transformers")
        path = resolve_model_path(name_or_path)
        if (Path(path) / "adapter_config.json").exists():
            raise CommandError(
                f"{name_or_path} holds a peft adapter; vLLM serves a whole model: export it merged "
                "(polmctl export RUN --merge-adapters --out DIR) and serve DIR, or use --engine transformers"
            )
        extra = dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1) if max_lora_rank else {}
        # polmctl's auto dtypes resolved as the trainer resolves them on this GPU (vLLM's own "auto"
        # serves a float32 checkpoint in half precision, whatever the GPU)
        dtype = str(choose_dtype(dtype, torch.device("cuda"))[0]).removeprefix("torch.")
        self.llm = start_vllm(
            self.vllm,
            path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            **extra,
        )
        self.tokenizer = load_tokenizer(ModelConfig(name_or_path=name_or_path))
        self.dtype, self.max_lora_rank = dtype, max_lora_rank
        self._shapes = _architecture_shapes(path)
        self._adapters = Path(tempfile.mkdtemp(prefix="polmctl-rollout-adapters-"))
        self._staged: tuple[dict, dict] | None = None
        self.lora = None

    def parameters(self) -> dict[str, list[int]]:
        return self._shapes

    def load_full(self, tensors: dict[str, torch.Tensor]) -> None:
        _check_names(tensors, self._shapes)
        vllm_model(self.llm).load_weights(list(tensors.items()))

    def load_adapter(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        rank = max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])
        if not self.max_lora_rank or rank > self.max_lora_rank:
            raise Refused(
                f"a LoRA adapter of rank {rank}: start the server with --max-lora-rank {rank} or more "
                f"(now {self.max_lora_rank}; 0: no LoRA)"
            )
        self._staged = (tensors, config)

    def commit(self, version: int) -> None:
        if self._staged is not None:
            from safetensors.torch import save_file
            from vllm.lora.request import LoRARequest

            tensors, config = self._staged
            target = self._adapters / f"v{version}"
            target.mkdir()
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(target / "adapter_model.safetensors"))
            (target / "adapter_config.json").write_text(json.dumps(config))
            # A new id per version: vLLM caches adapters by id (max_loras=1 evicts the old one).
            self.lora, self._staged = LoRARequest(f"policy-v{version}", version, str(target)), None
            for old in self._adapters.iterdir():
                if old.name not in (target.name, f"v{version - 1}"):
                    shutil.rmtree(old, ignore_errors=True)
        self.llm.reset_prefix_cache()  # cached prompt states belong to the old weights

    def generate(self, prompts: list[list[int]], n: int, knobs: dict, seed: int | None) -> list[list[int]]:
        params = vllm_sampling_params(self.vllm, n, seed=seed, **knobs)
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False, lora_request=self.lora)
        return vllm_completions(outputs, self.tokenizer, knobs.get("stop", ()))


def _architecture_shapes(path: str) -> dict[str, list[int]]:
    """The base model's weight names and shapes, from its config on the meta device (no memory):
    vLLM's own modules fuse and rename them, ``load_weights`` takes these."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return shapes(base_weights(model))


def _check_names(tensors: dict[str, torch.Tensor], known: dict[str, list[int]]) -> None:
    unknown = [n for n in tensors if n not in known]
    if unknown:
        raise Refused(f"weights this model does not have: {unknown[:3]} (GET /parameters lists its weights)")
    differ = [n for n, t in tensors.items() if list(t.shape) != known[n]]
    if differ:
        n = differ[0]
        raise Refused(f"weight {n} has shape {list(tensors[n].shape)}, the model's is {known[n]}")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def make_engine(
    name_or_path: str,
    engine: str = "auto",
    *,
    device: str = "auto",
    dtype: str = "auto_gpu",
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    max_lora_rank: int = 0,
):
    """The engine ``engine`` names; auto: vLLM when it is installed and CUDA is present, else transformers.
    ``dtype`` as ``model.dtype`` (its default, auto_gpu, is what the trainer picks by default)."""
    if engine not in ENGINES:
        raise CommandError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    check_dtype_flag(dtype)
    if engine == "auto":
        import importlib.util

        engine = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "transformers"
    if engine == "vllm":
        try:
            import_vllm()
        except Exception:
            raise CommandError("--engine vllm: " + VLLM_MISSING.split(": ", 1)[1]) from None
        return VLLMEngine(
            name_or_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            max_lora_rank=max_lora_rank,
        )
    return TransformersEngine(name_or_path, device=device, dtype=dtype)


# -- HTTP -----------------------------------------------------------------------------------------


class RolloutServer(ThreadingHTTPServer):
    """The protocol over one engine: requests are answered on threads, and the engine is used by
    one at a time (a lock), so a push never lands in the middle of a rollout."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine, model: str, *, verbose: bool = False):
        super().__init__(address, _Handler)
        self.engine, self.model, self.verbose = engine, model, verbose
        self.lock = threading.Lock()
        self.version = 0  # pushes committed
        self.weights = "as loaded"  # what was last pushed: full | adapter
        self.last_request = time.monotonic()

    def health(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "engine": self.engine.name,
            "model": self.model,
            "dtype": self.engine.dtype,
            "version": self.version,
            "weights": self.weights,
            "vocab_size": len(self.engine.tokenizer),
            "eos_token_id": self.engine.tokenizer.eos_token_id,
        }

    def generate(self, request: dict) -> dict[str, Any]:
        prompts, n, knobs, seed, expected = _generate_request(request)
        with self.lock:
            if expected is not None and expected != self.version:
                raise Refused(
                    f"the request expects weights version {expected}, this server holds {self.version} "
                    "(another trainer pushing to it?)",
                    409,
                )
            return {"completions": self.engine.generate(prompts, n, knobs, seed), "version": self.version}

    def push(self, body: bytes) -> dict[str, Any]:
        try:
            tensors, meta = unpack(body)
        except ValueError as err:
            raise Refused(str(err)) from None
        kind, commit = meta.get("kind"), meta.get("commit") == "true"
        with self.lock:
            if kind == "full":
                self.engine.load_full(tensors)
            elif kind == "adapter":
                try:
                    config = json.loads(meta.get("adapter_config", ""))
                except ValueError:
                    raise Refused("an adapter push needs its peft config as JSON in adapter_config") from None
                self.engine.load_adapter(tensors, config)
            else:
                raise Refused(f"weights of kind {kind!r}: full | adapter")
            if commit:
                self.engine.commit(self.version + 1)
                self.version += 1
                self.weights = kind
            return {"version": self.version}


def _generate_request(request: Any) -> tuple[list[list[int]], int, dict, int | None, int | None]:
    """A /generate body, checked field by field; Refused names the field that is wrong."""
    if not isinstance(request, dict):
        raise Refused("the body must be a JSON object")
    prompts = request.get("prompts")
    if not (isinstance(prompts, list) and prompts and all(_token_ids(p) for p in prompts)):
        raise Refused("prompts: a non-empty list of non-empty lists of token ids")

    def number(name: str, default, kind, low, high=None):
        value = request.get(name, default)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if not (ok and value >= low and (high is None or value <= high)):
            raise Refused(f"{name}: {kind.__name__ if kind is int else 'a number'} >= {low}, got {value!r}")
        return value

    n = number("n", 1, int, 1)
    do_sample = request.get("do_sample", True)
    if not isinstance(do_sample, bool):
        raise Refused(f"do_sample: true or false, got {do_sample!r}")
    knobs = {
        "max_new_tokens": number("max_new_tokens", None, int, 1),
        "do_sample": do_sample,
        "temperature": number("temperature", 1.0, (int, float), 1e-6),
        "top_p": number("top_p", 1.0, (int, float), 1e-6, 1.0),
        "top_k": number("top_k", 0, int, 0),
        "stop": request.get("stop") or [],
    }
    if not (isinstance(knobs["stop"], list) and all(isinstance(s, str) and s for s in knobs["stop"])):
        raise Refused(f"stop: a list of non-empty strings, got {knobs['stop']!r}")
    seed, version = request.get("seed"), request.get("version")
    for name, value in (("seed", seed), ("version", version)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise Refused(f"{name}: null or an integer >= 0, got {value!r}")
    return prompts, n, knobs, seed, version


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and t >= 0 for t in value)


class _Handler(BaseHTTPRequestHandler):
    server: RolloutServer
    server_version = "polmctl-rollout"

    def do_GET(self) -> None:
        routes: dict[str, Callable[[], dict]] = {
            "/health": self.server.health,
            "/parameters": lambda: {"parameters": self.server.engine.parameters()},
        }
        self._answer(routes.get(self.path))

    def do_POST(self) -> None:
        if self.path == "/generate":
            self._answer(lambda: self.server.generate(_json(self._body(MAX_JSON_BODY))))
        elif self.path == "/weights":
            self._answer(lambda: self.server.push(self._body(MAX_WEIGHTS_BODY)))
        else:
            self._answer(None)

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise Refused("a body with a Content-Length is needed", 411)
        if int(length) > limit:
            raise Refused(f"a body of {int(length)} bytes; at most {limit} here", 413)
        return self.rfile.read(int(length))

    def _answer(self, route: Callable[[], dict] | None) -> None:
        self.server.last_request = time.monotonic()
        if route is None:
            return self._send(
                404, {"error": f"no {self.command} {self.path}: GET /health, /parameters; POST /generate, /weights"}
            )
        try:
            self._send(200, route())
        except Refused as err:
            self._send(err.status, {"error": str(err)})
        except Exception as err:  # the engine failed: one line back, the traceback in the server's log
            traceback.print_exc(file=sys.stderr)
            self._send(500, {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
        finally:
            self.server.last_request = time.monotonic()

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise Refused("the body is not JSON") from None


# -- the command ----------------------------------------------------------------------------------


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    engine: str = "auto",
    idle_timeout: float = 0.0,
    verbose: bool = False,
    say: Callable[[str], None] = print,
    **engine_options,
) -> None:
    """Load ``model`` into the engine, listen on ``host:port`` (0: a free port) and answer until
    Ctrl-C, SIGTERM, or ``idle_timeout`` seconds (> 0) without a request."""
    started = make_engine(model, engine, **engine_options)
    try:
        server = RolloutServer((host, port), started, model, verbose=verbose)
    except OSError as err:
        raise CommandError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None
    bound_host, bound_port = server.server_address[:2]
    if not _loopback(host):
        say(f"warning: listening on {host}: anyone who reaches port {bound_port} can replace the weights it serves")
    say(
        f"rollout server: {started.name} engine, {model} ({started.dtype}) on http://{bound_host}:{bound_port} "
        "(Ctrl-C stops it)"
    )
    stop = threading.Event()

    def shut(*_):
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, shut)
    if idle_timeout > 0:

        def watch() -> None:
            while not stop.wait(min(idle_timeout, 1.0)):
                if time.monotonic() - server.last_request > idle_timeout:
                    say(f"rollout server: no request for {idle_timeout:g} s, stopping")
                    shut()

        threading.Thread(target=watch, daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)
        server.server_close()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
