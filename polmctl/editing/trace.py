"""Causal tracing (Meng et al. 2022, section 2): which layer's state at the subject carries a fact.

    polmctl run recipe=edit                      # method.layer=null: the traced layer is edited
    polmctl run recipe=edit method.trace_module=mlp

For each request: a clean run gives the probability of the answer (target_true's tokens; the
model's own next token where a request has none) and every layer's state at the lookup position
(the subject's last token); corrupted runs add Gaussian noise (``noise_scale`` times the standard
deviation of the subject tokens' embeddings, the paper's 3x) to the subject's token embeddings,
which lowers it; a corrupted run with one layer's state at the lookup position restored to its
clean value gets some of it back. That gain, averaged over ``samples`` noise draws and over the
requests, is the layer's indirect effect; the layer with the largest one is chosen.
``module="hidden"`` restores the decoder layer's output (the residual stream), ``"mlp"`` only its
MLP's output (the paper's MLP trace, one layer rather than a window). The noise comes from a
generator seeded by ``seed``: the same seed gives the same layer.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from polmctl.editing.hooks import decoder_layer, device_of, mlp, num_layers, patched_output, recorded, set_at
from polmctl.editing.requests import EditRequest, locate_subject, target_ids

MODULES = ("hidden", "mlp")


@dataclass
class TraceResult:
    layer: int  # the candidate layer with the largest mean indirect effect
    effects: list[float]  # mean indirect effect of restoring each layer
    candidates: list[int]  # the layers an edit at the lookup position can act through
    p_clean: float  # mean probability of the answer, clean run
    p_corrupted: float  # the same with the subject corrupted
    answers: list[str]  # the traced answer of each request
    noise_std: float
    module: str


def _traced(model, layer: int, module: str):
    return decoder_layer(model, layer) if module == "hidden" else mlp(model, layer)


def _answer_logprob(logits: torch.Tensor, start: int, answer: list[int]) -> torch.Tensor:
    """[batch]: summed log-prob of ``answer``'s tokens, which start at position ``start``."""
    window = logits[:, start - 1 : start - 1 + len(answer)].float().log_softmax(-1)
    ids = torch.tensor(answer, device=logits.device).expand(logits.shape[0], -1)
    return window.gather(-1, ids[..., None]).squeeze(-1).sum(-1)


def editable_layers(n: int, positions_before_end: bool) -> list[int]:
    """The last layer's state at a position before the prompt's end reaches no later token (no
    attention follows it), so it cannot carry a fact there."""
    return list(range(n - 1)) if positions_before_end and n > 1 else list(range(n))


@torch.no_grad()
def causal_trace(
    model,
    tokenizer,
    requests: list[EditRequest],
    *,
    samples: int = 10,
    noise_scale: float = 3.0,
    seed: int = 0,
    module: str = "hidden",
    fact_token: str = "subject_last",
) -> TraceResult:
    if module not in MODULES:
        raise ValueError(f"module must be one of {MODULES}, got {module!r}")
    if not requests:
        raise ValueError("causal tracing needs at least one request")
    device = device_of(model)
    embed = model.get_input_embeddings()
    found = [locate_subject(tokenizer, r.prompt, r.subject, where=r.where, fact_token=fact_token) for r in requests]
    subject_ids = torch.tensor([t for f in found for t in f.ids[f.subject_first : f.subject_last + 1]], device=device)
    noise_std = noise_scale * float(embed.weight[subject_ids].float().std())
    n = num_layers(model)
    effects = torch.zeros(n, dtype=torch.float64)
    p_clean = p_corrupted = 0.0
    answers = []
    for index, (request, f) in enumerate(zip(requests, found)):
        prompt_ids = torch.tensor([f.ids], device=device)
        if request.target_true is not None:
            answer = target_ids(tokenizer, request.text, request.target_true)
        else:
            answer = [int(model(input_ids=prompt_ids, use_cache=False).logits[0, -1].argmax())]
        answers.append(tokenizer.decode(answer))
        ids = torch.tensor([f.ids + answer], device=device)
        stores = [{} for _ in range(n)]
        with ExitStack() as stack:
            for layer in range(n):
                stack.enter_context(recorded(_traced(model, layer, module), "output", stores[layer]))
            clean_logits = model(input_ids=ids, use_cache=False).logits
        clean = [stores[layer]["output"][0, f.position].detach() for layer in range(n)]
        p_clean += float(_answer_logprob(clean_logits, len(f.ids), answer).exp()[0])

        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        span = f.subject_last - f.subject_first + 1
        noise = torch.randn(samples, span, embed.weight.shape[1], generator=generator).to(device) * noise_std
        batch = ids.expand(samples, -1)
        rows, positions = torch.arange(samples), torch.full((samples,), f.position)

        def corrupt(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, f.subject_first : f.subject_last + 1] += noise.to(x.dtype)
            return x

        def answer_prob() -> float:
            logits = model(input_ids=batch, use_cache=False).logits
            return float(_answer_logprob(logits, len(f.ids), answer).exp().mean())

        with patched_output(embed, corrupt):
            low = answer_prob()
            p_corrupted += low
            for layer in range(n):
                with patched_output(
                    _traced(model, layer, module), set_at(rows, positions, clean[layer].expand(samples, -1))
                ):
                    effects[layer] += answer_prob() - low
    effects /= len(found)
    candidates = editable_layers(n, any(f.position < len(f.ids) - 1 for f in found))
    return TraceResult(
        layer=max(candidates, key=lambda layer: (float(effects[layer]), -layer)),
        effects=[float(e) for e in effects],
        candidates=candidates,
        p_clean=p_clean / len(found),
        p_corrupted=p_corrupted / len(found),
        answers=answers,
        noise_std=noise_std,
        module=module,
    )
