"""Who samples the rollouts of online RL: transformers (any device) or a colocated vLLM (CUDA).

    polmctl run recipe=grpo method.generation_backend=vllm       # pip install 'polmctl[vllm]'

A backend turns G-fold sampling of a batch of prompts into new token ids:

    backend = make_backend(method)              # method: a SamplingOptions (temperature, top_p, ...)
    ids = backend.sample(model, tokenizer, prompts, G, method)
    # len(ids) == len(prompts) * G; ids[p * G : (p + 1) * G] are prompt p's samples

Each completion holds the new tokens up to and including the end-of-sequence token, or up to
and including the token that completes the first of ``options.stop`` (polmctl.rollout.generate
explains how stop strings are matched); nothing after it, no padding.

``TransformersBackend`` prefills each prompt once and lets its G samples share that KV cache,
and samples from a float32 LoRA policy with its adapters merged into the base weights
(``merged_lora``; off with ``method.merge_adapters_for_sampling=false``);
``VLLMBackend`` runs vLLM in the training process (``method.vllm_mode=colocate``), copies the
policy's weights into it before every sampling call, and with ``method.vllm_sleep_mode`` puts it to
sleep between rollouts (its weights and KV cache freed for training); ``RemoteBackend``
(polmctl/rollout/client.py, ``method.vllm_mode=server``) asks a ``polmctl rollout-server`` over HTTP
and pushes the policy's weights to it when they changed.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Iterator, Protocol, Sequence

import torch

from polmctl.errors import TrainingError
from polmctl.models.forward import cache_keyword, is_prompt_learning, unwrapped
from polmctl.rollout.generate import (
    cut_completion,
    decode_without_cache,
    decoding_kwargs,
    generation_mode,
    stop_criteria,
)
from polmctl.rollout.weights import base_weights, is_peft

VLLM_MISSING = (
    "method.generation_backend=vllm: vLLM is not installed; install it with "
    "pip install 'polmctl[vllm]' (CUDA only), or use method.generation_backend=transformers"
)
VLLM_NO_CUDA = (
    "method.generation_backend=vllm: vLLM needs a CUDA GPU and none is available; "
    "use method.generation_backend=transformers"
)


class GenerationBackend(Protocol):
    def sample(self, model, tokenizer, prompts: list[str], samples_per_prompt: int, options) -> list[list[int]]:
        """``samples_per_prompt`` sampled completions of each prompt, grouped: a prompt's samples
        are consecutive. ``options`` carries temperature, top_p, max_new_tokens and stop."""
        ...


def make_backend(options) -> GenerationBackend:
    """The backend ``options.generation_backend`` names (transformers when it names none); vllm in
    ``options.vllm_mode``: colocate (this process) or server (a ``polmctl rollout-server``)."""
    name = getattr(options, "generation_backend", "transformers")
    if name == "transformers":
        return TransformersBackend()
    if name == "vllm":
        if getattr(options, "vllm_mode", "colocate") == "server":
            from polmctl.rollout.client import RemoteBackend

            return RemoteBackend(options.vllm_server_url, timeout=options.vllm_server_timeout)
        return VLLMBackend(
            gpu_memory_utilization=getattr(options, "vllm_gpu_memory_utilization", 0.3),
            sleep_mode=getattr(options, "vllm_sleep_mode", False),
        )
    raise TrainingError(f"method.generation_backend: got {name!r}; allowed: transformers, vllm")


def _stop(options) -> list[str]:
    return list(getattr(options, "stop", None) or [])


def sampling_kwargs(options) -> dict:
    """A method's sampling options as ``generate`` takes them (every backend's ``sample``)."""
    return dict(
        max_new_tokens=options.max_new_tokens,
        do_sample=True,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=getattr(options, "top_k", 0),
        stop=_stop(options),
    )


# -- transformers ---------------------------------------------------------------------------------


def _forward_parameters(model) -> set[str]:
    """The keyword names the underlying transformers model's forward takes (through a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def encode_prompts(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]]):
    """A padded batch (the tokenizer's padding side) of text prompts, tokenized without added
    special tokens as training tokenizes them, or of prompts that are token ids already."""
    if prompts and not isinstance(prompts[0], str):
        return tokenizer.pad({"input_ids": [list(p) for p in prompts]}, return_tensors="pt", padding=True)
    return tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)


