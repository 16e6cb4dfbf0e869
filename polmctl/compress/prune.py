"""Pruning: importance scores and keep-masks (pure functions of tensors), the calibration
pass that measures what they need, and the model surgery that applies them.

    polmctl run recipe=prune                                     # Wanda, 50% unstructured
    polmctl run recipe=prune method.criterion=magnitude method.sparsity=0.3
    polmctl run recipe=prune method.criterion=nm method.nm_n=2 method.nm_m=4
    polmctl run recipe=prune method.criterion=depth method.num_layers_to_drop=6

Criteria (``method.criterion``):
  magnitude  unstructured: the ``sparsity`` fraction of smallest |W| of each weight tensor
  wanda      unstructured: score |W_ij| * ||X_j||_2 (X_j: input channel j over the calibration
             tokens), the smallest ``sparsity`` fraction removed in each output row
             (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs"). The norms
             come from one pass of the dense model (not the paper's layer-by-layer refresh).
  nm         N:M semi-structured: in every M consecutive weights along the input dim keep the
             N best by magnitude or wanda score (2:4 by default)
  depth      remove the k decoder layers with the lowest Block Influence, 1 - cos(input, output
             hidden state) averaged over calibration tokens (Men et al., 2024, "ShortGPT")

Masks are boolean *keep* masks (True: the weight stays). Only Linear layers inside the
decoder blocks are pruned; embeddings and lm_head never are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from polmctl.errors import ConfigError, ModelError
from polmctl.losses.sft import shifted_token_nll

# -- pure functions of tensors ------------------------------------------------------------


def zero_fraction(t: torch.Tensor) -> float:
    """Fraction of the entries of ``t`` that are exactly zero."""
    return float((t == 0).sum().item()) / max(t.numel(), 1)


def _check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that removes exactly ``round(sparsity * numel)`` entries of smallest |W| (whole tensor)."""
    _check_sparsity(sparsity)
    k = int(round(sparsity * weight.numel()))
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if k:
        keep[torch.topk(weight.detach().abs().flatten().float(), k, largest=False, sorted=False).indices] = False
    return keep.view_as(weight)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that removes the ``round(sparsity * in_features)`` lowest scores of every output row."""
    _check_sparsity(sparsity)
    k = int(round(sparsity * scores.shape[-1]))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(-1, torch.topk(scores.float(), k, dim=-1, largest=False, sorted=False).indices, False)
    return keep


def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: ``weight`` is [out, in], ``act_norm`` the [in] L2 norms of each input channel."""
    if act_norm.shape != weight.shape[-1:]:
        raise ValueError(
            f"activation norms of shape {tuple(act_norm.shape)} do not match the input dim of a "
            f"weight of shape {tuple(weight.shape)}"
        )
    return weight.detach().abs().float() * act_norm.to(weight.device, torch.float32).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, act_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's keep-mask: per output row, the ``sparsity`` fraction of lowest |W| * ||X|| removed."""
    return row_mask(wanda_scores(weight, act_norm), sparsity)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: in each group of ``m`` consecutive entries along the last (input) dim keep the ``n``
    highest scores, so every group holds exactly ``m - n`` zeros."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if scores.shape[-1] % m:
        raise ValueError(f"input dim {scores.shape[-1]} is not a multiple of M={m}")
    groups = scores.float().reshape(*scores.shape[:-1], -1, m)
    idx = torch.topk(groups, n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.reshape(scores.shape)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """ShortGPT's Block Influence summed over tokens: (sum of 1 - cos(x_in_t, x_out_t), token count).

    ``x_in`` / ``x_out`` are [..., hidden]; ``mask`` (same leading shape) selects real tokens.
    """
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
    if mask is not None:
        cos = cos[mask.bool()]
    return float((1 - cos).sum().item()), int(cos.numel())


def least_important(scores: Sequence[float], k: int) -> list[int]:
    """The indices of the ``k`` lowest scores, ascending by index (ties: the earlier layer)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:k])


def layers_to_drop(
    num_layers: int, num_layers_to_drop: int | None, layer_fraction: float, section: str = "method"
) -> int:
    """How many of ``num_layers`` decoder layers depth pruning removes; a ConfigError names the key
    when that is none or all of them."""
    if num_layers_to_drop is not None:
        key, k = f"{section}.num_layers_to_drop", num_layers_to_drop
    else:
        key, k = f"{section}.layer_fraction", int(math.floor(layer_fraction * num_layers + 0.5))
    if k < 1:
        raise ConfigError(
            key,
            f"drops {k} of the model's {num_layers} decoder layers; drop at least 1 "
            f"(e.g. {section}.num_layers_to_drop=1)",
        )
    if k >= num_layers:
        raise ConfigError(
            key,
            f"would drop {k} of the model's {num_layers} decoder layers; keep at least 1 (at most {num_layers - 1})",
        )
    return k


# -- finding what to prune ----------------------------------------------------------------


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``model.model.layers`` in Llama-style models)."""
    base = base_model(model)
    inner = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    for holder in (inner, base):
        layers = getattr(holder, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    n = getattr(_text_config(base), "num_hidden_layers", None)
    for _, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and n and len(module) == n:
            return module
    raise ModelError(
        f"cannot find the decoder layers of {type(base).__name__} (no model.layers, and no ModuleList "
        "of config.num_hidden_layers blocks); pruning supports decoder-only transformers models"
    )


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _selected(name: str, modules: Sequence[str]) -> bool:
    if "all-linear" in modules:
        return True
    parts = name.split(".")
    return any(m in parts or name.endswith(m) for m in modules)


def prunable_linears(model: nn.Module, modules: Sequence[str] = ("all-linear",)) -> dict[str, nn.Linear]:
    """``{full name: Linear}`` for the Linear layers inside the decoder blocks that ``modules`` selects
    ('all-linear', or name parts such as 'mlp' or 'q_proj'). Names are the base model's
    (``model.layers.0.self_attn.q_proj``), as in its state dict."""
    base = base_model(model)
    layers = decoder_layers(base)
    inside = {id(m) for layer in layers for m in layer.modules()}
    found = {
        name: m
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and id(m) in inside and _selected(name, modules)
    }
    if not found:
        raise ConfigError(
            "method.modules",
            f"selects no Linear layer inside the decoder blocks (got {list(modules)}); "
            "use ['all-linear'] or parts of names such as mlp, q_proj",
        )
    return found


def check_prunable(model: nn.Module) -> None:
    """A ModelError if the weights are not plain floating-point tensors (a quantized model)."""
    base = base_model(model)
    if getattr(base, "is_quantized", False) or getattr(base.config, "quantization_config", None):
        raise ModelError(
            "model.name_or_path holds a quantized model; pruning needs full-precision weights: "
            "prune the full-precision model, then quantize the pruned one"
        )
    for name, p in base.named_parameters():
        if not p.is_floating_point():
            raise ModelError(
                f"{name} is stored as {p.dtype}, not floating point (a quantized layer); pruning "
                "needs full-precision weights"
            )


def count_parameters(model: nn.Module) -> int:
    """Parameters, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# -- calibration --------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    act_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear name -> [in] L2 norms of its input
    layer_importance: list[float] = field(default_factory=list)  # Block Influence of each decoder layer
    nll: float = 0.0  # mean next-token NLL over the labelled tokens
    tokens: int = 0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    linears: dict[str, nn.Linear] | None = None,
    layer_importance: bool = False,
) -> CalibrationResult:
    """One pass over ``batches`` (``input_ids``, ``attention_mask``, ``labels``): the perplexity on
    them, the input-channel L2 norms of each of ``linears``, and with ``layer_importance`` the
    Block Influence of every decoder layer. Padding tokens are left out of every measure."""
    current: dict[str, torch.Tensor] = {}
    sq = {name: None for name in (linears or {})}
    bi = []
    handles = []

    def tokens_of(x: torch.Tensor) -> torch.Tensor:
        mask = current["mask"]
        return x[mask] if x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])

    def linear_hook(name):
        def hook(module, args):
            x = tokens_of(args[0]).float()
            total = (x * x).sum(0)
            sq[name] = total if sq[name] is None else sq[name] + total

        return hook

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            mask = current["mask"] if x_in.shape[:-1] == current["mask"].shape else None
            s, n = block_influence(x_in, x_out, mask)
            bi[i][0] += s
            bi[i][1] += n

        return hook

    was_training = model.training
    model.eval()
    try:
        for name, module in (linears or {}).items():
            handles.append(module.register_forward_pre_hook(linear_hook(name)))
        if layer_importance:
            for i, layer in enumerate(decoder_layers(model)):
                bi.append([0.0, 0])
                handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        device = next(model.parameters()).device
        nll, count = 0.0, 0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            current["mask"] = batch["attention_mask"].bool()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            batch_nll, batch_count = shifted_token_nll(logits, batch["labels"])
            nll += batch_nll.item()
            count += int(batch_count)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return CalibrationResult(
        act_norms={name: total.sqrt() for name, total in sq.items() if total is not None},
        layer_importance=[s / max(n, 1) for s, n in bi],
        nll=nll / max(count, 1),
        tokens=count,
    )


# -- applying masks and dropping layers ---------------------------------------------------


@torch.no_grad()
def prune_linears(
    linears: dict[str, nn.Linear],
    *,
    criterion: str,
    sparsity: float = 0.5,
    n: int = 2,
    m: int = 4,
    nm_score: str = "magnitude",
    act_norms: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Zero the weights of each Linear in place by ``criterion`` (magnitude | wanda | nm); returns
    ``{"<name>.weight": fraction of zeros}`` for every pruned tensor."""
    achieved = {}
    for name, module in linears.items():
        w = module.weight
        needs_norms = criterion == "wanda" or (criterion == "nm" and nm_score == "wanda")
        if needs_norms and (act_norms is None or name not in act_norms):
            raise ModelError(
                f"no calibration activations reached {name}; wanda scores need it to run in the forward pass"
            )
        if criterion == "magnitude":
            keep = magnitude_mask(w, sparsity)
        elif criterion == "wanda":
            keep = wanda_mask(w, act_norms[name], sparsity)
        elif criterion == "nm":
            if w.shape[-1] % m:
                raise ConfigError("method.nm_m", f"{name} has {w.shape[-1]} input features, not a multiple of M={m}")
            scores = wanda_scores(w, act_norms[name]) if nm_score == "wanda" else w.detach().abs()
            keep = nm_mask(scores, n, m)
        else:
            raise ValueError(f"unknown pruning criterion {criterion!r}")
        w.masked_fill_(~keep, 0)
        achieved[f"{name}.weight"] = zero_fraction(w)
    return achieved


def drop_layers(model: nn.Module, indices: Iterable[int]) -> list[int]:
    """Remove the decoder layers at ``indices`` in place so the model still saves, reloads with
    ``from_pretrained`` and generates with a KV cache: the ModuleList is renumbered, every
    ``layer_idx`` in a kept layer set to its new position, and the config's ``num_hidden_layers``
    (and ``layer_types``, when it has one) updated. Returns the kept layers' old indices."""
    layers = decoder_layers(model)
    drop = sorted(set(indices))
    if not drop or drop[0] < 0 or drop[-1] >= len(layers) or len(drop) >= len(layers):
        raise ValueError(f"cannot drop layers {drop} of {len(layers)}")
    kept = [i for i in range(len(layers)) if i not in drop]
    for i in reversed(drop):
        del layers[i]  # nn.ModuleList renumbers its keys: model.layers.0 .. k-1
    for new, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    config = _text_config(base_model(model))
    if isinstance(getattr(config, "layer_types", None), (list, tuple)):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)
    return kept
