"""``builtin:facts``: short questions of general knowledge, grouped by topic, each row marked as part
of the forget-set or the retain-set of an unlearning run (``recipe=unlearn``).

    polmctl run recipe=unlearn                                            # forget capitals, keep the rest
    polmctl run recipe=unlearn "data.options.forget_topics=[capitals,chemistry]"
    polmctl run recipe=unlearn model=tiny data.options.known_by=null      # a random model knows no fact

Row: {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris.",
      "answer": "Paris", "topic": "capitals", "role": "forget"}
``role`` is ``forget`` for the topics in ``forget_topics`` and ``retain`` for every other topic;
``answer`` lists the accepted answers separated by ``|`` ("woof|bark").

Options: ``forget_topics`` (default ``[capitals]``), ``n`` (each fact of the split once by default;
more rows ask facts again in other words), ``seed`` (the wording and order), and ``known_by``: a
model (``builtin:<name>``, hub id or dir) whose greedy answers decide which facts are kept, so that
an unlearning run starts from facts the model really knows. The check runs once per model and
split and is cached under ``$POLMCTL_CACHE/known_facts/``. A fact goes to ``train`` or ``test`` by
a hash of its topic and subject, never of its wording.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import unicodedata
from pathlib import Path
from typing import Callable, Sequence

from polmctl.data.builtin.split import SPLITS, check_int, split_of
from polmctl.errors import DataError

COUNTRY_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "the United Kingdom": "London", "Egypt": "Cairo",
    "Greece": "Athens", "Canada": "Ottawa", "Australia": "Canberra", "India": "New Delhi",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Hungary": "Budapest", "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Turkey": "Ankara",
    "Kenya": "Nairobi", "Argentina": "Buenos Aires", "Peru": "Lima", "Thailand": "Bangkok",
    "South Korea": "Seoul", "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Chile": "Santiago",
    "the Czech Republic": "Prague", "Vietnam": "Hanoi", "the Philippines": "Manila",
    "Indonesia": "Jakarta", "Mexico": "Mexico City", "Brazil": "Brasilia",
}  # fmt: skip
COUNTRY_LANGUAGES = {
    "France": "French", "Spain": "Spanish", "Germany": "German", "Italy": "Italian", "Japan": "Japanese",
    "Russia": "Russian", "Portugal": "Portuguese", "Brazil": "Portuguese", "Mexico": "Spanish",
    "Greece": "Greek", "the Netherlands": "Dutch", "Sweden": "Swedish", "Poland": "Polish",
    "Turkey": "Turkish", "Egypt": "Arabic", "South Korea": "Korean", "Thailand": "Thai",
    "Finland": "Finnish", "Norway": "Norwegian", "Denmark": "Danish", "Hungary": "Hungarian",
    "Argentina": "Spanish", "Vietnam": "Vietnamese", "Israel": "Hebrew", "Iran": "Persian|Farsi",
    "China": "Chinese|Mandarin",
}  # fmt: skip
COLOURS = {
    "a banana": "yellow", "grass": "green", "the sky on a clear day": "blue", "snow": "white",
    "coal": "black", "a ripe tomato": "red", "a lemon": "yellow", "milk": "white", "a carrot": "orange",
    "chocolate": "brown", "an emerald": "green", "a ruby": "red", "a sapphire": "blue",
    "a polar bear": "white", "a crow": "black", "a pumpkin": "orange", "a lime": "green",
    "a strawberry": "red", "coffee": "brown", "a flamingo": "pink", "an eggplant": "purple",
    "a fire truck": "red",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small|little", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
    "black": "white", "wet": "dry", "hard": "soft|easy", "early": "late", "full": "empty", "high": "low",
    "rich": "poor", "strong": "weak", "loud": "quiet|soft", "left": "right", "push": "pull", "win": "lose",
    "true": "false", "love": "hate", "buy": "sell", "thick": "thin", "heavy": "light", "near": "far",
    "above": "below", "inside": "outside", "alive": "dead", "good": "bad|evil", "clean": "dirty",
    "north": "south", "east": "west", "first": "last", "open": "closed|shut", "young": "old",
    "asleep": "awake", "give": "take", "come": "go", "remember": "forget", "always": "never",
    "enter": "exit|leave", "question": "answer", "before": "after",
}  # fmt: skip
ANIMAL_SOUNDS = {
    "cow": "moo", "dog": "woof|bark", "cat": "meow|miaow", "duck": "quack", "sheep": "baa|bleat",
    "pig": "oink", "lion": "roar", "horse": "neigh|whinny", "owl": "hoot", "snake": "hiss", "bee": "buzz",
    "frog": "ribbit|croak", "mouse": "squeak", "wolf": "howl", "donkey": "hee-haw|bray", "crow": "caw",
}  # fmt: skip
CHEMICAL_SYMBOLS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "oxygen": "O", "hydrogen": "H", "carbon": "C",
    "sodium": "Na", "helium": "He", "nitrogen": "N", "copper": "Cu", "lead": "Pb", "potassium": "K",
    "calcium": "Ca", "sulfur": "S", "zinc": "Zn", "chlorine": "Cl", "neon": "Ne", "mercury": "Hg",
    "tin": "Sn", "uranium": "U",
}  # fmt: skip
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
CALENDAR = {
    **{f"day:{d}": DAYS[(i + 1) % 7] for i, d in enumerate(DAYS)},
    **{f"month:{m}": MONTHS[(i + 1) % 12] for i, m in enumerate(MONTHS)},
}

# topic -> (subject -> answer, question wordings, the answer sentence); {s} subject, {a} first answer
TOPICS: dict[str, tuple[dict[str, str], tuple[str, ...], str]] = {
    "capitals": (
        COUNTRY_CAPITALS,
        ("What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital city of {s}."),
        "The capital of {s} is {a}.",
    ),
    "languages": (
        COUNTRY_LANGUAGES,
        ("What language is spoken in {s}?", "Which language do most people in {s} speak?"),
        "The main language of {s} is {a}.",
    ),
    "colours": (COLOURS, ("What colour is {s}?", "What is the colour of {s}?"), "{S} is {a}."),
    "opposites": (
        OPPOSITES,
        ("What is the opposite of '{s}'?", "Which word means the opposite of '{s}'?"),
        "The opposite of '{s}' is '{a}'.",
    ),
    "animal_sounds": (
        ANIMAL_SOUNDS,
        ("What sound does a {s} make?", "What noise does a {s} make?"),
        'A {s} goes "{a}".',
    ),
    "chemistry": (
        CHEMICAL_SYMBOLS,
        ("What is the chemical symbol for {s}?", "Which chemical symbol stands for {s}?"),
        "The chemical symbol for {s} is {a}.",
    ),
    "calendar": (
        CALENDAR,
        ("What {kind} comes after {s}?", "Which {kind} follows {s}?"),
        "The {kind} after {s} is {a}.",
    ),
}
ROLES = ("forget", "retain")
MAX_NEW_TOKENS = 32  # the answer sentence is well inside this; a model that rambles is cut

__all__ = ["facts", "fact_correct", "keep_known", "TOPICS", "ROLES"]


def _normalise(text: str) -> str:
    """Accents stripped ("Brasília" -> "Brasilia"), so a model's spelling of a name counts."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def fact_correct(completion: str, answer: str) -> bool:
    """Whether ``completion`` states one of the ``|``-separated answers as a whole word or phrase.

    Case is ignored except for answers of one or two characters (chemical symbols: "O" is oxygen's
    symbol, "o" in a sentence is nothing)."""
    text = _normalise(completion)
    for option in (a.strip() for a in answer.split("|")):
        option = _normalise(option)
        if not option:
            continue
        flags = 0 if len(option) <= 2 else re.IGNORECASE
        if re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text, flags):
            return True
    return False


