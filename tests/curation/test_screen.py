"""Screening: length bounds by the tokens training sees, dedup, IFD (deterministic, ranked, the
paper's formula), a reward-model bound; the kept file loads back in its format and encodes for SFT."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from polmctl.curation.rows import token_lengths
from polmctl.curation.scores import ifd_scores, reward_scores
from polmctl.curation.screen import Filters, screen, write_jsonl
from polmctl.data import detect_format, encode_dataset, encode_row, load_rows
from polmctl.errors import CommandError, DataError
from polmctl.losses import IGNORE_INDEX
from polmctl.models.tiny import build_tiny_model, build_tiny_tokenizer
from tests.curation.test_dedup import distinct_rows
from tests.editing.facts_model import build_facts_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def prompt_completion_rows() -> list[dict]:
    texts = distinct_rows(12, seed=3)
    return [{"prompt": f"Say: {t[:30]}", "completion": t[: 10 + 7 * i]} for i, t in enumerate(texts)]


def test_length_bounds_count_the_tokens_training_encodes(tok):
    rows = prompt_completion_rows()
    full = [len(encode_row(r, "prompt_completion", tok, max_length=10_000)["input_ids"]) for r in rows]
    answers = [token_lengths(r, "prompt_completion", tok, "row")[1] for r in rows]
    low, high = sorted(full)[3], sorted(full)[9]
    result = screen(rows, "prompt_completion", Filters(min_tokens=low, max_tokens=high), source="rows", tokenizer=tok)
    assert result.kept == [i for i, n in enumerate(full) if low <= n <= high]
    assert {d.row for d in result.dropped} == {i for i, n in enumerate(full) if not low <= n <= high}
    assert all(d.reason == "length" for d in result.dropped)
    answer_cut = sorted(answers)[6]
    result = screen(rows, "prompt_completion", Filters(max_answer_tokens=answer_cut), source="rows", tokenizer=tok)
    assert result.kept == [i for i, a in enumerate(answers) if a <= answer_cut]


def test_filter_drops_the_planted_duplicates_and_the_kept_file_trains(tmp_path, tok):
    rows = [{"prompt": f"Repeat: {t}", "completion": t} for t in distinct_rows(30)]
    planted = {
        30: ("exact_duplicate", 4),
        31: ("near_duplicate", 9),
        32: ("exact_duplicate", 17),
    }
    rows.append(dict(rows[4]))
    rows.append({"prompt": rows[9]["prompt"].lower(), "completion": rows[9]["completion"].replace(".", "!")})
    rows.append({"prompt": rows[17]["prompt"] + "  ", "completion": " " + rows[17]["completion"]})
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)  # duplicates anywhere after their original
    result = screen(rows, "prompt_completion", Filters(dedup=True, near_dedup=0.8), source="rows")
    assert {d.row: (d.reason, int(d.detail.rsplit(" ", 1)[1])) for d in result.dropped} == planted
    assert result.kept == list(range(30))

    out = tmp_path / "kept.jsonl"
    write_jsonl([rows[i] for i in result.kept], out)
    back = load_rows(str(out))
    assert back == rows[:30] and detect_format(back[0], str(out)) == "prompt_completion"
    examples, stats = encode_dataset(back, tok, source=str(out))
    assert stats.kept == 30 and len(examples) == 30


def test_conversational_rows_keep_their_format(tmp_path, tok):
    rows = load_rows("builtin:instructions", max_rows=20)
    rows.append(json.loads(json.dumps(rows[3])))
    result = screen(rows, "messages", Filters(dedup=True), source="builtin:instructions")
    assert [d.row for d in result.dropped] == [20]
    out = tmp_path / "kept.jsonl"
    write_jsonl([rows[i] for i in result.kept], out)
    back = load_rows(str(out))
    assert detect_format(back[0], "kept") == "messages" and back == rows[:20]
    assert encode_dataset(back, tok, source="kept")[1].kept == 20


def _independent_ifd(model, tok, prompt_ids, answer_ids, empty_ids):
    def loss(context):
        ids = torch.tensor([context + answer_ids])
        labels = torch.tensor([[IGNORE_INDEX] * len(context) + answer_ids])
        return model(input_ids=ids, labels=labels).loss.item()  # transformers' own shifted mean

    return loss(prompt_ids) / loss(empty_ids)


def test_ifd_is_the_ratio_of_the_answer_losses_and_is_deterministic(tok):
    from polmctl.data import format_completion, format_prompt

    model = build_tiny_model(tok).eval()
    pairs = [(r["prompt"], r["completion"]) for r in prompt_completion_rows()[:5]]
    scores = ifd_scores(model, tok, pairs, batch_size=2)
    again = ifd_scores(model, tok, pairs, batch_size=5)
    assert [s.ifd for s in scores] == pytest.approx([s.ifd for s in again], rel=1e-5)
    empty = tok(format_prompt("", tok), add_special_tokens=False)["input_ids"]
    for (prompt, answer), score in zip(pairs, scores):
        p = tok(format_prompt(prompt, tok), add_special_tokens=False)["input_ids"]
        a = tok(format_completion(prompt, answer, tok), add_special_tokens=False)["input_ids"]
        assert score.ifd == pytest.approx(_independent_ifd(model, tok, p, a, empty), rel=1e-4)
        assert score.answer_tokens == len(a)


def test_ifd_ranks_a_helpful_instruction_below_an_unhelpful_one(tmp_path_factory):
    """On the toy model that knows capitals, the right question makes its answer easy (low IFD)."""
    path = build_facts_model(tmp_path_factory.getbasetemp() / "facts-model")
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    rows = [
        {"prompt": "The capital of Russia is", "completion": "Moscow ."},
        {"prompt": "The capital of Egypt is", "completion": "Moscow ."},
        {"prompt": "The capital of Egypt is", "completion": "Cairo ."},
        {"prompt": "The capital of Russia is", "completion": "Cairo ."},
    ]
    scorer = lambda pairs: ifd_scores(model, tok, pairs)  # noqa: E731
    result = screen(rows, "prompt_completion", Filters(ifd_top=0.5), source="rows", ifd=scorer)
    ifd = result.scores["ifd"]
    assert ifd[0] < 1 and ifd[2] < 1 and ifd[0] < ifd[1] and ifd[2] < ifd[3]
    assert result.kept == sorted(sorted(range(4), key=lambda i: -ifd[i])[:2])
    assert all(d.reason == "ifd" for d in result.dropped)
    kept_low = screen(rows, "prompt_completion", Filters(ifd_max=min(ifd[1], ifd[3]) - 1e-6), source="rows", ifd=scorer)
    assert kept_low.kept == [0, 2]


def test_reward_bound_drops_the_rows_scored_below_it(tmp_path):
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_model, load_tokenizer, save_model

    cfg = ModelConfig(name_or_path="builtin:tiny")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    path = save_model(load_model(cfg, head="reward", pad_token_id=tokenizer.pad_token_id), tokenizer, tmp_path / "rm")
    rows = prompt_completion_rows()[:8]
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    scores = reward_scores(str(path), pairs, batch_size=3)
    bound = sorted(scores)[4]
    result = screen(
        rows,
        "prompt_completion",
        Filters(min_reward=bound),
        source="rows",
        reward=lambda p: reward_scores(str(path), p),
    )
    assert result.kept == [i for i, s in enumerate(scores) if s >= bound] and len(result.kept) == 4
    assert result.scores["reward"] == pytest.approx(scores, abs=1e-5)


def test_bad_filters_and_rows_fail_with_a_clear_line(tok):
    with pytest.raises(CommandError, match="--near-dedup=1.5"):
        screen([{"text": "a"}], "text", Filters(near_dedup=1.5), source="rows")
    with pytest.raises(CommandError, match="--min-tokens=9 is above --max-tokens=3"):
        screen([{"text": "a"}], "text", Filters(min_tokens=9, max_tokens=3), source="rows", tokenizer=tok)
    with pytest.raises(DataError, match="rows: row 0: a text row has no instruction"):
        screen([{"text": "a"}], "text", Filters(ifd_max=1), source="rows", ifd=lambda p: [])
    rows = [{"prompt": "q", "completion": "a"}, {"prompt": "q2", "completion": ""}]
    with pytest.raises(DataError, match="rows: row 1, column 'completion' is missing or empty"):
        screen(rows, "prompt_completion", Filters(ifd_max=1), source="rows", ifd=lambda p: [])
    with pytest.raises(CommandError, match=r"\.jsonl"):
        write_jsonl([], __import__("pathlib").Path("kept.csv"))
