"""``builtin:domain_text``: raw text of one coherent synthetic domain (a field guide to
made-up plants), for continued pretraining and held-out perplexity.

    polmctl run recipe=continued_pretraining

Rows: {"text": "..."}, short documents of 3-6 sentences. The held-out split describes
plants that never appear in training, so perplexity measures learning of the domain's
language, not memorised documents.
"""

from __future__ import annotations

import random

from polmctl.data.builtin.split import sample_split

PREFIX = ["amber", "frost", "moss", "sun", "ember", "dusk", "river", "salt", "thorn", "mist", "copper", "silk"]
SUFFIX = ["bell", "wort", "leaf", "root", "bloom", "fern", "cap", "vine", "reed", "thistle"]
REGIONS = ["the northern marshes", "the high valleys", "the coastal dunes", "the old forest", "the red canyons"]
COLOURS = ["pale violet", "deep orange", "silver-green", "bright yellow", "dark blue", "rusty red"]
SEASONS = ["early spring", "midsummer", "late autumn", "the first frost"]
USES = [
    "brewed into a bitter tea",
    "dried and burned to keep insects away",
    "used to dye wool",
    "ground into a flour",
    "pressed for a fragrant oil",
]
SENTENCES = [
    "The {name} grows in {region}, where the soil stays damp for most of the year.",
    "Its leaves are {colour} and turn darker after rain.",
    "The {name} flowers in {season}, and each stem carries {k} small blossoms.",
    "Local growers say the {name} is {use}.",
    "A mature {name} reaches about {h} centimetres in height.",
    "Birds eat the seeds of the {name} and carry them to {region2}.",
    "The roots of the {name} spread {r} metres from the stem.",
]


def _draw(rng: random.Random) -> tuple[tuple[str, str], dict]:
    name = f"{rng.choice(PREFIX)}{rng.choice(SUFFIX)}"
    fields = dict(
        name=name,
        region=rng.choice(REGIONS),
        region2=rng.choice(REGIONS),
        colour=rng.choice(COLOURS),
        season=rng.choice(SEASONS),
        use=rng.choice(USES),
        k=rng.randint(2, 9),
        h=rng.randint(10, 90),
        r=rng.randint(2, 5),
    )
    chosen = [SENTENCES[0]] + rng.sample(SENTENCES[1:], rng.randint(2, 5))
    text = " ".join(s.format(**fields) for s in chosen)
    text = text[0].upper() + text[1:]
    return (name, text), {"text": text}


DEFAULT_N = {"train": 500, "test": 100}


def domain_text(split: str = "train", *, n: int | None = None, seed: int = 0) -> list[dict]:
    """``n`` documents of ``split`` (train: 500, test: 100 by default); the split is decided
    by the plant's name."""
    count = n if n is not None else DEFAULT_N.get(split, DEFAULT_N["test"])
    return sample_split(split, count, seed, _draw, name="domain_text", identity=lambda key: key[0])
