"""Critique-and-revise data (Constitutional AI, Bai et al., 2022): a model drafts an answer to each
prompt, critiques its draft against a written principle, and revises it. The revisions become SFT
rows and the (revision over draft) pairs preference rows, which the existing recipes train on.

    polmctl data critique builtin:instructions --out cai.jsonl            # the default principles
    polmctl data critique prompts.jsonl --principles mine.yaml --rounds 2 --model <run dir> --out cai.jsonl
    polmctl run recipe=sft data.source=cai.jsonl            # {prompt, completion = revision}
    polmctl run recipe=dpo data.source=cai.pairs.jsonl      # {prompt, chosen = revision, rejected = draft}

Each round is one conversation, in the model's chat template: the prompt, the current answer, a
critique request, the critique, a revision request, then the revision (the next round's answer).
A principle is drawn for each row and round from the principles file, seeded, so a run is
repeatable. Principles (polmctl/conf/principles/default.yaml is the default): a YAML list of
{name, critique, revision} requests or of plain statements, or a text file with one statement per
line (``#`` comments skipped); a statement gets the requests of ``CRITIQUE_REQUEST`` /
``REVISION_REQUEST``. Decoding is greedy unless --temperature > 0. Rows whose revision is empty
are dropped; a pair is written only where the revision differs from the draft.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from polmctl.errors import CommandError

DEFAULT_PRINCIPLES = Path(__file__).resolve().parents[1] / "conf" / "principles" / "default.yaml"
CRITIQUE_REQUEST = "Critique your last answer against this principle: {principle} Point out every way it falls short."
REVISION_REQUEST = (
    "Rewrite your last answer so that it follows this principle: {principle} Reply with the new answer only."
)


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # asked after the answer
    revision: str  # asked after the critique


def load_principles(path: Path | None = None) -> list[Principle]:
    """The principles of ``path`` (None: the shipped default), or a CommandError naming the file and item."""
    path = Path(path) if path is not None else DEFAULT_PRINCIPLES
    if not path.is_file():
        raise CommandError(f"--principles {path}: no such file; give a YAML list or a text file, one principle a line")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise CommandError(f"--principles {path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(items, list):
            raise CommandError(f"--principles {path}: expected a YAML list of principles, got {type(items).__name__}")
    else:
        items = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    principles = [_principle(item, f"--principles {path}: item {i}") for i, item in enumerate(items)]
    if not principles:
        raise CommandError(f"--principles {path}: no principles in the file")
    return principles


def _principle(item: Any, where: str) -> Principle:
    if isinstance(item, str) and item.strip():
        statement = item.strip()
        return Principle(
            statement[:40], CRITIQUE_REQUEST.format(principle=statement), REVISION_REQUEST.format(principle=statement)
        )
    if isinstance(item, dict):
        missing = [k for k in ("critique", "revision") if not isinstance(item.get(k), str) or not item[k].strip()]
        unknown = sorted(set(item) - {"name", "critique", "revision"})
        if missing or unknown:
            problem = f"lacks {missing}" if missing else f"has unknown keys {unknown}"
            raise CommandError(f"{where} {problem}; write {{name, critique, revision}} or a plain statement")
        return Principle(
            str(item.get("name") or item["critique"][:40]), item["critique"].strip(), item["revision"].strip()
        )
    raise CommandError(f"{where}: got {item!r:.60}; write {{name, critique, revision}} or a plain statement")


@dataclass
class CritiqueStats:
    rows: int = 0
    sft_rows: int = 0
    pairs: int = 0
    empty_revisions: int = 0
    unchanged: int = 0
    principles_used: dict = field(default_factory=dict)


def _as_messages(prompt: Any) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def critique_and_revise(
    model,
    tokenizer,
    rows: list[dict],
    principles: list[Principle],
    *,
    rounds: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[list[dict], list[dict], CritiqueStats]:
    """SFT rows {prompt, completion, principle, critique} and preference rows {prompt, chosen,
    rejected, principle} for the prompt of each row; ``advance(n)`` after every n rows done."""
    from polmctl.data import format_prompt
    from polmctl.data.prompts import prompt_of
    from polmctl.rollout.generate import generate

    def reply(conversations: list[list[dict]]) -> list[str]:
        texts = [format_prompt(c, tokenizer) for c in conversations]
        sampled = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        out = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, **sampled)
        return [t.strip() for t in out]

    stats, sft_rows, pair_rows = CritiqueStats(rows=len(rows)), [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [prompt_of(r) for r in chunk]
        drafts = reply([_as_messages(p) for p in prompts])
        answers, critiques, used = list(drafts), [""] * len(chunk), [[] for _ in chunk]
        for r in range(rounds):
            picked = [random.Random(f"{seed}:{start + i}:{r}").choice(principles) for i in range(len(chunk))]
            asked = [
                _as_messages(p) + [{"role": "assistant", "content": a}, {"role": "user", "content": q.critique}]
                for p, a, q in zip(prompts, answers, picked)
            ]
            critiques = reply(asked)
            answers = reply(
                [
                    c + [{"role": "assistant", "content": crit}, {"role": "user", "content": q.revision}]
                    for c, crit, q in zip(asked, critiques, picked)
                ]
            )
            for names, q in zip(used, picked):
                names.append(q.name)
                stats.principles_used[q.name] = stats.principles_used.get(q.name, 0) + 1
        for prompt, draft, revision, critique, names in zip(prompts, drafts, answers, critiques, used):
            if not revision:
                stats.empty_revisions += 1
                continue
            principle = ", ".join(names)
            sft_rows.append({"prompt": prompt, "completion": revision, "principle": principle, "critique": critique})
            if draft and draft != revision:
                pair_rows.append({"prompt": prompt, "chosen": revision, "rejected": draft, "principle": principle})
            else:
                stats.unchanged += 1
        advance(len(chunk))
    stats.sft_rows, stats.pairs = len(sft_rows), len(pair_rows)
    return sft_rows, pair_rows, stats


def pairs_path(out: Path) -> Path:
    """Where the preference rows go by default: cai.jsonl -> cai.pairs.jsonl."""
    return out.with_name(f"{out.stem}.pairs{out.suffix}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written to a temporary file and renamed, so an interrupted run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def check_outputs(out: Path, pairs: Path) -> None:
    for flag, path in (("--out", out), ("--pairs", pairs)):
        if path.suffix.lower() != ".jsonl":
            raise CommandError(f"{flag} {path}: write JSON lines, a path ending in .jsonl")
    if out.resolve() == pairs.resolve():
        raise CommandError(f"--out and --pairs are both {out}; the SFT and preference rows need two files")
