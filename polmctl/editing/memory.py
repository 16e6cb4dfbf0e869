"""The MLP as a key-value memory (Meng et al. 2022, section 3): what ROME and MEMIT share.

  polmctl run recipe=edit      (the callers: polmctl/editing/rome.py, memit.py)

context_prefixes   short texts the model writes itself, put before a prompt so a key stands for
                   the subject in many contexts, not one sentence (the reference code's
                   "{generated}. {prompt}" templates)
key_second_moments C = E[k k^T] of an MLP's keys (its down_proj inputs) over calibration text
subject_keys       the key at the subject's last token, averaged over the prefixes
optimise_value     the vector that, added to a module's output at the subject's last token,
                   makes the model say target_new (NLL), while a KL term on "{subject} is a"
                   keeps what the model says about the subject otherwise, a decay term keeps
                   it small and a clamp bounds its norm
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from polmctl.editing.hooks import add_at, device_of, mlp_down, padded, patched_output, values_at
from polmctl.editing.requests import EditRequest, locate_subject, target_ids
from polmctl.errors import ConfigError

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


def context_prefixes(model, tokenizer, count: int, length: int, seed: int) -> list[str]:
    """``""`` and ``count`` texts of up to ``length`` tokens sampled from the model (top-k 5, seeded),
    each opening with one of a few common words and ending in ". "."""
    from polmctl.rollout import generate

    starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(count)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        texts = generate(
            model, tokenizer, starts, max_new_tokens=length, batch_size=max(count, 1), do_sample=True, top_k=5
        )
    prefixes = [""]
    for start, text in zip(starts, texts):
        clean = " ".join((start + text).replace("{", " ").replace("}", " ").split())
        prefixes.append(clean + ". ")
    return prefixes


@torch.no_grad()
def key_second_moments(model, layers: Iterable[int], batches: Iterable[dict]) -> tuple[dict[int, torch.Tensor], int]:
    """``{layer: E[k k^T]}`` (float64, [d, d]) of each layer's down_proj inputs over every real token
    of ``batches`` (``input_ids``, ``attention_mask``), and the token count."""
    layers = list(layers)
    sums: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}
    handles = []

    def hook(layer):
        def pre(module, args):
            x = args[0][current["mask"]].double()
            sums[layer] = sums[layer] + x.T @ x if layer in sums else x.T @ x

        return pre

    device = device_of(model)
    tokens = 0
    try:
        for layer in layers:
            handles.append(mlp_down(model, layer).register_forward_pre_hook(hook(layer)))
        for batch in batches:
            mask = batch["attention_mask"].to(device).bool()
            current["mask"] = mask
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long(), use_cache=False)
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {layer: s / max(tokens, 1) for layer, s in sums.items()}, tokens


def check_calibration(tokens: int, dim: int) -> None:
    if tokens < dim:
        raise ConfigError(
            "method.calibration_rows",
            f"the calibration rows hold {tokens} tokens, fewer than the {dim} dimensions of the MLP keys, so "
            "their covariance is singular; raise method.calibration_rows (or use longer data.source rows)",
        )


def solve_covariance(cov: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``cov^-1 rhs`` in float64. A ridge of 1e-4 of the mean eigenvalue keeps directions the
    calibration text never used from getting unbounded weight."""
    d = cov.shape[0]
    ridge = 1e-4 * torch.trace(cov) / d
    eye = torch.eye(d, dtype=torch.float64, device=cov.device)
    return torch.linalg.solve(cov.double() + ridge * eye, rhs.double().to(cov.device))


def _prefixed(tokenizer, request: EditRequest, prefixes: list[str], fact_token: str):
    return [locate_subject(tokenizer, request.prompt, request.subject, p, request.where, fact_token) for p in prefixes]


def subject_keys(
    model,
    tokenizer,
    layer: int,
    requests: list[EditRequest],
    prefixes: list[str],
    batch_size: int,
    fact_token: str = "subject_last",
) -> torch.Tensor:
    """[len(requests), d]: each request's key at ``layer`` (its down_proj input at the lookup
    position), averaged over the prompt after each prefix."""
    found = [f for r in requests for f in _prefixed(tokenizer, r, prefixes, fact_token)]
    keys = values_at(
        model,
        mlp_down(model, layer),
        "input",
        [f.ids for f in found],
        [f.position for f in found],
        tokenizer.pad_token_id,
        batch_size,
    )
    return keys.view(len(requests), len(prefixes), -1).mean(1)


