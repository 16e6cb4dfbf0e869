"""The trainer's side of a rollout server (``method.generation_backend=vllm method.vllm_mode=server``):
``RemoteBackend`` samples through ``polmctl rollout-server`` over HTTP and, before the first rollout
after an optimizer update, pushes the policy's weights to it (TRL's server mode syncs at the same
point): the LoRA adapter alone when the policy trains a plain LoRA adapter, else the full weights.

    polmctl rollout-server builtin:smollm2-135m --port 8000 &
    polmctl run recipe=grpo method.generation_backend=vllm method.vllm_mode=server \\
        method.vllm_server_url=http://127.0.0.1:8000

The protocol is polmctl's own, JSON over HTTP (polmctl/rollout/server.py serves it):

    GET  /health      {"protocol", "engine", "model", "dtype", "version", "weights", "vocab_size", "eos_token_id"}
    GET  /parameters  {"parameters": {base model name: shape}}: the weights a full push may name
    POST /generate    {"prompts": [[token id, ...], ...], "n", "max_new_tokens", "do_sample", "temperature",
                       "top_p", "top_k", "stop", "seed", "version"} -> {"completions": [[token id, ...]], "version"}
                      (a prompt's n completions are consecutive; "version": the weights the request
                      expects, refused with 409 while the server holds others; null: any)
    POST /weights     safetensors bytes (never a pickle) whose metadata holds "kind" (full | adapter),
                      "commit" (true on a push's last request) and for an adapter its peft
                      "adapter_config" (JSON) -> {"version"}; a commit makes what was pushed the
                      served weights and adds 1 to the version

Errors come back as {"error": "one line"} with a 4xx/5xx status. The first push sends every weight
the server serves (checking that the policy has each, with its shape), so the server may start
from any copy of the architecture; later full pushes send the trainable weights only.
Several processes (DDP): rank 0 pushes, every rank learns the new version from it (one broadcast
per update) and samples its own prompts. Sharded policies (FSDP, ZeRO-3) are refused.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Iterator, Sequence

import torch
from rich.markup import escape

from polmctl.errors import TrainingError
from polmctl.models.forward import is_prompt_learning, unwrapped
from polmctl.rollout.weights import base_weights, chunked, is_peft, pack

PROTOCOL = 1
CHUNK_BYTES = 256 * 2**20  # one weight request carries at most this much (one larger tensor: alone)
URL_KEY = "method.vllm_server_url"


class RolloutClient:
    """The HTTP calls of the protocol, each bounded by ``timeout`` seconds."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url.rstrip("/"), timeout
        # Rollout servers sit on the cluster's own network: an http_proxy meant for the internet
        # (which urllib would use for them) is bypassed.
        self._open = urllib.request.build_opener(urllib.request.ProxyHandler({})).open

    def _call(self, path: str, body: bytes | None = None, content_type: str = "application/json") -> dict:
        headers = {"Content-Type": content_type} if body is not None else {}
        request = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with self._open(request, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as err:
            raise TrainingError(f"rollout server {self.url}{path}: {_error_line(err)}") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise TrainingError(
                f"{URL_KEY}: the rollout server at {self.url} did not answer {path} ({reason}); is "
                "`polmctl rollout-server` running there?"
            ) from None

    def health(self) -> dict:
        return self._call("/health")

    def wait_until_up(self) -> dict:
        """``/health`` once the server answers, polling for up to ``timeout`` seconds (it may still be
        loading its model)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.health()
            except TrainingError:
                if time.monotonic() >= deadline:
                    raise TrainingError(
                        f"{URL_KEY}: no rollout server answered at {self.url} within "
                        f"{self.timeout:g} s (method.vllm_server_timeout); start one with "
                        "`polmctl rollout-server MODEL --port PORT` and point the key at it"
                    ) from None
                time.sleep(0.5)

    def parameters(self) -> dict[str, list[int]]:
        return self._call("/parameters")["parameters"]

    def generate(self, prompts: list[list[int]], n: int, **knobs) -> tuple[list[list[int]], int]:
        answer = self._call("/generate", json.dumps({"prompts": prompts, "n": n, **knobs}).encode())
        return answer["completions"], answer["version"]

    def push(self, tensors: dict[str, torch.Tensor], *, kind: str, commit: bool, adapter_config: str = "") -> int:
        meta = {"kind": kind, "commit": "true" if commit else "false"}
        if adapter_config:
            meta["adapter_config"] = adapter_config
        return self._call("/weights", pack(tensors, **meta), "application/octet-stream")["version"]


def _error_line(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]
    except Exception:
        return f"HTTP {err.code} {err.reason}"


class RemoteBackend:
    """A ``GenerationBackend`` whose samples come from a rollout server (polmctl/rollout/server.py)."""

    def __init__(self, url: str, *, timeout: float = 600.0):
        self.client = RolloutClient(url, timeout)
        self.server: dict | None = None  # /health at the first call
        self.version: int | None = None  # the weights version the last push made (what generate expects)
        self._synced = None  # the policy's state at the last sync (see _state)
        self._names: dict[str, list[int]] = {}  # the server's weights: base name -> shape

    def sample(self, model, tokenizer, prompts: list[str], samples_per_prompt: int, options) -> list[list[int]]:
        from polmctl.rollout.backends import sampling_kwargs

        # The seed is drawn from this rank's torch RNG: the samples follow the run's seed and its resumes.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        return self.generate(model, tokenizer, prompts, samples_per_prompt, seed=seed, **sampling_kwargs(options))

    def generate(
        self,
        model,
        tokenizer,
        prompts: Sequence[str],
        samples_per_prompt: int = 1,
        *,
        max_new_tokens: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[int]]:
        """Like ``TransformersBackend.generate``: the server's completions of ``prompts`` (text,
        tokenized as training tokenizes it), after syncing the policy's weights to it."""
        self.sync(model, tokenizer)
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completions, version = self.client.generate(
            ids,
            samples_per_prompt,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop=list(stop),
            seed=seed,
            version=self.version,
        )
        if version != self.version or len(completions) != len(prompts) * samples_per_prompt:
            raise TrainingError(
                f"rollout server {self.client.url}: answered {len(completions)} completions of weights version "
                f"{version}, expected {len(prompts) * samples_per_prompt} of version {self.version}"
            )
        return completions

    # -- weights -----------------------------------------------------------------------------

    def sync(self, model, tokenizer) -> None:
        """Push the policy's weights if they changed since the last push (rank 0), and take the
        version they got (every rank)."""
        model = unwrapped(model)
        if self.server is None:
            self.server = self._connect(model, tokenizer)
        state = _state(model)
        if state == self._synced:
            return
        rank, world = _rank_and_world()
        if rank == 0:
            self.version = self.push(model)
        if world > 1:
            # Every rank sees the same optimizer steps, so each gets here once per update.
            box = [self.version]
            torch.distributed.broadcast_object_list(box, src=0)
            self.version = box[0]
        self._synced = state

    def _connect(self, model, tokenizer) -> dict:
        health = self.client.wait_until_up()
        if health.get("protocol") != PROTOCOL:
            raise TrainingError(
                f"{URL_KEY}: the server at {self.client.url} speaks rollout protocol {health.get('protocol')!r}, "
                f"this polmctl speaks {PROTOCOL}; run the same polmctl version on both sides"
            )
        ours = (len(tokenizer), tokenizer.eos_token_id)
        theirs = (health.get("vocab_size"), health.get("eos_token_id"))
        if ours != theirs:
            raise TrainingError(
                f"{URL_KEY}: the rollout server at {self.client.url} serves {health.get('model')} with another "
                f"tokenizer (vocabulary {theirs[0]}, end-of-sequence id {theirs[1]}; the policy's: {ours[0]}, "
                f"{ours[1]}); start it on the policy's model (model.name_or_path)"
            )
        from polmctl.console import console

        line = f"rollout server {self.client.url}: {health['engine']} engine, {health['model']} ({health['dtype']})"
        policy = str(next(model.parameters()).dtype).removeprefix("torch.")
        if health["dtype"] != policy:
            line += f"; it samples a {health['dtype']} copy of the {policy} policy (its rollout-server --dtype)"
        console.print(f"[bold]rollouts[/] {escape(line)}", highlight=False, soft_wrap=True)
        return health

    def push(self, model) -> int:
        """Send the policy's current weights; returns the version the server now serves."""
        _check_pushable(model)
        first = not self._names
        if first:
            self._names = self.client.parameters()
            self._check_covers(model)
        if trains_plain_lora(model):
            if first:  # the base as the policy has it (PiSSA and OLoRA rewrite it), then adapters only
                self._push_full(base_weights(model), commit=False)
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(model)
            config = json.dumps(model.peft_config["default"].to_dict(), default=_jsonable)
            return self.client.push(adapter, kind="adapter", commit=True, adapter_config=config)
        if is_peft(model):  # other adapters: their merge, as full weights
            from peft.tuners.tuners_utils import BaseTunerLayer

            from polmctl.rollout.backends import merged_into_copies

            layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
            with merged_into_copies(model, layers):
                return self._push_full(base_weights(model), commit=True)
        return self._push_full(base_weights(model, only_trainable=not first), commit=True)

    def _push_full(self, named: Iterator[tuple[str, torch.Tensor]], *, commit: bool) -> int:
        wanted = ((n, p.detach()) for n, p in named if n in self._names)  # not a PPO value head
        version, chunks = -1, chunked(wanted, CHUNK_BYTES)
        chunk = next(chunks, {})
        while True:
            following = next(chunks, None)
            version = self.client.push(chunk, kind="full", commit=commit and following is None)
            if following is None:
                return version
            chunk = following

    def _check_covers(self, model) -> None:
        ours = {n: list(p.shape) for n, p in base_weights(model)}
        missing = [n for n in self._names if n not in ours]
        differ = [n for n, shape in self._names.items() if n in ours and ours[n] != shape]
        if missing or differ:
            what = f"lacks its weights {missing[:3]}" if missing else f"has other shapes for {differ[:3]}"
            raise TrainingError(
                f"{URL_KEY}: the rollout server at {self.client.url} serves {self.server['model']}, and the policy "
                f"{what}; start the server on the policy's model (model.name_or_path)"
            )


