"""``polmctl plan``: a dry run. Compose and validate the config, load the tokenizer and the data,
and estimate the memory one training process needs, against the device's free memory.

    polmctl plan recipe=lora
    polmctl plan recipe=sft model=tiny trainer.micro_batch_size=32 data.max_length=1024
    polmctl plan recipe=sft launcher=accelerate launcher.num_processes=8 launcher.config_file=fsdp

Nothing trains and no weights load: the model is built on PyTorch's meta device (shapes and
dtypes, no storage), with the run's peft adapter applied to it, so parameter and trainable
counts are exact. Activations are an estimate (the formula is in ``activation_bytes``).

With several processes (launcher=accelerate, launcher.num_processes=N) the memory is per rank,
for the strategy asked for and for each of the others (``per_rank``: what DDP, FSDP2 and ZeRO-2/3
divide across ranks), and the plan names the strategies that fit.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from polmctl.config.schema import RunConfig
from polmctl.errors import ConfigError, DataError, ModelError

PLAN_ERRORS = (ConfigError, DataError, ModelError, ValueError, FileNotFoundError)  # shown as one line
TIGHT_ABOVE = 0.8  # of free memory


def plan_device(cfg: RunConfig) -> torch.device:
    name = cfg.trainer.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def free_memory(device: torch.device) -> tuple[int, str]:
    """(free bytes, what was measured) on ``device``."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"trainer.device={device} but CUDA is not available here; use trainer.device=cpu")
        free, total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)} ({total / 2**30:.1f} GiB total)"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available system memory (RAM)"
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free system memory (RAM)"


def _examples_shape(examples: list[dict], max_length: int) -> tuple[int, int]:
    """(sequences per row in one forward pass, longest sequence in tokens)."""
    if not examples or not any(k.endswith("_ids") for k in examples[0]):
        return 1, max_length  # prompts (online methods) + sampled answers: at most data.max_length tokens
    if "input_ids" in examples[0]:
        return 1, max(len(e["input_ids"]) for e in examples)
    answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in examples[0]]
    longest = max(len(e["prompt_ids"]) + max(len(e[c]) for c in answers) for e in examples)
    return 2, longest  # pairs: chosen + rejected; kto: the completion + a mismatched one for the KL term


def _tokens(examples: list[dict], stats: Any) -> int | None:
    if hasattr(stats, "tokens"):
        return int(stats.tokens)
    lengths = [sum(len(v) for k, v in e.items() if k.endswith("_ids") and isinstance(v, list)) for e in examples]
    return sum(lengths) if any(lengths) else None


def plan_data(cfg: RunConfig, tokenizer, objective) -> dict:
    from polmctl.data import load_config_rows

    rows = load_config_rows(cfg.data)
    examples, stats = objective.encode(rows, tokenizer, cfg.data)
    per_row, longest = _examples_shape(examples, cfg.data.max_length)
    return {
        "source": cfg.data.source,
        "rows": len(rows),
        "kept": len(examples),
        "tokens": _tokens(examples, stats),
        "truncated": getattr(stats, "truncated", 0),
        "dropped": len(rows) - len(examples),
        # the data.max_length that keeps 95% of rows whole (None for prompts: their answers are sampled)
        "whole_length": stats.whole_length() if hasattr(stats, "whole_length") else None,
        "summary": stats.summary(),
        "sequences_per_row": per_row,
        "longest": longest,
    }


def _config(model_cfg, cache_dir):
    from transformers import AutoConfig

    from polmctl.models.load import _call, adapter_base, resolve_model_path

    path = resolve_model_path(model_cfg.name_or_path, cache_dir)
    return _call(
        AutoConfig.from_pretrained,
        adapter_base(path, cache_dir) or path,
        "model config",
        trust_remote_code=model_cfg.trust_remote_code,
        revision=model_cfg.revision,
    )


