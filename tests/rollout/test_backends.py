"""Rollout generation backends: a shared prefill changes nothing but the work done, samples come
back grouped, stop strings end completions, and the vLLM backend fails clearly where it cannot run."""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from polmctl.config.schema import PeftConfig
from polmctl.data import format_prompt
from polmctl.errors import TrainingError
from polmctl.models import apply_peft
from polmctl.models.tiny import build_tiny_model
from polmctl.rollout import generate
from polmctl.rollout.backends import (
    VLLM_MISSING,
    VLLM_NO_CUDA,
    TransformersBackend,
    VLLMBackend,
    generate_groups,
    make_backend,
)
from polmctl.rollout.generate import generation_mode

pytestmark = pytest.mark.unit
TEXTS = ("hi", "a much longer prompt here", "2+2")  # three lengths: the batch is left-padded


def varied_base(tok, g: torch.Generator):
    """The tiny model with large random weights drawn from ``g``: its greedy text varies (the
    stock tiny model repeats its input's last byte), still deterministic."""
    model = build_tiny_model(tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def varied_model(tok, method: str = "none"):
    """``varied_base`` with an adapter (random trainable weights) that changes the output."""
    g = torch.Generator().manual_seed(0)
    model = varied_base(tok, g)
    model = apply_peft(model, PeftConfig(method=method, r=4, num_virtual_tokens=4), tok)
    with torch.no_grad():  # an adapter that changes the output, so dropping it would show
        for p in model.parameters():
            if p.requires_grad and method != "none":
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def options(**kw):
    return SimpleNamespace(**{"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8, "stop": [], **kw})


@pytest.mark.parametrize("method", ["none", "lora"])
def test_shared_prefill_gives_the_unshared_tokens_and_scores(tiny_tokenizer, method):
    tok, G = tiny_tokenizer, 3
    model = varied_model(tok, method)
    prompts = [format_prompt(t, tok) for t in TEXTS]
    embed = model.get_input_embeddings()
    shapes: list[tuple[int, ...]] = []
    hook = embed.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    runs = {}
    try:
        with torch.no_grad(), generation_mode(model, tok):
            for share in (True, False):
                shapes.clear()
                out, width = generate_groups(
                    model,
                    tok,
                    prompts,
                    G,
                    share_prefill=share,
                    max_new_tokens=10,
                    do_sample=False,
                    output_scores=True,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                runs[share] = out, list(shapes)
    finally:
        hook.remove()
    (shared, shared_calls), (plain, plain_calls) = runs[True], runs[False]
    assert len({len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}) == 3
    assert shared.sequences.shape[0] == len(prompts) * G
    assert torch.equal(shared.sequences, plain.sequences)
    assert len(shared.scores) == len(plain.scores) == 10
    for a, b in zip(shared.scores + shared.logits, plain.scores + plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the work differs: the shared run prefills each prompt once, then feeds G rows one token at a time
    assert plain_calls[0] == (len(prompts) * G, width)
    assert shared_calls[0] == (len(prompts), width - 1)
    assert all(n == 1 for _, n in shared_calls[1:])
    # and the grouped rows are the unshared generate's completions, each prompt's G in a row
    backend = TransformersBackend().generate(model, tok, prompts, G, max_new_tokens=10, do_sample=False)
    assert backend == [c for c in generate(model, tok, prompts, max_new_tokens=10, decode=False) for _ in range(G)]


def test_samples_come_back_grouped(tiny_tokenizer):
    tok, G = tiny_tokenizer, 4
    model = varied_model(tok)
    prompts = [format_prompt(t, tok) for t in TEXTS]
    greedy = generate(model, tok, prompts, max_new_tokens=6, decode=False)
    assert len(set(map(tuple, greedy))) == len(prompts)  # the prompts are told apart by their answers
    # near-zero temperature: every sample is its prompt's greedy answer, so order shows the grouping
    cold = TransformersBackend().sample(model, tok, prompts, G, options(temperature=1e-4, max_new_tokens=6))
    assert cold == [c for c in greedy for _ in range(G)]
    hot = TransformersBackend().sample(model, tok, prompts, G, options(max_new_tokens=6))
    assert len(hot) == len(prompts) * G and all(1 <= len(c) <= 6 for c in hot)
    assert len(set(map(tuple, hot))) > len(prompts)  # sampled, not G copies
    assert model.training is False  # left as found (eval)


def _printable(tok, token: int) -> bool:
    text = tok.decode([token])
    return len(text) == 1 and text.isascii() and text.isprintable()


def _stop_from(tok, tokens: list[int]) -> tuple[str, int]:
    """A stop string of two printable tokens from the middle of a greedy completion, and the
    length of the shortest prefix that holds it (where the completion must end)."""
    for k in range(2, len(tokens) - 2):
        if _printable(tok, tokens[k]) and _printable(tok, tokens[k + 1]):
            stop = tok.decode(tokens[k : k + 2])
            n = next(n for n in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:n]))
            if n < len(tokens):
                return stop, n
    raise AssertionError("no printable pair in the greedy completion; pick other weights")


def test_stop_strings_end_completions_in_generate(tiny_tokenizer):
    tok = tiny_tokenizer
    model = varied_model(tok)
    prompts = [format_prompt(t, tok) for t in TEXTS]
    full = generate(model, tok, prompts, max_new_tokens=24, decode=False)
    stop, n = _stop_from(tok, full[1])
    cut = generate(model, tok, prompts, max_new_tokens=24, decode=False, stop=[stop])
    assert cut[1] == full[1][:n]
    assert tok.decode(cut[1]).endswith(stop) and tok.decode(cut[1]).count(stop) == 1
    for whole, part in zip(full, cut):  # the other rows: cut at their own first stop string, or untouched
        assert whole[: len(part)] == part
        assert stop in tok.decode(part) or part == whole
    texts = generate(model, tok, prompts, max_new_tokens=24, stop=[stop])
    assert texts[1] == tok.decode(full[1][:n], skip_special_tokens=True)
    # generation itself stopped there, not only the returned tokens
    with torch.no_grad(), generation_mode(model, tok):
        out, width = generate_groups(model, tok, prompts[1:2], 1, stop=[stop], max_new_tokens=24, do_sample=False)
    assert out.shape[1] - width == n


def test_stop_strings_in_the_backend_drop_the_padding_of_early_rows(tiny_tokenizer):
    tok, G = tiny_tokenizer, 2
    model = varied_model(tok)
    prompts = [format_prompt(t, tok) for t in TEXTS]
    full = generate(model, tok, prompts, max_new_tokens=24, decode=False)
    stop, n = _stop_from(tok, full[1])
    ids = TransformersBackend().sample(
        model, tok, prompts, G, options(temperature=1e-4, max_new_tokens=24, stop=[stop])
    )
    assert ids[2] == ids[3] == full[1][:n]
    assert all(tok.pad_token_id not in c for c in ids)


def test_a_stop_string_needs_no_prompt_text(tiny_tokenizer):
    """Only the completion is searched: the prompt's last character + the first new one is no stop
    (transformers' stop_strings= would stop there, after one token; vLLM would not)."""
    tok = tiny_tokenizer
    model = varied_model(tok)
    prompts = ["2+2=", "ok.", "hi", "x y z", "12"]  # raw prompts: no chat template
    full = generate(model, tok, prompts, max_new_tokens=12, decode=False)
    i = next(i for i, c in enumerate(full) if _printable(tok, c[0]))
    stop = prompts[i][-1] + tok.decode(full[i][:1])
    cut = generate(model, tok, prompts[i : i + 1], max_new_tokens=12, decode=False, stop=[stop])
    expected = next((full[i][:n] for n in range(1, 13) if stop in tok.decode(full[i][:n])), full[i])
    assert cut == [expected] and len(expected) > 1


def test_stop_strings_end_completions_in_the_own_decoding_loop(tiny_tokenizer):
    tok = tiny_tokenizer
    model = varied_model(tok, "prompt_tuning")  # decoded by _decode_without_cache
    prompts = [format_prompt(t, tok) for t in TEXTS]
    full = generate(model, tok, prompts, max_new_tokens=24, decode=False)
    row = next(r for r in range(len(full)) if any(_printable(tok, t) for t in full[r][2:-3]))
    stop, n = _stop_from(tok, full[row])
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        cut = generate(model, tok, prompts[row : row + 1], max_new_tokens=24, decode=False, stop=[stop])
    finally:
        hook.remove()
    assert cut == [full[row][:n]]
    assert len(forwards) == n  # one forward per new token, and none after the stop string
    grouped = TransformersBackend().sample(
        model, tok, prompts, 2, options(temperature=1e-4, max_new_tokens=24, stop=[stop])
    )
    assert grouped[2 * row] == grouped[2 * row + 1] == full[row][:n]


def test_sampling_draws_from_the_full_distribution_unless_top_k_is_set(tiny_tokenizer, monkeypatch):
    """transformers' sampling applies top_k=50 unless told otherwise; RL samples the full policy. polmctl
    samples through its own logits processors (rollout/generate.py: decoding_kwargs): a top-k
    warper only when top_k is set, and never generate's own sampling (whose default would apply)."""
    from transformers.generation.logits_process import TopKLogitsWarper

    tok = tiny_tokenizer
    model = varied_model(tok)
    seen = []
    real = model.generate

    def spy(*a, **kw):
        seen.append((kw["do_sample"], [w.top_k for w in kw["logits_processor"] if isinstance(w, TopKLogitsWarper)]))
        return real(*a, **kw)

    monkeypatch.setattr(model, "generate", spy)
    TransformersBackend().sample(model, tok, [format_prompt("hi", tok)], 2, options(max_new_tokens=2))
    TransformersBackend().sample(model, tok, [format_prompt("hi", tok)], 2, options(max_new_tokens=2, top_k=5))
    assert seen == [(False, []), (False, [5])]


def test_make_backend_picks_by_name():
    assert isinstance(make_backend(options(generation_backend="transformers")), TransformersBackend)
    assert isinstance(make_backend(SimpleNamespace()), TransformersBackend)  # a method without the option


def test_vllm_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(TrainingError) as err:
        make_backend(options(generation_backend="vllm"))
    message = str(err.value)
    assert message == VLLM_MISSING and "\n" not in message
    for part in (
        "method.generation_backend=vllm",
        "vLLM is not installed",
        "pip install 'polmctl[vllm]'",
        "CUDA only",
        "method.generation_backend=transformers",
    ):
        assert part in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_vllm_without_cuda_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="needs a CUDA GPU") as err:
        make_backend(options(generation_backend="vllm"))
    assert str(err.value) == VLLM_NO_CUDA and "method.generation_backend=transformers" in VLLM_NO_CUDA


class FakeEngine:
    """Stands in for the vLLM engine: records the weights loaded and the requests made."""

    def __init__(self, outputs=None):
        self.loaded: dict[str, torch.Tensor] = {}
        self.resets = 0
        self.outputs, self.requests = outputs, None
        model = SimpleNamespace(load_weights=lambda pairs: self.loaded.update((n, t.clone()) for n, t in pairs))
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, requests, sampling_params, use_tqdm):
        self.requests, self.params = requests, sampling_params
        return self.outputs


def fake_vllm_backend(engine) -> VLLMBackend:
    backend = object.__new__(VLLMBackend)  # no vllm here: skip the import and the CUDA check
    backend.vllm = SimpleNamespace(SamplingParams=lambda **kw: kw)
    backend.llm = engine
    return backend


def test_vllm_weight_sync_sends_merged_lora_weights_under_base_names(tiny_tokenizer):
    tok = tiny_tokenizer
    model = varied_model(tok, "lora")
    base_names = set(build_tiny_model(tok).state_dict())
    x = torch.tensor([tok("2+2", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=x).logits
        model.merge_adapter()
        merged = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
        model.unmerge_adapter()
    engine = FakeEngine()
    fake_vllm_backend(engine)._load_weights(model)
    assert engine.loaded and not any("lora" in n or "base_layer" in n for n in engine.loaded)
    assert set(engine.loaded) <= base_names
    assert {n.replace(".base_layer", "") for n in merged if "lora_" not in n} == set(engine.loaded)
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(engine.loaded[q], merged[q.replace("q_proj.", "q_proj.base_layer.")])
    assert not torch.equal(engine.loaded[q], build_tiny_model(tok).state_dict()[q])
    assert engine.resets == 1
    with torch.no_grad():  # unmerged again: the adapter still trains as before
        torch.testing.assert_close(model(input_ids=x).logits, before)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_vllm_sample_asks_for_groups_and_returns_cut_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    eos, a, b, c = tok.eos_token_id, *tok("abc", add_special_tokens=False)["input_ids"]

    def out(index, ids, finish, reason=None):
        return SimpleNamespace(index=index, token_ids=ids, finish_reason=finish, stop_reason=reason)

    outputs = [
        SimpleNamespace(outputs=[out(1, [b, eos], "stop"), out(0, [a, b], "stop")]),  # EOS left out: added
        SimpleNamespace(outputs=[out(0, [a, b, c, a], "stop", "c"), out(1, [a, a, a], "length")]),
    ]
    engine = FakeEngine(outputs)
    model = varied_model(tok)
    prompts = [format_prompt(t, tok) for t in TEXTS[:2]]
    ids = fake_vllm_backend(engine).sample(
        model, tok, prompts, 2, options(stop=["c"], temperature=0.7, top_p=0.9, max_new_tokens=3)
    )
    assert ids == [[a, b, eos], [b, eos], [a, b, c], [a, a, a]]
    assert engine.params == {
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "max_tokens": 3,
        "stop": ["c"],
        "include_stop_str_in_output": True,
    }
    assert engine.requests == [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    assert engine.loaded and engine.resets == 1  # weights pushed before sampling


HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM (pip install 'polmctl[vllm]') and a CUDA GPU"
)
def test_vllm_samples_the_current_policy(tiny_tokenizer, tmp_path):
    tok, G = tiny_tokenizer, 3
    model = varied_model(tok, "lora")
    model.get_base_model().save_pretrained(tmp_path)  # vLLM starts from the model's dir
    tok.save_pretrained(tmp_path)
    model.get_base_model().config._name_or_path = str(tmp_path)
    model = model.cuda()
    prompts = [format_prompt(t, tok) for t in TEXTS]
    backend = make_backend(options(generation_backend="vllm"))
    ids = backend.sample(model, tok, prompts, G, options(temperature=1.0, max_new_tokens=8))
    assert len(ids) == len(prompts) * G and all(1 <= len(c) <= 8 for c in ids)
    # near-greedy: the first token of each sample is the policy's (LoRA included) argmax
    cold = backend.sample(model, tok, prompts, G, options(temperature=1e-4, max_new_tokens=4))
    expected = generate(model, tok, prompts, max_new_tokens=1, decode=False)
    assert [c[:1] for c in cold] == [e for e in expected for _ in range(G)]
    with torch.no_grad():  # new weights reach the engine on the next call
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(-3)
    cold = backend.sample(model, tok, prompts, G, options(temperature=1e-4, max_new_tokens=4))
    expected = generate(model, tok, prompts, max_new_tokens=1, decode=False)
    assert [c[:1] for c in cold] == [e for e in expected for _ in range(G)]
