"""Knowledge editing on a toy model that knows twelve capitals (tests/editing/facts_model.py): ROME's
rank-one update moves the edited answer by a large factor and leaves unrelated text alone, MEMIT
spreads a batch over its layers, causal tracing is a function of its seed; requests are checked."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from polmctl.data import encode_dataset, load_rows, pad_collate
from polmctl.editing.evaluate import aggregate, drift, greedy_answers, measure, next_token_logprobs, score_targets
from polmctl.editing.facts import RELATIONS, fact_requests, known
from polmctl.editing.hooks import mlp_down
from polmctl.editing.memit import layer_update, memit_edit
from polmctl.editing.memory import ValueSettings, context_prefixes, key_second_moments
from polmctl.editing.requests import EditRequest, load_requests, locate_subject, parse_request
from polmctl.editing.rome import rank_one_update, rome_edit
from polmctl.editing.trace import causal_trace
from polmctl.errors import DataError
from polmctl.models.tiny import build_tiny_model, build_tiny_tokenizer
from tests.editing.facts_model import toy_requests, unseen_answers

pytestmark = pytest.mark.unit

LAST = ValueSettings(fact_token="last")


@pytest.fixture()
def toy(facts_model_dir):
    model = AutoModelForCausalLM.from_pretrained(facts_model_dir)
    model.eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(facts_model_dir)


@pytest.fixture(scope="module")
def calibration(facts_model_dir):
    tok = AutoTokenizer.from_pretrained(facts_model_dir)
    rows = load_rows("builtin:domain_text", "train", max_rows=100)
    examples, _ = encode_dataset(rows, tok, source="cal", max_length=256, completion_only_loss=False)
    return [pad_collate(examples[i : i + 8], tok.pad_token_id) for i in range(0, len(examples), 8)]


def unrelated_prompts() -> list[str]:
    rows = load_rows("builtin:domain_text", "test", max_rows=20)
    return [" ".join(r["text"].split()[:k]) for r in rows for k in (4, 9)]


def with_target(request: EditRequest, target: str) -> EditRequest:
    return EditRequest(
        request.subject, request.prompt, target, request.target_true, request.paraphrases, request.neighbours
    )


def test_the_toy_model_knows_its_facts(toy):
    model, tok = toy
    assert sum(known(model, tok, toy_requests())) >= 10


def test_rome_moves_the_edited_answer_by_a_large_factor_and_leaves_unrelated_text_alone(toy, calibration):
    model, tok = toy
    request = with_target(toy_requests()[0], unseen_answers()[0])  # an answer the toy never gives
    covs, tokens = key_second_moments(model, [2], calibration)
    assert tokens > mlp_down(model, 2).in_features
    before = aggregate(measure(model, tok, [request], [request.target_true]))
    unrelated = unrelated_prompts()
    logits_before = next_token_logprobs(model, tok, unrelated)
    weight_before = mlp_down(model, 2).weight.clone()
    untouched = {n: p.clone() for n, p in model.named_parameters()}

    update = rome_edit(model, tok, request, 2, covs[2], context_prefixes(model, tok, 3, 8, seed=0), LAST)

    after = aggregate(measure(model, tok, [request], [request.target_true]))
    assert after["efficacy"]["prob_target"] > 10 * before["efficacy"]["prob_target"]
    assert after["generalisation"]["prob_target"] > 10 * before["generalisation"]["prob_target"]
    moved = drift(logits_before, next_token_logprobs(model, tok, unrelated))
    assert moved["kl"] < 1e-4 and moved["max_prob_change"] < 1e-3
    change = mlp_down(model, 2).weight - weight_before
    assert torch.linalg.matrix_rank(change).item() == 1
    assert torch.allclose(change, update.matrix, atol=1e-5)
    others = [n for n, p in model.named_parameters() if n != "model.layers.2.mlp.down_proj.weight"]
    assert all(torch.equal(dict(model.named_parameters())[n], untouched[n]) for n in others)


def test_rome_without_the_decay_term_flips_the_answer(toy, calibration):
    """The paper's decay and clamp keep the value near the old one; loosened, the edit takes over."""
    model, tok = toy
    request = with_target(toy_requests()[0], unseen_answers()[0])
    covs, _ = key_second_moments(model, [2], calibration)
    assert aggregate(measure(model, tok, [request], [request.target_true]))["efficacy"]["exact_match"] == 0.0
    settings = ValueSettings(fact_token="last", weight_decay=0.0, clamp_norm_factor=10.0)
    rome_edit(model, tok, request, 2, covs[2], [""], settings)
    after = aggregate(measure(model, tok, [request], [request.target_true]))
    assert after["efficacy"]["exact_match"] == 1.0 and after["generalisation"]["exact_match"] > 0