def meta_model(model_cfg, dtype: torch.dtype, head: str = "causal_lm"):
    """The model of ``model_cfg`` on the meta device: every parameter's shape and dtype, no storage."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _config(model_cfg, model_cfg.cache_dir)
    if head == "reward":
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def weight_bytes(model, quantization: str) -> int:
    """Bytes of the weights; bitsandbytes quantizes the Linear layers except the output head:
    nf4/fp4 at 4 bits plus a 4-byte absmax per 64 weights, int8 at 1 byte plus a scale per row."""
    if quantization == "none":
        return _nbytes(model.parameters())
    quantized, other = 0, 0
    seen = set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            base_linear = isinstance(module, torch.nn.Linear) and "lora_" not in name and not name.endswith("lm_head")
            if base_linear and pname == "weight":
                per = 0.5 + 4 / 64 if quantization in ("nf4", "fp4") else 1.0
                quantized += int(p.numel() * per) + (4 * p.shape[0] if quantization == "int8" else 0)
            else:
                other += p.numel() * p.element_size()
    return quantized + other


def optimizer_bytes(trainable: list[torch.nn.Parameter], optimizer: str, momentum: float) -> int:
    """torch AdamW keeps two states in the parameter's dtype; bitsandbytes AdamW8bit one byte each
    (parameters under 4096 values stay 32-bit); SGD one momentum buffer (none at momentum 0)."""
    if optimizer == "adamw":
        return 2 * _nbytes(trainable)
    if optimizer == "adamw_8bit":
        return sum(2 * p.numel() if p.numel() >= 4096 else 8 * p.numel() for p in trainable)
    return _nbytes(trainable) if momentum else 0


def activation_bytes(
    config, rows: int, seq: int, element: int, checkpointing: bool, eager: bool, lm_head: bool = True
) -> int:
    """What the backward pass keeps, for ``rows`` sequences of ``seq`` tokens.

    Per decoder layer and token, a Llama-style block saves about 8*h + 4*kv + 4*i values
    (h hidden size, kv = key/value heads * head dim, i MLP width): two RMSNorm inputs and
    outputs, q/k before and after rotary, q/k/v and the output of attention, the o_proj input,
    and gate, up, act(gate) and their product for the MLP. Eager attention adds the scores and
    probabilities, 2 * heads * seq values per token (SDPA/flash kernels recompute them).
    Gradient checkpointing keeps only each layer's input (h per token) plus one layer's full
    set while it is recomputed. Logits: rows * seq * vocab, in float32 for the loss, twice
    (the logits and the log-softmax the cross-entropy backward needs); a reward model's score
    head has one output, not vocab.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size if lm_head else 1
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    i = getattr(text, "intermediate_size", None) or 4 * h
    per_layer = 8 * h + 4 * kv + 4 * i + (2 * heads * seq if eager else 0)
    tokens = rows * seq
    stored = layers * h + per_layer if checkpointing else layers * per_layer
    return tokens * stored * element + 2 * tokens * vocab * 4


def _extra_model(cfg: RunConfig, policy_weights: int) -> tuple[str, int] | None:
    """The second model the run holds, as the method's registry row says: a distillation teacher
    (its own weights), or a frozen reference copy of the policy (full fine-tuning with a KL term)."""
    from polmctl.methods.registry import method_spec
    from polmctl.models.load import resolve_dtype

    second = method_spec(cfg.method.name).second_model(cfg)
    if second is None:
        return None
    what, model_cfg = second
    if model_cfg is None:
        return what, policy_weights
    model = meta_model(model_cfg, resolve_dtype(model_cfg.dtype, plan_device(cfg)))
    return what, weight_bytes(model, model_cfg.quantization)


STRATEGIES = ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
CONFIG_FILES = {
    "ddp": "ddp",
    "fsdp2": "fsdp",
    "deepspeed_zero2": "deepspeed_zero2",
    "deepspeed_zero3": "deepspeed_zero3",
}