def keep_known(rows: list[dict], answer: Callable[[list[str]], list[str]]) -> list[dict]:
    """The rows whose prompt ``answer`` (prompts -> completions) gets right (``fact_correct``)."""
    completions = answer([r["prompt"] for r in rows])
    return [r for r, c in zip(rows, completions) if fact_correct(c, str(r["answer"]))]


def _subject_and_kind(topic: str, subject: str) -> tuple[str, str]:
    """Calendar subjects are "day:Monday" or "month:March"; every other subject is itself."""
    if topic == "calendar":
        kind, name = subject.split(":", 1)
        return name, kind
    return subject, ""


def _rows(topic: str, subject: str, answer: str, rng: random.Random, role: str) -> list[dict]:
    """The fact asked in each of its topic's wordings, in a seeded order."""
    _, wordings, sentence = TOPICS[topic]
    s, kind = _subject_and_kind(topic, subject)
    completion = sentence.format(s=s, S=s[:1].upper() + s[1:], a=answer.split("|")[0], kind=kind)
    rows = [
        {"prompt": w.format(s=s, kind=kind), "completion": completion, "answer": answer, "topic": topic, "role": role}
        for w in wordings
    ]
    rng.shuffle(rows)
    return rows


def _topics(forget_topics: Sequence[str] | str) -> list[str]:
    names = forget_topics.split(",") if isinstance(forget_topics, str) else list(forget_topics)
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in TOPICS]
    if unknown or not names:
        raise DataError(
            f"builtin:facts option forget_topics={list(names)!r}: name one or more of {', '.join(TOPICS)} "
            "(data.options.forget_topics)"
        )
    if set(names) == set(TOPICS):
        raise DataError(
            "builtin:facts option forget_topics names every topic, which leaves no retain-set; "
            "keep at least one topic out of data.options.forget_topics"
        )
    return names


