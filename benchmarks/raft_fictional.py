"""RAFT on facts no model can know: does LoRA SFT on `polmctl data raft` rows teach SmolLM2 to answer
from the right document among distractors? docs/data.md's "Retrieval-augmented rows" measurement.

    python benchmarks/raft_fictional.py --out outputs/raft        # writes the data, prints the commands

Fictional towns (seeded names, founding years, populations, river lengths) are the documents; each
question asks one number of one town, so only the oracle document holds the answer. 500 towns' questions
train (RAFT rows: 3 distractors, the oracle in 80% of them); 100 other towns' questions are held out, each
with its oracle among 3 distractors, scored by exact match of the number (``eval.tasks=[arithmetic]``
reads any rows with an ``answer`` column). The printed commands build the rows and train; the run's
summary.json holds the held-out accuracy before (the base model reading the same documents) and after.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
from pathlib import Path

SYLLABLES = ["bra", "cor", "dal", "fen", "gri", "hal", "jor", "kel", "lum", "mor", "nar", "osk", "pel", "quin",
             "rav", "sel", "tor", "ulm", "vek", "wyn", "zar", "ast", "eld", "iv"]  # fmt: skip
QUESTIONS = {
    "founded": "In which year was {town} founded?",
    "residents": "How many residents does {town} have?",
    "river_km": "How long, in km, is the {river}, the main river of {town}?",
}


def name(rng: random.Random, taken: set[str]) -> str:
    while True:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if word not in taken:
            taken.add(word)
            return word


def towns(n: int, seed: int) -> list[dict]:
    rng, taken = random.Random(seed), set()
    out = []
    for i in range(n):
        town, river, province = name(rng, taken), name(rng, taken), name(rng, taken)
        facts = {
            "founded": rng.randint(1100, 1990),
            "residents": rng.randint(1_000, 99_999),
            "river_km": rng.randint(12, 950),
        }
        text = (
            f"{town} is a town in the province of {province}. It was founded in {facts['founded']} and has "
            f"{facts['residents']} residents. Its main river, the {river}, is {facts['river_km']} km long."
        )
        asked = rng.choice(sorted(QUESTIONS))
        question = QUESTIONS[asked].format(town=town, river=river)
        out.append({"id": f"t{i}", "text": text, "question": question, "answer": str(facts[asked])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/raft"))
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="more overrides for the training run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = towns(args.train + args.test, args.seed)
    write = lambda path, items: path.write_text("".join(json.dumps(r) + "\n" for r in items))  # noqa: E731
    write(args.out / "docs.jsonl", [{"id": r["id"], "text": r["text"]} for r in rows])
    qa = [{"question": r["question"], "answer": r["answer"], "doc_id": r["id"]} for r in rows]
    write(args.out / "qa_train.jsonl", qa[: args.train])
    write(args.out / "qa_test.jsonl", qa[args.train :])
    o = args.out
    commands = [
        f"polmctl data raft {o}/qa_train.jsonl {o}/docs.jsonl --out {o}/raft_train.jsonl --distractors 3 "
        "--p-oracle 0.8",
        f"polmctl data raft {o}/qa_test.jsonl {o}/docs.jsonl --out {o}/raft_test.jsonl --distractors 3 --p-oracle 1",
        # The eval reads an `answer` column: the held-out rows' completion is their answer.
        f"python -c \"import json,sys; [print(json.dumps(dict(r, answer=r['completion']))) for r in map(json.loads, "
        f"open('{o}/raft_test.jsonl'))]\" > {o}/raft_test_eval.jsonl",
        "polmctl run recipe=lora data.source=" + f"{o}/raft_train.jsonl data.max_length=1024 'eval.tasks=[arithmetic]' "
        f"eval.source={o}/raft_test_eval.jsonl hydra.run.dir={o}/run " + " ".join(map(shlex.quote, args.overrides)),
    ]
    print("\n".join(commands))


if __name__ == "__main__":
    main()