def test_rank_one_update_writes_the_value_into_the_key():
    torch.manual_seed(0)
    x = torch.randn(500, 16, dtype=torch.float64)
    cov = x.T @ x / 500
    key, delta = torch.randn(16), torch.randn(8)
    weight = torch.randn(8, 16, dtype=torch.float64)
    u, right = rank_one_update(key, delta, cov)
    edited = weight + torch.outer(right, u)
    assert torch.allclose(edited @ key.double(), weight @ key.double() + delta.double(), atol=1e-8)
    assert torch.linalg.matrix_rank(edited - weight).item() == 1


def test_memit_layer_update_solves_its_least_squares_problem():
    """Delta = R K^T (lambda C + K K^T)^-1 minimises |Delta K^T - R^T|^2 + lambda tr(Delta C Delta^T)."""
    torch.manual_seed(0)
    keys, residuals = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    x = torch.randn(200, 10, dtype=torch.float64)
    cov = x.T @ x / 200
    delta = layer_update(keys, residuals, cov, 2.0).requires_grad_(True)
    objective = ((delta @ keys.T - residuals.T) ** 2).sum() + 2.0 * torch.trace(delta @ cov @ delta.T)
    (grad,) = torch.autograd.grad(objective, delta)
    assert grad.abs().max() < 1e-8
    small = layer_update(keys, residuals, cov, 1e-9)
    assert torch.allclose(small @ keys.T, residuals.T, atol=1e-5)  # no prior: the keys map to the residuals


def test_memit_spreads_a_batch_over_its_layers(toy, calibration):
    model, tok = toy
    requests = [with_target(r, t) for r, t in zip(toy_requests()[:3], unseen_answers())]
    covs, _ = key_second_moments(model, [0, 1, 2], calibration)
    before = aggregate(measure(model, tok, requests, [r.target_true for r in requests]))
    weights = {i: mlp_down(model, i).weight.clone() for i in range(4)}
    settings = ValueSettings(fact_token="last", clamp_norm_factor=2.0, steps=25)
    result = memit_edit(model, tok, requests, [0, 1, 2], covs, context_prefixes(model, tok, 3, 8, 0), settings, 128.0)

    after = aggregate(measure(model, tok, requests, [r.target_true for r in requests]))
    assert after["efficacy"]["prob_target"] > 10 * before["efficacy"]["prob_target"]
    assert [u.layer for u in result.updates] == [0, 1, 2]
    norms = []
    for i in (0, 1, 2):
        change = mlp_down(model, i).weight - weights[i]
        assert 1 <= torch.linalg.matrix_rank(change).item() <= len(requests)
        norms.append(float(change.norm() / weights[i].norm()))
    assert min(norms) > 0.1 * max(norms), norms  # every layer takes a share, none all of it
    assert torch.equal(mlp_down(model, 3).weight, weights[3])
    residuals = [u.residual_before for u in result.updates] + [result.residual_after]
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < 0.5 * residuals[0]


def test_causal_trace_returns_a_layer_and_is_a_function_of_its_seed(toy):
    model, tok = toy
    requests = toy_requests()[:4]
    first = causal_trace(model, tok, requests, samples=4, seed=3)
    again = causal_trace(model, tok, requests, samples=4, seed=3)
    other = causal_trace(model, tok, requests, samples=4, seed=4)
    assert first.layer in first.candidates == [0, 1, 2]  # the last layer's state at the subject reaches no later token
    assert first.effects == again.effects and first.layer == again.layer
    assert first.effects != other.effects
    assert first.p_corrupted < first.p_clean
    assert first.answers == [r.target_true for r in requests]
    mlp_trace = causal_trace(model, tok, requests, samples=4, seed=3, module="mlp", fact_token="last")
    assert mlp_trace.candidates == [0, 1, 2, 3] and mlp_trace.layer in mlp_trace.candidates