def trains_plain_lora(model) -> bool:
    """One plain LoRA adapter (not DoRA, no layer replication): the one kind a server (vLLM's LoRA
    support too) takes as an adapter; any other adapter is pushed merged."""
    if not is_peft(model) or len(model.peft_config) != 1:
        return False
    config = next(iter(model.peft_config.values()))
    return (
        str(getattr(config.peft_type, "value", config.peft_type)) == "LORA"
        and not getattr(config, "use_dora", False)
        and not getattr(config, "layer_replication", None)
    )


def _check_pushable(model) -> None:
    if is_prompt_learning(model):
        raise TrainingError(
            "method.vllm_mode=server cannot serve prompt or prefix tuning adapters; use "
            "method.generation_backend=transformers"
        )
    base = model.get_base_model() if is_peft(model) else model
    if getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False):
        raise TrainingError(
            "method.vllm_mode=server cannot push a quantized policy (model.quantization): the server's "
            "unquantized copy would sample another model; use method.generation_backend=transformers"
        )
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters()):
        raise TrainingError(
            "method.vllm_mode=server cannot push the weights of a sharded policy (FSDP, DeepSpeed ZeRO-3) "
            "yet; train with DDP (no launcher.config_file, or ddp) or use method.generation_backend=transformers"
        )


def _state(model) -> tuple:
    """What changes when an optimizer updates the policy: the in-place version counter torch keeps
    on every tensor (an optimizer step bumps it) of each trainable parameter."""
    return id(model), tuple(p._version for p in model.parameters() if p.requires_grad)


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _jsonable(value):
    """peft configs hold sets (target_modules) and enums: as adapter_config.json writes them."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", str(value))
