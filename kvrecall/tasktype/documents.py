"""Filler documents for the task classifier's labelled prompts (prompts.py), generated locally.

A document carries no label: every kind below is used under both task types, so the head
learns from the instruction, not from what the context looks like. Each kind builds lines
(sentences, table rows, log lines, ...) until about `words` words, and states the prompt's
`Slots` (a name, an item, a key and its value, ...) in a few of them, so that a question about
them reads as it would over a real document.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

NAMES = (
    "Amara Okafor", "Bruno Silva", "Chen Wei", "Dagny Holm", "Elif Kaya", "Farid Haddad", "Greta Lindqvist",
    "Hiro Tanaka", "Ines Moreau", "Jonas Becker", "Kavya Rao", "Luis Ortega", "Maren Voss", "Nikolai Petrov",
    "Olu Adeyemi", "Priya Nair", "Quentin Roux", "Rosa Jimenez", "Sanjay Mehta", "Tove Berg", "Uma Patel",
    "Viktor Novak", "Wanjiru Kamau", "Xavier Dubois", "Yara Haddad", "Zofia Kowalska", "Alma Reyes",
    "Bram de Vries", "Carmen Ruiz", "Dmitri Orlov", "Esther Cohen", "Fionn Byrne",
)  # fmt: skip
CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Tallinn", "Porto", "Quebec", "Hanoi", "Dakar", "Perth",
    "Bergen", "Cusco", "Gdansk", "Izmir", "Kochi", "Leeds", "Malmo", "Nantes", "Split", "Tartu", "Utrecht",
)  # fmt: skip
ITEMS = (
    "invoice", "ledger", "telescope", "generator", "contract", "router", "violin", "blueprint", "lantern",
    "prototype", "shipment", "manuscript", "compressor", "badge", "backup drive", "microscope", "kettle",
    "map", "sample tray", "license", "budget sheet", "server rack", "camera", "bicycle", "key card",
)  # fmt: skip
KEYS = (
    "max_connections", "timeout_ms", "retry_limit", "cache_size", "batch_size", "port", "pool_size",
    "log_level", "learning_rate", "replicas", "heap_mb", "queue_depth", "worker_threads", "ttl_seconds",
)  # fmt: skip
ROLES = (
    "treasurer", "lead engineer", "project manager", "head chef", "archivist", "night guard", "coach",
    "editor", "pilot", "pharmacist", "site manager", "auditor", "curator", "dispatcher", "translator",
)  # fmt: skip
METRICS = ("revenue", "latency", "temperature", "attendance", "rainfall", "sales", "error rate", "throughput")
SERVICES = ("auth", "billing", "search", "gateway", "scheduler", "storage", "mailer", "payments", "ingest")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip
WORDS = (
    "amber", "basin", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island", "jasper", "kestrel",
    "lagoon", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "thistle", "umber",
    "velvet", "willow", "yarrow", "zephyr", "acorn", "bramble", "copper", "dune", "fern",
)  # fmt: skip

_ADJ = ("quiet", "busy", "narrow", "old", "bright", "cold", "crowded", "empty", "long", "steep", "wet", "green")
_NOUN = (
    "street", "harbour", "office", "garden", "station", "library", "market", "bridge", "warehouse", "school",
    "workshop", "square", "river", "hallway", "kitchen", "valley",
)  # fmt: skip
_VERB = (
    "stayed open late", "filled with people", "was repainted", "smelled of rain", "grew quiet", "was cleaned",
    "echoed with voices", "flooded briefly", "was decorated", "lost power for an hour", "was inspected",
)  # fmt: skip
_WHEN = ("in the morning", "after lunch", "during the storm", "last week", "every spring", "at dusk", "on weekends")
_OPINIONS = (
    "the battery lasts for days", "the screen is too dim", "delivery was quick", "the manual is confusing",
    "it feels well built", "the fan is noisy", "support answered within an hour", "the price is fair",
    "the colours look washed out", "setup took five minutes", "it stopped working after a month",
)  # fmt: skip
_MESSAGES = (
    "request completed", "cache miss", "connection reset by peer", "retrying upload", "slow query detected",
    "user session started", "disk usage above threshold", "certificate renewed", "job queued", "heartbeat ok",
)  # fmt: skip
_CUE_SENTENCES = (
    # Ordinary sentences with the words instructions use ("all", "most", "count", "find", "what",
    # "summary", ...): documents carry them under both labels, so a word alone decides nothing.
    "All of the lamps along the square were lit by seven.",
    "Most days the road to the valley was quiet and empty.",
    "Each visitor was asked to sign the book at the door.",
    "Every spring the committee counted the birds on the lake.",
    "The total cost of the repairs was never published.",
    "Nobody knew where the old map was kept.",
    "Who left the gate open remained a mystery for weeks.",
    "What the village needed most was a new roof for the school.",
    "The summary of the last meeting was pinned to the door.",
    "She kept a list of all the ships that entered the harbour.",
    "They found the key under the mat after an hour of searching.",
    "How many people came to the fair is not recorded anywhere.",
    "The overall mood at the market was cheerful.",
    "The numbers rose slowly over the year and then fell again.",
    "Which of the two bridges was older is still debated.",
    "When the bell rang, the children ran outside.",
    "The value of the old coins had doubled since the war.",
    "He tracked the storm on a paper chart by the window.",
    "A secret passage was said to run under the church.",
    "The code on the door had been changed twice that month.",
    "In the end, the whole street turned out to help.",
    "The average wait at the clinic was about twenty minutes.",
    "The report compared the two harvests in great detail.",
    "Her notes described every room of the house.",
    "The most frequent complaint was about the noise at night.",
    "The examples in the manual were hard to follow.",
    "Please remember to close the windows before you leave.",
    "The answer to the riddle was written on the back of the card.",
    "The first question at the meeting was about the budget.",
    "Each word on the sign was painted in a different colour.",
    "A summary table at the end listed the results of every team.",
    "Find the smallest stone and you will find the path, the old saying goes.",
)
_FOREIGN = (
    "Le marché du matin ouvrait tôt et les rues se remplissaient lentement.",
    "Il a plu sur les toits pendant presque tout l'après-midi.",
    "Die alte Brücke stand seit vielen Jahren an derselben Stelle.",
    "Am Abend wurden die Laternen am Platz eine nach der anderen angezündet.",
    "Los pescadores remendaban sus redes mientras hablaban del tiempo.",
    "La biblioteca permanecía abierta hasta tarde durante el invierno.",
    "O relógio da torre tocava a cada hora.",
    "I bambini camminavano lungo il fiume per andare a scuola.",
)  # fmt: skip


@dataclass(frozen=True)
class Slots:
    """What a prompt's instruction may name; the document states some of them."""

    name: str
    name2: str
    item: str
    key: str
    value: str
    city: str
    day: str
    date: str
    role: str
    metric: str
    word: str
    service: str
    func: str
    arg: str

    @staticmethod
    def draw(rng: random.Random) -> Slots:
        name, name2 = rng.sample(NAMES, 2)
        word = rng.choice(WORDS)
        return Slots(
            name=name, name2=name2, item=rng.choice(ITEMS), key=rng.choice(KEYS), value=str(rng.randint(2, 99999)),
            city=rng.choice(CITIES), day=rng.choice(DAYS), date=f"{rng.randint(1, 28)} {rng.choice(MONTHS)}",
            role=rng.choice(ROLES), metric=rng.choice(METRICS), word=word, service=rng.choice(SERVICES),
            func=f"{rng.choice(('load', 'parse', 'merge', 'score', 'build', 'check'))}_{word}", arg=rng.choice(WORDS),
        )  # fmt: skip