def test_score_targets_agrees_with_greedy_generation(toy):
    model, tok = toy
    request = toy_requests()[0]
    (score,) = score_targets(model, tok, [(request.text, request.target_true)])
    ids = tok(request.text, return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=score.tokens, do_sample=False)[0, ids.shape[1] :]
    assert score.greedy == (tok.decode(generated).strip() == request.target_true)
    assert score.greedy and score.logprob < 0 and score.tokens == 1


def test_a_request_without_target_true_is_measured_against_the_models_own_answer(toy):
    model, tok = toy
    r = toy_requests()[0]
    bare = EditRequest(r.subject, r.prompt, unseen_answers()[0])
    assert greedy_answers(model, tok, [bare]) == [r.target_true]


def test_subject_is_located_on_byte_and_word_tokenizers(toy):
    _, words = toy
    subject = toy_requests()[0].subject
    found = locate_subject(words, "The capital of {} is", subject, prefix="Therefore it rains. ")
    assert words.decode(found.ids[found.subject_first : found.subject_last + 1]) == subject
    assert found.position == found.subject_last
    assert locate_subject(words, "The capital of {} is", subject, fact_token="last").position == 4
    tiny = build_tiny_tokenizer()
    found = locate_subject(tiny, "{} was written by", "Hamlet")
    assert (found.subject_first, found.subject_last) == (0, 5)


def test_builtin_facts_are_deterministic_and_counterfactual():
    a, b = fact_requests(seed=1), fact_requests(seed=1)
    assert [r.as_row() for r in a] == [r.as_row() for r in b]
    assert [r.as_row() for r in a] != [r.as_row() for r in fact_requests(seed=2)]
    assert len(a) == sum(len(pairs) for _, _, pairs in RELATIONS.values())
    for r in a:
        assert r.target_new != r.target_true and r.prompt.count("{}") == 1
        assert len(r.paraphrases) == 2 and all(r.subject in p for p in r.paraphrases)
        assert len(r.neighbours) == 2 and all(r.subject not in n.prompt for n in r.neighbours)


def test_a_random_model_knows_no_builtin_fact():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok).eval()
    assert not any(known(model, tok, fact_requests()[:10]))


@pytest.mark.parametrize(
    "row,needle",
    [
        ({"prompt": "{} is in", "target_new": "Rome"}, "column 'subject' is missing"),
        ({"subject": "Paris", "prompt": "Paris is in", "target_new": "Rome"}, "exactly one {}"),
        ({"subject": "Paris", "prompt": "{} is in", "target_new": ""}, "column 'target_new' is empty"),
        ({"subject": "Paris", "prompt": "{} is in", "target_new": "Rome", "target_true": "Rome"}, "must change"),
        ({"subject": "Paris", "prompt": "{} is in", "target_new": "Rome", "neighbours": ["Lyon is in"]}, "target_true"),
        ({"subject": "Paris", "prompt": "{} is in", "target_new": 3}, "expected text"),
    ],
)
def test_bad_request_rows_name_the_row_and_column(tmp_path, row, needle):
    path = tmp_path / "edits.jsonl"
    good = {"subject": "Lyon", "prompt": "{} is a city in", "target_new": "Spain"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="row 1") as info:
        load_requests(str(path))
    assert needle in str(info.value)


def test_request_rows_read_their_optional_columns_and_counterfact_rows():
    row = {
        "subject": "Paris",
        "prompt": "{} is the capital of",
        "target_new": "Italy",
        "target_true": "France",
        "paraphrases": ["The city of {} is the capital of"],
        "neighbours": ["Lyon is a city in", {"prompt": "Berlin is the capital of", "answer": "Germany"}],
    }
    r = parse_request(row, "row 0")
    assert r.text == "Paris is the capital of" and r.paraphrases == ["The city of Paris is the capital of"]
    assert [(n.prompt, n.answer) for n in r.neighbours] == [
        ("Lyon is a city in", "France"),
        ("Berlin is the capital of", "Germany"),
    ]
    counterfact = {
        "requested_rewrite": {
            "prompt": "{} is the capital of",
            "subject": "Paris",
            "target_new": {"str": "Italy"},
            "target_true": {"str": "France"},
        },
        "paraphrase_prompts": ["Paris, the capital of"],
        "neighborhood_prompts": ["Lyon is a city in"],
    }
    c = parse_request(counterfact, "row 0")
    assert (c.subject, c.target_new, c.target_true, c.paraphrases) == (
        "Paris",
        "Italy",
        "France",
        ["Paris, the capital of"],
    )
    assert c.neighbours[0].answer == "France"