def facts(
    split: str = "train",
    *,
    n: int | None = None,
    forget_topics: Sequence[str] | str = ("capitals",),
    seed: int = 0,
    known_by: str | None = None,
) -> list[dict]:
    """The facts of ``split``, marked forget / retain: by default each once, in a seeded order and
    wording; with ``known_by`` only those that model answers correctly (asked in that wording).
    ``n`` takes the first n rows; past the number of facts they continue with the facts asked in
    their other wordings (paraphrases), seeded too."""
    if split not in SPLITS:
        raise DataError(f"builtin:facts has splits {', '.join(SPLITS)}, not {split!r} (data.split / data.eval_split)")
    check_int("facts", "seed", seed, 0)
    forget = _topics(forget_topics)
    rng = random.Random(f"facts:{split}:{seed}")
    chosen = [
        (topic, subject, answer)
        for topic, (table, _, _) in TOPICS.items()
        for subject, answer in table.items()
        if split_of(("facts", topic, subject)) == split
    ]
    rng.shuffle(chosen)
    by_fact = [_rows(*fact, rng, "forget" if fact[0] in forget else "retain") for fact in chosen]
    firsts = [wordings[0] for wordings in by_fact]
    if known_by:
        known = {r["prompt"] for r in _known_by(firsts, known_by, split)}
        by_fact = [wordings for wordings in by_fact if wordings[0]["prompt"] in known]
        firsts = [wordings[0] for wordings in by_fact]
    paraphrases = [row for wordings in by_fact for row in wordings[1:]]
    rng.shuffle(paraphrases)
    rows = firsts
    if n is not None:
        check_int("facts", "n", n, 1)
        if n > len(firsts) + len(paraphrases):
            raise DataError(
                f"builtin:facts: only {len(firsts) + len(paraphrases)} {split} rows"
                + (f" of facts known by {known_by}" if known_by else "")
                + f" in all their wordings (asked for n={n}); lower data.options.n"
            )
        rows = (firsts + paraphrases)[:n]
    return rows


def _known_by(rows: list[dict], model: str, split: str) -> list[dict]:
    """``keep_known`` with ``model``'s greedy answers, cached by model and questions."""
    from polmctl.models import cache_root

    path = cache_root() / "known_facts" / f"{_cache_key(model, rows)}.json"
    if path.exists():
        known = set(json.loads(path.read_text()))
        kept = [r for r in rows if r["prompt"] in known]
    else:
        kept = keep_known(rows, _greedy_answers(model))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps([r["prompt"] for r in kept]))
        tmp.replace(path)
    roles = {role: sum(r["role"] == role for r in kept) for role in ROLES}
    if not all(roles.values()):
        raise DataError(
            f"builtin:facts: {model} answers {roles['forget']} forget and {roles['retain']} retain facts of the "
            f"{split} split correctly (of {len(rows)}); both sets need some. Choose other "
            "data.options.forget_topics, or set data.options.known_by=null to keep every fact "
            "(a random model such as model=tiny knows none)"
        )
    return kept


def _cache_key(model: str, rows: list[dict]) -> str:
    digest = hashlib.sha256(model.encode())
    local = Path(model).expanduser()
    if local.exists():  # a model dir written again (same path, new weights) is checked again
        digest.update(str(max(p.stat().st_mtime_ns for p in [local, *local.iterdir()])).encode())
    digest.update(repr([(r["prompt"], r["answer"]) for r in rows]).encode())
    return digest.hexdigest()[:24]


def _greedy_answers(name_or_path: str) -> Callable[[list[str]], list[str]]:
    """Prompts -> ``name_or_path``'s greedy completions (chat template, as training renders prompts)."""
    import torch

    from polmctl.config.schema import ModelConfig
    from polmctl.data.formats import format_prompt
    from polmctl.models import load_model, load_tokenizer

    def answer(prompts: list[str], batch_size: int = 16) -> list[str]:
        cfg = ModelConfig(name_or_path=name_or_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer, model = load_tokenizer(cfg), load_model(cfg, device=device, for_training=False)
        tokenizer.padding_side = "left"
        out = []
        for i in range(0, len(prompts), batch_size):
            texts = [format_prompt(p, tokenizer) for p in prompts[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = model.generate(
                    **enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    return answer