def bare_values(
    model, tokenizer, module: nn.Module, requests: list[EditRequest], batch_size: int, fact_token: str = "subject_last"
) -> torch.Tensor:
    """[len(requests), hidden]: ``module``'s output at the lookup position of each bare prompt."""
    found = [locate_subject(tokenizer, r.prompt, r.subject, where=r.where, fact_token=fact_token) for r in requests]
    return values_at(
        model, module, "output", [f.ids for f in found], [f.position for f in found], tokenizer.pad_token_id, batch_size
    )


@dataclass(frozen=True)
class ValueSettings:
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    kl_prompt: str = "{} is a"
    fact_token: str = "subject_last"  # where the value is written: subject_last | last


@dataclass
class ValueResult:
    init: torch.Tensor  # the module's output at the subject's last token of the bare prompt
    delta: torch.Tensor  # what the optimisation adds to it
    losses: list[float] = field(default_factory=list)
    prob_target: float = 0.0  # mean probability of target_new's tokens with delta in place


def optimise_value(
    model, tokenizer, request: EditRequest, module: nn.Module, prefixes: list[str], settings: ValueSettings
) -> ValueResult:
    """The delta added to ``module``'s output at the lookup position (the subject's last token) of
    every prefixed prompt and of the KL prompt that makes the model say ``target_new`` (ROME eq. 4 / MEMIT eq. 16):
    loss = mean NLL of target_new's tokens + kl_factor * KL(edited || original) of the next token
    after the KL prompt + weight_decay * |delta| / |init|^2, with |delta| clamped to
    clamp_norm_factor * |init| after each Adam step."""
    device = device_of(model)
    rows = []  # (ids, subject position, target start, target length)
    for f, prefix in zip(_prefixed(tokenizer, request, prefixes, settings.fact_token), prefixes):
        t = target_ids(tokenizer, prefix + request.text, request.target_new)
        rows.append((f.ids + t, f.position, len(f.ids), len(t)))
    kl = locate_subject(
        tokenizer,
        settings.kl_prompt,
        request.subject,
        where=f"{request.where} (KL prompt)",
        fact_token=settings.fact_token,
    )
    seqs = [r[0] for r in rows] + [kl.ids]
    batch = padded(seqs, tokenizer.pad_token_id, device)
    where_rows = torch.arange(len(seqs))
    where_pos = torch.tensor([r[1] for r in rows] + [kl.position])
    # The KL term reads the distribution after the whole KL prompt (what the model says the subject
    # "is a"), the paper's D_KL(P[x | p'] ...); the reference code reads it at the subject's token.
    kl_row, kl_last = len(rows), len(kl.ids) - 1

    init = values_at(model, module, "output", [seqs[0]], [rows[0][1]], tokenizer.pad_token_id)[0].detach()
    delta = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    max_norm = settings.clamp_norm_factor * init.norm()
    kl_init = None
    result = ValueResult(init=init, delta=delta.detach())
    with torch.enable_grad():
        for step in range(settings.steps):
            opt.zero_grad()
            with patched_output(module, add_at(where_rows, where_pos, delta)):
                logps = model(**batch, use_cache=False).logits.float().log_softmax(-1)
            nll_rows = []
            probs = []
            for i, (ids, _, start, n) in enumerate(rows):
                target = torch.tensor(ids[start : start + n], device=device)
                lp = logps[i, start - 1 : start - 1 + n].gather(-1, target[:, None]).squeeze(-1)
                nll_rows.append(-lp.mean())
                probs.append(lp.exp().mean())
            nll = torch.stack(nll_rows).mean()
            kl_now = logps[kl_row, kl_last]
            if kl_init is None:
                kl_init = kl_now.detach()
            kl_term = settings.kl_factor * (kl_now.exp() * (kl_now - kl_init)).sum()
            decay = settings.weight_decay * delta.norm() / init.norm().clamp(min=1e-12) ** 2
            loss = nll + kl_term + decay
            result.losses.append(loss.item())
            result.prob_target = float(torch.stack(probs).mean().detach())
            # The reference code's stopping rule; the last step is not taken, so the reported loss
            # is the loss of the delta returned.
            if loss.item() < 5e-2 or step == settings.steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    result.delta = delta.detach().clone()
    return result