def _facts(s: Slots) -> list[str]:
    """Sentences stating the slots, in prose."""
    return [
        f"{s.name} is the {s.role} and moved the {s.item} to {s.city} on {s.day}.",
        f"The value of {s.key} was set to {s.value}.",
        f"On {s.date}, {s.name2} reported the {s.metric} for the {s.service} team.",
    ]


def _prose(rng: random.Random, s: Slots) -> str:
    roll = rng.random()
    if roll < 0.6:
        return f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} {rng.choice(_WHEN)}."
    return rng.choice(_CUE_SENTENCES) if roll < 0.9 else rng.choice(_facts(s))


def _notes(rng: random.Random, s: Slots) -> str:
    who = rng.choice((s.name, s.name2, rng.choice(NAMES)))
    return (
        f"- {who} will {rng.choice(('check', 'order', 'repair', 'send', 'review'))} the "
        f"{rng.choice((s.item, rng.choice(ITEMS)))} by {rng.choice(DAYS)}."
    )


def _table(rng: random.Random, s: Slots) -> str:
    who = rng.choice((s.name, rng.choice(NAMES), rng.choice(NAMES)))
    return f"{who}, {rng.choice(CITIES)}, {rng.choice(ITEMS)}, {rng.randint(1, 9999)}, {rng.randint(1, 28)} {rng.choice(MONTHS)}"