def generate_groups(
    model,
    tokenizer,
    prompts: Sequence[str],
    samples_per_prompt: int,
    *,
    share_prefill: bool = True,
    stop: Sequence[str] = (),
    **generate_kwargs,
):
    """One ``model.generate`` call on every prompt (text, or token ids) repeated ``samples_per_prompt``
    times (grouped), returning what it returns and the prompt width (the new tokens start there).

    With ``share_prefill``, each distinct prompt is prefilled once: all but its last token run
    through the model into a KV cache (left-padded batch, positions counted from the first real
    token as ``generate`` counts them), the cache is repeated G times along the batch, and
    ``generate`` gets the full repeated prompts with that cache, so it forwards only each row's
    last prompt token before decoding. Without it, every row prefills its own copy of the
    prompt. Both give the same tokens and scores (tests/rollout/test_backends.py).
    The model must be in eval mode and the tokenizer left-padding (``generation_mode``), and
    must not carry a prompt-learning adapter (their ``generate`` is wrong; see generate.py).
    """
    from transformers import DynamicCache

    G = samples_per_prompt
    device = next(p for p in model.parameters()).device
    enc = encode_prompts(tokenizer, prompts).to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    width = ids.shape[1]
    kwargs = {
        "pad_token_id": tokenizer.pad_token_id,
        "stopping_criteria": stop_criteria(tokenizer, stop, width),
        **generate_kwargs,
    }
    # generate refuses a cache object next to a configured cache_implementation (static caches...).
    share = share_prefill and G > 1 and width > 1 and not getattr(model.generation_config, "cache_implementation", None)
    if share:
        keyword = cache_keyword(model)
        cache = DynamicCache(config=model.config)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        prefill = {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}
        model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            use_cache=True,
            **{keyword: cache},
            **prefill,
        )
        cache.batch_repeat_interleave(G)
        kwargs[keyword] = cache
    out = model.generate(
        input_ids=ids.repeat_interleave(G, dim=0), attention_mask=mask.repeat_interleave(G, dim=0), **kwargs
    )
    return out, width