def unit_bytes(model) -> tuple[int, int]:
    """(bytes of the largest transformer layer, bytes of everything outside the layers: embeddings,
    head, final norm). The layers are the model's ``_no_split_modules`` classes, the units that
    FSDP's transformer-layer wrapping shards and gathers one by one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    inside = {id(p) for layer in layers for p in layer.parameters()}
    largest = max((_nbytes(layer.parameters()) for layer in layers), default=0)
    outside = sum(
        p.numel() * p.element_size() for p in {id(p): p for p in base.parameters()}.values() if id(p) not in inside
    )
    return largest, outside


def per_rank(memory: dict[str, int], strategy: str, ranks: int, largest_layer: int, outside_layers: int) -> dict:
    """One rank's memory under ``strategy`` over ``ranks`` processes, from the one-process figures
    (``weights``, ``gradients``, ``optimizer state``, ``activations``, and a second model if any).

      ddp              everything whole on every rank, and the gradients twice: DDP all-reduces
                       them from bucket buffers of their size (gradient_as_bucket_view off)
      deepspeed_zero2  weights whole; gradients and optimizer state / ranks
      deepspeed_zero3  weights, gradients and optimizer state / ranks, plus the weights gathered
      fsdp2            the same as ZeRO-3: weights, gradients, optimizer state / ranks + gathered
    Gathered: what is unsharded at once while a step runs: the parameters outside the layers (FSDP2's
    root unit; ZeRO-3 gathers the embeddings and the head when they run) and two layers (the one
    computing and the one prefetched). Activations are each rank's own micro-batch, as in one
    process; a second model (reference, teacher) is counted whole. Communication buckets and
    transient buffers are not counted."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    out = dict(memory)
    if strategy == "ddp":
        out["gradient buckets"] = memory["gradients"]
        return out
    out["gradients"] = -(-memory["gradients"] // ranks)
    out["optimizer state"] = -(-memory["optimizer state"] // ranks)
    if strategy in ("fsdp2", "deepspeed_zero3"):
        out["weights"] = -(-memory["weights"] // ranks)
        out["gathered weights"] = min(outside_layers + 2 * largest_layer, memory["weights"])
    return out


def _verdict(need: int, free: int) -> str:
    return "FITS" if need <= TIGHT_ABOVE * free else "TIGHT" if need <= free else "DOES NOT FIT"


def requested_launch(cfg: RunConfig) -> tuple[str, int]:
    """(strategy, processes) that launcher.* asks for; ("single", 1) for one process."""
    launcher = cfg.launcher
    if launcher.name != "accelerate" and not launcher.num_processes and not launcher.config_file:
        return "single", 1
    from polmctl.launch import launch_strategy

    return launch_strategy(cfg, None)


def _several(cfg: RunConfig, result: dict, memory: dict, model, device: torch.device) -> None:
    """Per-rank memory of each strategy over launcher.num_processes ranks; the requested one is the
    plan's memory and verdict. On CPU the ranks share the machine's memory (N x one rank's)."""
    strategy, ranks = requested_launch(cfg)
    if ranks <= 1:
        return
    largest, outside = unit_bytes(model)
    free, measured = free_memory(device)
    shared = device.type != "cuda"
    rows = {}
    for name in STRATEGIES:
        rank = per_rank(memory, name, ranks, largest, outside)
        need = sum(rank.values()) * (ranks if shared else 1)
        rows[name] = {"memory": rank, "per_rank_bytes": sum(rank.values()), "verdict": _verdict(need, free)}
    chosen = strategy if strategy in rows else "ddp"
    fitting = [name for name in STRATEGIES if rows[name]["verdict"] == "FITS"]
    if rows[chosen]["verdict"] == "FITS":
        hint = None
    elif fitting:
        best = min(fitting, key=lambda name: rows[name]["per_rank_bytes"])
        hint = (
            f"launcher.config_file={CONFIG_FILES[best]} fits: {_gib(rows[best]['per_rank_bytes'])} per rank "
            f"(launcher.config_file={CONFIG_FILES[chosen]}: {_gib(rows[chosen]['per_rank_bytes'])})"
        )
    else:
        hint = (
            "no strategy fits at this size: more processes, peft, model.gradient_checkpointing=true or a smaller batch"
        )
    result.update(processes=ranks, strategy=chosen, strategies=rows, strategy_hint=hint, shared_memory=shared)
    memory.clear()
    memory.update(rows[chosen]["memory"])


def make_plan(args: list[str]) -> dict:
    from polmctl.compose import compose_validated
    from polmctl.methods.registry import build_objective, method_spec
    from polmctl.models import apply_peft, load_tokenizer
    from polmctl.models.load import resolve_dtype

    cfg, _ = compose_validated(args)
    runner = method_spec(cfg.method.name).runner
    if runner == "pipeline":
        raise ConfigError(
            "method.name", "a pipeline is planned stage by stage: polmctl plan recipe=<a stage's recipe> ..."
        )
    device = plan_device(cfg)
    tokenizer = load_tokenizer(cfg.model)
    trains = runner == "train"
    objective = build_objective(cfg.method) if trains else None
    data = plan_data(cfg, tokenizer, objective) if trains else None

    dtype = resolve_dtype(cfg.model.dtype, device)
    head = objective.model_head if trains else "causal_lm"
    model = meta_model(cfg.model, dtype, head)
    config = model.config
    weights = weight_bytes(model, cfg.model.quantization)
    total_params = sum(p.numel() for p in model.parameters())
    memory = {"weights": weights}
    result: dict[str, Any] = {
        "runner": runner,
        "recipe": cfg.recipe.name,
        "model": cfg.model.name_or_path,
        "dtype": str(dtype).replace("torch.", ""),
        "quantization": cfg.model.quantization,
        "parameters": total_params,
        "device": str(device),
        "data": data,
    }
    if trains:
        model = apply_peft(model, cfg.peft, tokenizer)
        trainable = [p for p in model.parameters() if p.requires_grad]
        result["trainable_parameters"] = sum(p.numel() for p in trainable)
        memory["weights"] = weight_bytes(model, cfg.model.quantization)
        memory["gradients"] = _nbytes(trainable)
        memory["optimizer state"] = optimizer_bytes(trainable, cfg.trainer.optimizer, cfg.trainer.betas[0])
        rows = cfg.trainer.micro_batch_size * data["sequences_per_row"]
        seq = min(cfg.data.max_length, data["longest"]) if not cfg.data.packing else cfg.data.max_length
        element = 2 if cfg.trainer.mixed_precision in ("bf16", "fp16") else torch.finfo(dtype).bits // 8
        memory["activations"] = activation_bytes(
            config,
            rows,
            seq,
            element,
            cfg.model.gradient_checkpointing,
            cfg.model.attn_implementation == "eager",
            lm_head=head != "reward",
        )
        result["activations_at"] = f"{rows} sequences x {seq} tokens"
        extra = _extra_model(cfg, weights)
        if extra:
            memory[extra[0]] = extra[1]
        _several(cfg, result, memory, model, device)
    free, measured = free_memory(device)
    per_process = sum(memory.values())
    ranks = result.get("processes", 1)
    need = per_process * ranks if result.get("shared_memory") else per_process
    who = f" per rank under {result['strategy']}" if ranks > 1 else " per process"
    together = f", {ranks} ranks sharing it: {_gib(need)}" if ranks > 1 and result.get("shared_memory") else ""
    result.update(
        memory=memory,
        total_bytes=per_process,
        free_bytes=free,
        free_measured=measured,
        verdict=_verdict(need, free),
        verdict_reason=f"{_gib(per_process)} needed{who}{together}, {_gib(free)} {measured} "
        f"({100 * need / max(free, 1):.0f}%; TIGHT above {TIGHT_ABOVE:.0%})",
    )
    return result


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def plan_table(result: dict):
    from rich.table import Table

    table = Table(
        title=f"plan: {result['recipe']} on {result['model']} ({result['device']})",
        title_justify="left",
        show_header=False,
    )
    table.add_column("what")
    table.add_column("value", overflow="fold")
    data = result["data"]
    if data:
        table.add_row("data", f"{data['source']}: {data['summary']}")
        tokens = (
            f"{data['tokens']:,} tokens, longest {data['longest']:,}"
            if data["tokens"]
            else f"prompts (answers are sampled), up to {data['longest']:,} tokens"
        )
        table.add_row("rows / tokens", f"{data['kept']:,} of {data['rows']:,} rows kept, {tokens}")
        table.add_row("truncated / dropped", f"{data['truncated']:,} / {data['dropped']:,}")
        if data["whole_length"] is not None:
            table.add_row("keeps 95% of rows whole", f"data.max_length={data['whole_length']}")
    table.add_row("parameters", f"{result['parameters']:,} ({result['dtype']}, quantization={result['quantization']})")
    if "trainable_parameters" in result:
        table.add_row("trainable", f"{result['trainable_parameters']:,}")
        table.add_row("activations at", result["activations_at"])
    for name, value in result["memory"].items():
        table.add_row(f"memory: {name}", _gib(value))
    ranks = result.get("processes", 1)
    table.add_row(f"memory: total per {'rank' if ranks > 1 else 'process'}", _gib(result["total_bytes"]))
    table.add_row("available", f"{_gib(result['free_bytes'])} ({result['free_measured']})")
    for name, row in result.get("strategies", {}).items():
        parts = ", ".join(f"{what} {_gib(value)}" for what, value in row["memory"].items())
        mark = " (launcher.config_file)" if name == result["strategy"] else ""
        table.add_row(f"{name} x {ranks}{mark}", f"{row['verdict']}: {_gib(row['per_rank_bytes'])} per rank ({parts})")
    if result.get("strategy_hint"):
        table.add_row("hint", result["strategy_hint"])
    return table