def _log(rng: random.Random, s: Slots) -> str:
    level = rng.choice(("INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG"))
    return (
        f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
        f"{rng.randint(0, 59):02d} {level} {rng.choice((s.service, rng.choice(SERVICES)))}: {rng.choice(_MESSAGES)}"
    )


def _email(rng: random.Random, s: Slots) -> str:
    who = rng.choice((s.name, s.name2, rng.choice(NAMES)))
    return f"From: {who}\nSubject: {rng.choice(ITEMS)} update\n{_prose(rng, s)} {_prose(rng, s)}\n"


def _config(rng: random.Random, s: Slots) -> str:
    key = s.key if rng.random() < 0.1 else rng.choice(KEYS)
    return f"{key} = {s.value if key == s.key else rng.randint(1, 9999)}"


def _code(rng: random.Random, s: Slots) -> str:
    name = s.func if rng.random() < 0.15 else f"{rng.choice(('get', 'set', 'sum', 'find'))}_{rng.choice(WORDS)}"
    op = rng.choice(("+", "-", "*"))
    return (
        f"def {name}({s.arg}, factor={rng.randint(2, 9)}):\n    total = 0\n    for item in {s.arg}:\n"
        f"        total = total {op} item * factor\n    return total\n"
    )


def _reviews(rng: random.Random, s: Slots) -> str:
    return f"Review by {rng.choice(NAMES)} ({rng.randint(1, 5)} stars): {rng.choice(_OPINIONS)}. {_prose(rng, s)}"


def _dialogue(rng: random.Random, s: Slots) -> str:
    return f"{rng.choice((s.name, s.name2)).split()[0]}: {_prose(rng, s)}"


def _wordlist(rng: random.Random, s: Slots) -> str:
    pool = WORDS + ("all", "most", "list", "count", "what", "find", "total", "each")
    return ", ".join(rng.choice(pool) for _ in range(rng.randint(4, 12)))


def _diary(rng: random.Random, s: Slots) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}: {_prose(rng, s)}"


def _foreign(rng: random.Random, s: Slots) -> str:
    return rng.choice(_FOREIGN) if rng.random() < 0.9 else rng.choice(_facts(s))


def _examples(rng: random.Random, s: Slots) -> str:
    word = rng.choice(WORDS)
    rule = rng.choice((str.upper, lambda w: w[::-1], lambda w: w + "s", lambda w: str(len(w))))
    return f"Input: {word}\nOutput: {rule(word)}\n"


LINES: dict[str, tuple[Callable[[random.Random, Slots], str], str]] = {
    # kind: (one line, the separator between lines)
    "prose": (_prose, " "),
    "notes": (_notes, "\n"),
    "table": (_table, "\n"),
    "log": (_log, "\n"),
    "email": (_email, "\n"),
    "config": (_config, "\n"),
    "code": (_code, "\n"),
    "reviews": (_reviews, "\n"),
    "dialogue": (_dialogue, "\n"),
    "wordlist": (_wordlist, ", "),
    "diary": (_diary, "\n"),
    "foreign": (_foreign, " "),
    "examples": (_examples, "\n"),
}
KINDS = tuple(LINES)


def document(kind: str, words: int, slots: Slots, rng: random.Random) -> str:
    """A `kind` document of about `words` words (at least one line) that states some of `slots`."""
    line, sep = LINES[kind]
    lines, count = [], 0
    while count < words or not lines:
        text = line(rng, slots)
        lines.append(text)
        count += len(text.split())
    if kind == "table":
        lines.insert(0, "name, city, item, amount, date")
    for fact in _facts(slots)[: rng.randint(1, 3)]:
        if kind in ("prose", "notes", "diary", "dialogue", "email"):
            lines.insert(rng.randint(0, len(lines)), fact)
    return sep.join(lines)