def _mergeable_lora_layers(model) -> list:
    """The LoRA layers of ``model`` when sampling may merge them, else []: a peft LoRA (or DoRA
    on Linear layers) policy whose every tuner layer is unmerged with its adapters on, on
    float32 plain-tensor base weights. Left alone: prompt learning and other peft methods,
    LoRA variants whose merge is not the forward (aLoRA acts only after its invocation tokens),
    quantized bases (bitsandbytes, torchao, GPTQ: merging into them is lossy), bf16/fp16 bases
    (W + dW rounded to bf16 loses most of dW: 4e-3 relative rounding), replicated layers, weights
    sharded over ranks (ZeRO-3; FSDP2's are DTensors)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.variants import DoraLinearVariant
    from peft.tuners.tuners_utils import BaseTunerLayer

    from polmctl.models.fused_lora import FusedLoraVariant

    model = unwrapped(model)
    if not (hasattr(model, "merge_adapter") and hasattr(model, "peft_config")) or is_prompt_learning(model):
        return []
    base = model.get_base_model()
    if getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None:
        return []
    if any(getattr(c, "layer_replication", None) for c in model.peft_config.values()):
        return []
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        if not isinstance(layer, LoraLayer) or layer.merged or layer.disable_adapters:
            return []
        if any(type(variant) not in (DoraLinearVariant, FusedLoraVariant) for variant in layer.lora_variant.values()):
            return []
        for p in layer.get_base_layer().parameters(recurse=False):
            if type(p.data) is not torch.Tensor or p.dtype != torch.float32 or p.device.type == "meta":
                return []
            if hasattr(p, "ds_id"):  # partitioned by ZeRO-3: this rank holds a slice of the weight
                return []
    return layers


@contextmanager
def merged_lora(model, enabled: bool = True) -> Iterator[bool]:
    """For the duration, ``model``'s LoRA adapters merged into its base weights (peft's
    ``merge_adapter``, as TRL merges before copying weights to vLLM) when ``_mergeable_lora_layers``
    allows; yields whether it merged. Decoding then runs one matmul per adapted Linear instead
    of three (base, lora_A, lora_B): ~420 fewer small matmuls per token on an all-linear SmolLM2.

    The base weights come back bit for bit: the merge goes into a copy of them, and afterwards
    the original tensors are put back. peft's own unmerge, W' = (W + dW) - dW, is off by float
    rounding, and that adds up across a run as dW changes every step: after 100 merge/unmerge
    cycles of a 576x576 / 1536x576 float32 weight (std 0.02) with a dW that changes every cycle,
    half the entries had moved, by up to 6.7e-8 absolute (8e-8 relative in Frobenius norm, up
    to 7e-3 relative on the smallest entries), growing like sqrt(steps), and a LoRA policy's
    reference is its base weights. The cost: one transient copy of the adapted base weights
    during sampling (float32 all-linear SmolLM2-135M: 106M parameters, 405 MiB, below the GRPO
    step's backward peak), and ~0.25 s per rollout on one CPU thread (copy, merge, unmerge)
    against ~0.65 s of decoding saved at 4 prompts x 8 samples x 48 tokens.
    """
    layers = _mergeable_lora_layers(model) if enabled else []
    if not layers:
        yield False
        return
    with merged_into_copies(unwrapped(model), layers):
        yield True


@contextmanager
def merged_into_copies(model, layers: Sequence) -> Iterator[None]:
    """For the duration, peft ``model``'s adapters merged (``merge_adapter``) into copies of the
    base weights of its tuner ``layers``; afterwards the original tensors are put back, bit for
    bit (see ``merged_lora`` for why not peft's unmerge)."""
    originals = []
    with torch.no_grad():
        for layer in layers:
            for p in layer.get_base_layer().parameters(recurse=False):
                originals.append((p, p.data))
                p.data = p.data.clone()
        try:
            model.merge_adapter()
            yield
        finally:
            model.unmerge_adapter()  # peft's bookkeeping: merged_adapters emptied, DoRA's cached norms dropped
            for p, data in originals:
                p.data = data


class TransformersBackend:
    """Sampling with ``model.generate``, one prefill per distinct prompt shared by its G samples.

    ``batch_size`` caps the prompts (not completions) per ``generate`` call; None: all at once,
    as a rollout batch is sized to fit training anyway. A LoRA policy samples with its adapters
    merged (``merged_lora``) unless ``options.merge_adapters_for_sampling`` is false.
    """

    def __init__(self, *, share_prefill: bool = True, batch_size: int | None = None):
        self.share_prefill = share_prefill
        self.batch_size = batch_size

    def sample(self, model, tokenizer, prompts: list[str], samples_per_prompt: int, options) -> list[list[int]]:
        merge = getattr(options, "merge_adapters_for_sampling", True)
        return self.generate(
            model, tokenizer, prompts, samples_per_prompt, merge_adapters=merge, **sampling_kwargs(options)
        )

    @torch.no_grad()
    def generate(
        self,
        model,
        tokenizer,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        samples_per_prompt: int = 1,
        *,
        max_new_tokens: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Sequence[str] = (),
        merge_adapters: bool = True,
    ) -> list[list[int]]:
        """Like ``sample`` with every knob explicit (``do_sample=False``: greedy); ``prompts`` may be
        token ids (not for prompt-learning adapters, which decode from text)."""
        G, stop = samples_per_prompt, list(stop)
        new_tokens: list[list[int]] = []
        with generation_mode(model, tokenizer) as device, merged_lora(model, merge_adapters):
            if is_prompt_learning(model):
                # Prompt and prefix tuning decode without a KV cache (see decode_without_cache), so
                # there is no prefill to share: every sample runs its own full forward passes.
                expanded = [p for p in prompts for _ in range(G)]
                return decode_without_cache(
                    model,
                    tokenizer,
                    expanded,
                    max_new_tokens,
                    len(expanded),
                    device,
                    do_sample,
                    temperature,
                    top_p,
                    stop,
                    top_k,
                )
            size = self.batch_size or max(len(prompts), 1)
            for i in range(0, len(prompts), size):
                out, width = generate_groups(
                    model,
                    tokenizer,
                    prompts[i : i + size],
                    G,
                    share_prefill=self.share_prefill,
                    stop=stop,
                    max_new_tokens=max_new_tokens,
                    **decoding_kwargs(do_sample, temperature, top_p, top_k),
                )
                new_tokens += [cut_completion(row.tolist(), tokenizer, stop) for row in out[:, width:]]
        return new_tokens


# -- vLLM -----------------------------------------------------------------------------------------


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise TrainingError(VLLM_MISSING) from None
    return vllm


def start_vllm(vllm, path: str, *, dtype: str, gpu_memory_utilization: float, max_model_len: int | None, **extra):
    """A vLLM engine on the model dir ``path`` whose worker runs in this process, so that
    ``vllm_model`` reaches its weights: the external launcher (TRL's colocate mode) with in-process
    engine core and torch.distributed's env:// variables, which accelerate/torchrun set when they
    launched us and which default to one process here. ``extra``: more ``vllm.LLM`` arguments."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    return vllm.LLM(
        model=path,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        distributed_executor_backend="external_launcher",
        seed=int(torch.initial_seed() % 2**31),
        enable_prefix_caching=True,
        # vLLM v1's memory profiler misjudges the default (TRL sets the same)
        max_num_batched_tokens=4096,
        **extra,
    )


def vllm_model(llm):
    """The ``torch.nn.Module`` inside a ``start_vllm`` engine; its ``load_weights`` takes
    ``(base model name, tensor)`` pairs (TRL's colocate mode loads weights the same way)."""
    return llm.llm_engine.model_executor.driver_worker.model_runner.model


def vllm_sampling_params(
    vllm,
    n: int,
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[str] = (),
    seed: int | None = None,
):
    """vLLM's SamplingParams for these knobs, as the transformers backend reads them (greedy:
    temperature 0, vLLM's greedy)."""
    return vllm.SamplingParams(
        n=n,
        temperature=temperature if do_sample else 0.0,
        top_p=top_p if do_sample else 1.0,
        top_k=top_k if do_sample and top_k > 0 else -1,  # -1: vLLM's "off"
        max_tokens=max_new_tokens,
        stop=list(stop) or None,
        include_stop_str_in_output=True,
        **({"seed": seed} if seed is not None else {}),
    )


def vllm_completions(outputs, tokenizer, stop: Sequence[str]) -> list[list[int]]:
    """``LLM.generate``'s outputs (in request order) as grouped completions: each sample's token ids,
    with the end-of-sequence token it ended on, cut after the first stop string."""
    eos, completions = tokenizer.eos_token_id, []
    for request in outputs:
        for sample in sorted(request.outputs, key=lambda o: o.index):
            tokens = list(sample.token_ids)
            # finish_reason "stop" with stop_reason None: it ended on EOS, which the ids must hold.
            if sample.finish_reason == "stop" and sample.stop_reason is None and tokens[-1:] != [eos]:
                tokens.append(eos)
            completions.append(cut_completion(tokens, tokenizer, list(stop)))
    return completions


class VLLMBackend:
    """A vLLM engine in the training process, sharing its GPU ("colocate", as TRL's
    ``vllm_mode="colocate"``), refreshed with the policy's current weights before each call.

    The engine starts on the first ``sample`` from the policy's own model dir (a LoRA policy:
    its base model's) and keeps ``gpu_memory_utilization`` of the GPU for its weights and KV
    cache; the rest stays with training. With ``sleep_mode`` (TRL's ``vllm_enable_sleep_mode``) it
    holds that memory only while it samples: between rollouts it sleeps at level 2 (weights and KV
    cache freed), and each ``sample`` wakes its weights, loads the policy's, wakes the KV cache,
    samples and puts it back to sleep, the order TRL's VLLMGeneration follows. vLLM caches prompt
    prefixes itself, so a prompt's G samples share their prefill here too. Not for quantized
    policies or prompt-learning adapters.
    """

    sleep_mode = False
    llm = None

    def __init__(
        self, *, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, sleep_mode: bool = False
    ):
        self.vllm = import_vllm()
        if not torch.cuda.is_available():
            raise TrainingError(VLLM_NO_CUDA)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.sleep_mode = sleep_mode

    def sample(self, model, tokenizer, prompts: list[str], samples_per_prompt: int, options) -> list[list[int]]:
        model = unwrapped(model)
        if is_prompt_learning(model):
            raise TrainingError(
                "method.generation_backend=vllm cannot sample from prompt or prefix tuning "
                "adapters; use method.generation_backend=transformers"
            )
        if self.llm is None:
            self.llm = self._start(model)
        if self.sleep_mode:
            torch.cuda.empty_cache()  # what training freed goes back to the driver before vLLM maps its weights
            self.llm.wake_up(tags=["weights"])
        self._load_weights(model)
        stop = _stop(options)
        params = vllm_sampling_params(
            self.vllm,
            samples_per_prompt,
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=getattr(options, "top_k", 0),
            stop=stop,
        )
        # Token ids, not text: vLLM would tokenize text with special tokens (a BOS) that training never sees.
        requests = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        if self.sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        try:
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)  # in request order
        finally:
            if self.sleep_mode:
                self.llm.sleep(level=2)  # weights and KV cache freed: the next sample loads the policy's again
        return vllm_completions(outputs, tokenizer, stop)

    def _start(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False):
            raise TrainingError(
                "method.generation_backend=vllm cannot take weights from a quantized policy "
                "(model.quantization); use method.generation_backend=transformers"
            )
        path = getattr(base.config, "_name_or_path", "") or getattr(base, "name_or_path", "")
        if not path:
            raise TrainingError(
                "method.generation_backend=vllm needs the policy's model dir to start vLLM from, "
                "and this model has none; use method.generation_backend=transformers"
            )
        if self.sleep_mode and not hasattr(self.vllm.LLM, "sleep"):
            raise TrainingError(
                "method.vllm_sleep_mode=true: this vLLM has no sleep mode; upgrade vLLM or "
                "set method.vllm_sleep_mode=false"
            )
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        extra = {"enable_sleep_mode": True} if self.sleep_mode else {}
        llm = start_vllm(
            self.vllm,
            path,
            dtype=dtype,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            **extra,
        )
        if self.sleep_mode:
            llm.sleep(level=2)  # asleep until the first rollout, as between rollouts
        return llm

    @torch.no_grad()
    def _load_weights(self, model) -> None:
        """Copy the policy's weights into the engine, as TRL's ``_move_model_to_vllm`` does
        (huggingface/trl trl/trainer/grpo_trainer.py @ d2b69d769dab6f77acbfd33252bcd7d22765571b;
        VLLMGeneration.sync_weights in trl/generation/vllm_generation.py @
        02bf6bcd3be58d928edd67b7a227235c6b599ee2): a LoRA policy is merged into its base weights,
        sent under the base model's names (``weights.base_weights``: peft's ``base_model.model.``
        prefix and ``.base_layer`` removed, the lora_ tensors skipped), then unmerged; then vLLM's
        prefix cache is reset, as the cached prompt states belong to the old weights."""
        engine_model = vllm_model(self.llm)
        peft = is_peft(model)
        if peft:
            model.merge_adapter()
        try:
            for name, param in base_weights(model):
                engine_model.load_weights([(name, param.data)])
        finally:
            if peft:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
