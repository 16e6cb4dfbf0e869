"""``builtin:counterfacts``: counterfactual edit requests about real facts (capitals, cities, languages,
currencies, makers, authors), CounterFact-style, and the check that keeps the ones a model answers.

    polmctl run recipe=edit                                 # method.requests=builtin:counterfacts
    polmctl run recipe=edit method.known_only=false model=tiny   # a random model knows no fact

Each request asks the relation's prompt about one subject and names a new answer taken from the
same relation (another capital for a capital), two paraphrases of the prompt, and two neighbours:
other subjects of the relation, those sharing the true answer first, each with its own answer.
A request is only meaningful if the model gave the true answer before the edit: ``known`` keeps
those whose true answer the model produces greedily (on a random model none is, so tests turn
the check off).
"""

from __future__ import annotations

import random

from polmctl.editing.requests import EditRequest, Neighbour, fill

# relation -> (prompt, paraphrases, [(subject, answer), ...])
RELATIONS: dict[str, tuple[str, tuple[str, str], list[tuple[str, str]]]] = {
    "capital": (
        "The capital of {} is",
        ("The capital city of {} is", "{}'s capital city is"),
        [
            ("France", "Paris"),
            ("Germany", "Berlin"),
            ("Italy", "Rome"),
            ("Spain", "Madrid"),
            ("Japan", "Tokyo"),
            ("Russia", "Moscow"),
            ("Egypt", "Cairo"),
            ("Canada", "Ottawa"),
            ("Australia", "Canberra"),
            ("China", "Beijing"),
            ("Greece", "Athens"),
            ("Portugal", "Lisbon"),
            ("Norway", "Oslo"),
            ("Sweden", "Stockholm"),
            ("Poland", "Warsaw"),
            ("Austria", "Vienna"),
            ("Ireland", "Dublin"),
            ("Turkey", "Ankara"),
            ("Kenya", "Nairobi"),
            ("Thailand", "Bangkok"),
            ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"),
            ("Hungary", "Budapest"),
            ("Peru", "Lima"),
            ("Cuba", "Havana"),
        ],
    ),
    "city_country": (
        "{} is a city in",
        ("The city of {} is located in", "{} is located in the country of"),
        [
            ("Lyon", "France"),
            ("Marseille", "France"),
            ("Toulouse", "France"),
            ("Munich", "Germany"),
            ("Hamburg", "Germany"),
            ("Cologne", "Germany"),
            ("Milan", "Italy"),
            ("Naples", "Italy"),
            ("Florence", "Italy"),
            ("Barcelona", "Spain"),
            ("Seville", "Spain"),
            ("Valencia", "Spain"),
            ("Osaka", "Japan"),
            ("Kyoto", "Japan"),
            ("Toronto", "Canada"),
            ("Vancouver", "Canada"),
            ("Sydney", "Australia"),
            ("Melbourne", "Australia"),
            ("Mumbai", "India"),
            ("Shanghai", "China"),
        ],
    ),
    "language": (
        "The official language of {} is",
        ("In {}, the official language is", "People in {} mostly speak"),
        [
            ("France", "French"),
            ("Germany", "German"),
            ("Austria", "German"),
            ("Italy", "Italian"),
            ("Spain", "Spanish"),
            ("Mexico", "Spanish"),
            ("Argentina", "Spanish"),
            ("Japan", "Japanese"),
            ("Russia", "Russian"),
            ("Portugal", "Portuguese"),
            ("Brazil", "Portuguese"),
            ("Greece", "Greek"),
            ("Sweden", "Swedish"),
            ("Poland", "Polish"),
            ("Turkey", "Turkish"),
            ("Finland", "Finnish"),
        ],
    ),
    "currency": (
        "The currency of {} is the",
        ("The official currency of {} is the", "In {}, people pay with the"),
        [
            ("Japan", "yen"),
            ("India", "rupee"),
            ("China", "yuan"),
            ("Russia", "ruble"),
            ("Mexico", "peso"),
            ("Argentina", "peso"),
            ("Switzerland", "franc"),
            ("the United States", "dollar"),
            ("Canada", "dollar"),
            ("Australia", "dollar"),
            ("South Korea", "won"),
            ("Sweden", "krona"),
            ("South Africa", "rand"),
            ("Turkey", "lira"),
        ],
    ),
    "maker": (
        "The {} is made by",
        ("The {} is a product of", "The company behind the {} is"),
        [
            ("iPhone", "Apple"),
            ("iPad", "Apple"),
            ("MacBook", "Apple"),
            ("PlayStation", "Sony"),
            ("Walkman", "Sony"),
            ("Xbox", "Microsoft"),
            ("Surface tablet", "Microsoft"),
            ("Corolla", "Toyota"),
            ("Prius", "Toyota"),
            ("Mustang", "Ford"),
            ("Galaxy phone", "Samsung"),
            ("Pixel phone", "Google"),
        ],
    ),
    "author": (
        "{} was written by",
        ("The author of {} is", "{} is a book by"),
        [
            ("Hamlet", "William Shakespeare"),
            ("Romeo and Juliet", "William Shakespeare"),
            ("Pride and Prejudice", "Jane Austen"),
            ("War and Peace", "Leo Tolstoy"),
            ("Anna Karenina", "Leo Tolstoy"),
            ("Don Quixote", "Miguel de Cervantes"),
            ("The Odyssey", "Homer"),
            ("Oliver Twist", "Charles Dickens"),
            ("Great Expectations", "Charles Dickens"),
            ("Moby-Dick", "Herman Melville"),
            ("Frankenstein", "Mary Shelley"),
            ("Les Misérables", "Victor Hugo"),
        ],
    ),
}


def fact_requests(seed: int = 0) -> list[EditRequest]:
    """One counterfactual request per (relation, subject), in an order shuffled by ``seed``; the new
    answer, the neighbours and the order are functions of ``seed`` alone."""
    rng = random.Random(f"facts:{seed}")
    requests = []
    for relation, (prompt, paraphrases, pairs) in RELATIONS.items():
        answers = sorted({a for _, a in pairs})
        for subject, answer in pairs:
            new = rng.choice([a for a in answers if a != answer])
            others = [(s, a) for s, a in pairs if s != subject]
            same = [p for p in others if p[1] == answer]
            rest = [p for p in others if p[1] != answer]
            rng.shuffle(same)
            rng.shuffle(rest)
            neighbours = [Neighbour(fill(prompt, s), a) for s, a in (same + rest)[:2]]
            requests.append(
                EditRequest(
                    subject=subject,
                    prompt=prompt,
                    target_new=new,
                    target_true=answer,
                    paraphrases=[fill(p, subject) for p in paraphrases],
                    neighbours=neighbours,
                    where=f"builtin:counterfacts ({relation}: {subject})",
                )
            )
    rng.shuffle(requests)
    return requests


def known(model, tokenizer, requests: list[EditRequest], *, batch_size: int = 16) -> list[bool]:
    """Whether the model, greedily, answers each request's prompt with its ``target_true``."""
    from polmctl.editing.evaluate import score_targets

    scores = score_targets(model, tokenizer, [(r.text, r.target_true) for r in requests], batch_size=batch_size)
    return [s.greedy for s in scores]
