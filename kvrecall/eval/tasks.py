"""Seeded, locally generated long-context tasks (RULER-style) sized in real tokens.

Every generator returns a :class:`Sample` whose ``prompt`` is the exact text to feed the
tokenizer of the bundled SmolLM2 model: it is already wrapped in the model's ChatML chat
template (``<|im_start|>`` / ``<|im_end|>``, which the tokenizer parses as special tokens)
and ends with a *primed* assistant answer (e.g. ``The secret code is``), so greedy decoding
only has to continue with the answer. Nothing is downloaded: haystacks, keys and values come
from small built-in vocabularies and a ``random.Random`` seeded by ``(task, seed)``.

Lengths are in tokens of the bundled tokenizer (:func:`kvrecall.models.smollm.load_tokenizer`);
a generator adds or removes filler sentences until ``len(tokenizer(prompt).input_ids)`` is
within :data:`LENGTH_TOLERANCE` of the request. Pass ``tokenizer=APPROX`` to size prompts
with the documented :data:`CHARS_PER_TOKEN` estimate instead (no model files needed).

``depth`` (in ``[0, 1]``) is where the queried needle sits in the haystack, as a fraction of
the haystack's tokens that precede it (0 = first, 1 = last). Aggregation tasks
(common words) have no single needle; their ``depth`` is a nominal 0.5.

The formats are the ones measured to be solvable by SmolLM2-135M-Instruct with full KV and
greedy decoding; see ``kvrecall/eval/FORMATS.md`` for the accuracy table and how to rerun it
(``python -m kvrecall.eval.tasks --measure``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

LENGTH_TOLERANCE = 0.02
"""Generators aim within this relative distance of the requested token count."""

CHARS_PER_TOKEN = 4.0
"""Approximate characters per token of the SmolLM2 tokenizer on these prompts, used only when
sizing with ``tokenizer=APPROX``. Measured at 2K tokens: 3.77 for the noise haystack, 3.96
for the common-words list, 5.0 for the QA prose; so APPROX prompts are within about -20%..+8%
of the requested length in real tokens (exactly on it in ``len(prompt) / 4`` units)."""

APPROX = "approx"
"""Pass as ``tokenizer`` to size prompts by :data:`CHARS_PER_TOKEN` instead of a tokenizer."""

SYSTEM_PROMPT = "You are a helpful assistant."

TASKS: tuple[str, ...] = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "vt",
    "cwe",
    "qa",
)
"""Task names, in the order of the accuracy table."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt with its reference answer.

    ``context_tokens`` is the prompt's measured length in tokens (with the tokenizer used to
    build it, or the :data:`CHARS_PER_TOKEN` estimate); ``depth`` is the queried needle's
    relative position in the haystack, in ``[0, 1]``; ``answers`` lists every item a
    multi-answer task expects (``answer`` is then those items joined by ``", "``);
    ``max_new_tokens`` is enough generated tokens for a correct answer.
    """

    task: str
    prompt: str
    answer: str
    context_tokens: int
    depth: float
    seed: int
    answers: tuple[str, ...] = ()
    max_new_tokens: int = 12
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    question_at: int = 0  # document-first samples: prompt[:question_at] is the document, the rest the question


# --------------------------------------------------------------------------------------------
# token counting


TokenCounter = Callable[[str], int]


def _counter(tokenizer: Any) -> TokenCounter:
    """Return a function that counts a text's tokens (no special tokens added)."""
    if tokenizer is None:
        from kvrecall.models.smollm import load_tokenizer

        tokenizer = load_tokenizer()
    if isinstance(tokenizer, str):
        if tokenizer != APPROX:
            raise ValueError(f"tokenizer must be a tokenizer object, None or {APPROX!r}, got {tokenizer!r}")
        return lambda text: max(1, round(len(text) / CHARS_PER_TOKEN))
    if callable(tokenizer) and not hasattr(tokenizer, "encode"):
        return tokenizer  # already a counter
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_tokens(text: str, tokenizer: Any = None) -> int:
    """Count ``text``'s tokens with ``tokenizer`` (``None``: the bundled one; or ``APPROX``)."""
    return _counter(tokenizer)(text)


def chat_prompt(user: str, primer: str) -> str:
    """Wrap ``user`` in SmolLM2's ChatML template and open the assistant turn with ``primer``."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{primer}"
    )


# --------------------------------------------------------------------------------------------
# haystacks

NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
"""RULER's repetitive noise haystack: clearly distinct from any needle."""

PROSE = (
    "The morning market opened early and the streets slowly filled with people.",
    "A light rain fell over the rooftops for most of the afternoon.",
    "Children walked along the river path on their way to school.",
    "The old stone bridge had stood in the same place for many years.",
    "In the evening the lamps along the square were lit one by one.",
    "Farmers brought carts of vegetables down from the hills.",
    "The wind carried the smell of fresh bread across the harbour.",
    "Boats rocked gently against the wooden pier.",
    "A small choir practised songs in the hall every week.",
    "The library stayed open late during the winter months.",
    "Travellers often stopped at the inn before crossing the mountains.",
    "The clock on the tower rang out every hour.",
    "Gardens behind the houses were full of flowers in the spring.",
    "Most days the road to the valley was quiet and empty.",
    "The fishermen mended their nets while they talked about the weather.",
    "Snow covered the fields for several weeks each year.",
)
"""Neutral prose for the QA document: no names, no numbers, no roles."""

KEY_WORDS = tuple(
    "apple river candle forest window silver garden rocket pencil bridge castle dragon planet "
    "violin tiger harbor mirror orange jacket meadow falcon island lantern marble ocean "
    "pepper rabbit saddle tunnel wagon".split()
)
"""Single-token-ish keys for multi-key needles."""

WORDS = tuple(
    "apple river candle forest window silver garden rocket pencil bridge castle dragon planet "
    "violin tiger harbor mirror orange jacket meadow falcon island lantern marble ocean "
    "pepper rabbit saddle tunnel wagon basket button carpet cookie donkey engine feather "
    "ginger hammer kettle ladder magnet needle oyster parrot pillow puzzle shadow spider "
    "temple turtle valley walnut winter yellow zipper anchor bottle cactus".split()
)
"""Vocabulary of the common-words task."""

NAMES = tuple(
    "Marta Oskar Lena Tomas Greta Victor Nadia Felix Irene Hugo Clara Bruno Elsa Pavel Rosa "
    "Anton Sofia Karl Vera Emil".split()
)
ROLES = tuple(
    "baker blacksmith mayor doctor teacher fisherman librarian carpenter innkeeper gardener "
    "tailor miller".split()
)


def _number(rng: random.Random, digits: int = 5) -> str:
    """A random ``digits``-digit decimal number without a leading zero."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _numbers(rng: random.Random, n: int, digits: int = 5) -> list[str]:
    """``n`` distinct random numbers (no two share their first three digits)."""
    out: list[str] = []
    prefixes: set[str] = set()
    while len(out) < n:
        x = _number(rng, digits)
        if x[:3] not in prefixes:
            prefixes.add(x[:3])
            out.append(x)
    return out


def _fit(
    build: Callable[[int], tuple[str, dict[str, Any]]],
    target: int,
    count: TokenCounter,
    unit_tokens: float,
    min_units: int = 1,
) -> tuple[str, int, dict[str, Any]]:
    """Find the number of filler units that makes ``build(n)`` closest to ``target`` tokens.

    ``build(n)`` returns ``(prompt, meta)`` for ``n`` filler units; ``unit_tokens`` is a first
    estimate of tokens per unit. Returns ``(prompt, measured_tokens, meta)``.
    """
    n = max(min_units, 1)
    prompt, meta = build(n)
    base = count(prompt)
    n = max(min_units, round((target - base) / unit_tokens) + n)
    best: tuple[int, int] | None = None
    seen: dict[int, int] = {}
    for _ in range(12):
        if n in seen:
            break
        prompt, meta = build(n)
        got = count(prompt)
        seen[n] = got
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (n, got)
        if abs(got - target) <= LENGTH_TOLERANCE * target / 2:
            break
        per = max(0.5, (got - base) / max(n - 1, 1)) if n > 1 else unit_tokens
        step = round((target - got) / per)
        if step == 0:
            step = 1 if got < target else -1
        n = max(min_units, n + step)
    assert best is not None
    prompt, meta = build(best[0])
    return prompt, best[1], meta


def _insert(units: list[str], items: Sequence[tuple[float, str]]) -> tuple[list[str], list[int]]:
    """Insert ``(depth, text)`` items among ``units`` at fractional positions.

    Returns the new list and, for each item (in the given order), its index in it.
    """
    n = len(units)
    slots = [(min(n, max(0, round(d * n))), i, text) for i, (d, text) in enumerate(items)]
    out: list[str] = []
    where = [0] * len(items)
    order = sorted(slots, key=lambda s: (s[0], s[1]))
    k = 0
    for pos in range(n + 1):
        while k < len(order) and order[k][0] == pos:
            where[order[k][1]] = len(out)
            out.append(order[k][2])
            k += 1
        if pos < n:
            out.append(units[pos])
    return out, where


def _noise(n: int, offset: int = 0) -> list[str]:
    """``n`` sentences of the repetitive noise haystack."""
    return [NOISE[(offset + i) % len(NOISE)] for i in range(n)]


def _prose(n: int, rng_seed: str) -> list[str]:
    """``n`` sentences of neutral prose, shuffled per seed, each pool pass reshuffled."""
    rng = random.Random(rng_seed)
    out: list[str] = []
    while len(out) < n:
        block = list(PROSE)
        rng.shuffle(block)
        out.extend(block)
    return out[:n]


def _rng(task: str, seed: int) -> random.Random:
    """The task's deterministic random generator for ``seed``."""
    return random.Random(f"kvrecall:{task}:{seed}")


def _depth(rng: random.Random, depth: float | None) -> float:
    """The requested depth, validated, or a seeded one in ``[0.05, 0.95]``."""
    if depth is None:
        return round(rng.uniform(0.05, 0.95), 3)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return float(depth)


def _check_len(context_tokens: int) -> None:
    if context_tokens < 128:
        raise ValueError(f"context_tokens must be at least 128, got {context_tokens}")


# --------------------------------------------------------------------------------------------
# generators


def niah_single(
    context_tokens: int, seed: int = 0, depth: float | None = None, tokenizer: Any = None
) -> Sample:
    """Single needle: one 5-digit secret code (stated twice) in the noise haystack.

    ``context_tokens``: requested prompt length in tokens; ``depth``: needle position in
    ``[0, 1]`` (``None``: seeded). Answer: the 5-digit code.
    """
    _check_len(context_tokens)
    task = "niah_single"
    rng = _rng(task, seed)
    d = _depth(rng, depth)
    code = _number(rng)
    needle = f"The secret code is {code}. Remember it: the secret code is {code}."
    head = (
        "A secret code is hidden inside the following text, among many sentences that do not "
        "matter. Find the secret code and remember it.\n\n"
    )
    tail = "\n\nWhat is the secret code mentioned in the text above? Answer with the number only."
    count = _counter(tokenizer)

    def build(n: int) -> tuple[str, dict[str, Any]]:
        units, where = _insert(_noise(n), [(d, needle)])
        return chat_prompt(head + " ".join(units) + tail, "The secret code is"), {"needle_index": where[0]}

    prompt, got, meta = _fit(build, context_tokens, count, unit_tokens=5.0)
    return Sample(task, prompt, code, got, d, seed, (code,), 8, {"needle": needle, **meta})


def niah_multikey(
    context_tokens: int, seed: int = 0, depth: float | None = None, tokenizer: Any = None, num_keys: int = 2
) -> Sample:
    """Multi-key needles: ``num_keys`` codes, each for a different word (each stated twice); the
    question, asked before and after the text, names one.

    ``depth`` places the queried needle; the distractor needles are spread at seeded depths.
    Answer: the queried word's 5-digit code. Two keys by default: with 3 or 4 the test model
    answers a distractor's code too often even with full KV (FORMATS.md).
    """
    _check_len(context_tokens)
    task = "niah_multikey"
    rng = _rng(task, seed)
    d = _depth(rng, depth)
    keys = rng.sample(KEY_WORDS, num_keys)
    codes = _numbers(rng, num_keys)
    depths = [d] + [round(rng.uniform(0.0, 1.0), 3) for _ in range(num_keys - 1)]
    needles = [
        f"The secret code for {k} is {c}. Remember it: the secret code for {k} is {c}."
        for k, c in zip(keys, codes, strict=True)
    ]
    head = (
        "Several secret codes are hidden inside the following text, each one for a different "
        "word. Find them and remember which code belongs to which word. Question: What is the "
        f"secret code for {keys[0]}?\n\n"
    )
    tail = (
        f"\n\nWhat is the secret code for {keys[0]} mentioned in the text above? Answer with the number only."
    )
    count = _counter(tokenizer)

    def build(n: int) -> tuple[str, dict[str, Any]]:
        units, where = _insert(_noise(n), list(zip(depths, needles, strict=True)))
        return (
            chat_prompt(head + " ".join(units) + tail, f"The secret code for {keys[0]} is"),
            {"needle_index": where[0]},
        )

    prompt, got, meta = _fit(build, context_tokens, count, unit_tokens=5.0)
    return Sample(
        task,
        prompt,
        codes[0],
        got,
        d,
        seed,
        (codes[0],),
        8,
        {"needle": needles[0], "keys": keys, "codes": codes, "distractors": codes[1:], **meta},
    )


def niah_multivalue(
    context_tokens: int,
    seed: int = 0,
    depth: float | None = None,
    tokenizer: Any = None,
    num_values: int = 3,
    numbered: bool = True,
) -> Sample:
    """Multi-value needles: one word has ``num_values`` different codes; all are asked for.

    ``depth`` places the first value; the others are spread at seeded depths after it.
    ``numbered`` primes the answer as a numbered list (``are:\n1.``), which cut the model's
    habit of repeating the first code. Answer: the codes, in order of appearance, joined by
    ``", "``. Score: fraction found.
    """
    _check_len(context_tokens)
    task = "niah_multivalue"
    rng = _rng(task, seed)
    d = _depth(rng, depth)
    key = rng.choice(KEY_WORDS)
    codes = _numbers(rng, num_values)
    depths = [d] + sorted(round(rng.uniform(d, 1.0), 3) for _ in range(num_values - 1))
    needles = [f"One of the secret codes for {key} is {c}." for c in codes]
    head = (
        f"Several secret codes for {key} are hidden inside the following text. "
        "Find all of them and remember them.\n\n"
    )
    tail = (
        f"\n\nWhat are all the secret codes for {key} mentioned in the text above? "
        "List the numbers only, separated by commas."
    )
    count = _counter(tokenizer)

    def build(n: int) -> tuple[str, dict[str, Any]]:
        units, where = _insert(_noise(n), list(zip(depths, needles, strict=True)))
        return (
            chat_prompt(
                head + " ".join(units) + tail,
                f"The secret codes for {key} are:\n1." if numbered else f"The secret codes for {key} are",
            ),
            {"needle_index": where[0]},
        )

    prompt, got, meta = _fit(build, context_tokens, count, unit_tokens=5.0)
    return Sample(
        task,
        prompt,
        ", ".join(codes),
        got,
        d,
        seed,
        tuple(codes),
        8 * num_values,
        {"needle": needles[0], "key": key, "depths": depths, **meta},
    )


def _var_name(rng: random.Random, taken: set[str]) -> str:
    """A fresh three-letter upper-case variable name."""
    while True:
        name = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
        if name not in taken:
            taken.add(name)
            return name


def vt(
    context_tokens: int,
    seed: int = 0,
    depth: float | None = None,
    tokenizer: Any = None,
    hops: int = 1,
    chains: int = 2,
    question: str = "resolve",
) -> Sample:
    """Variable tracking: ``VAR A = 12345.`` then ``VAR B = VAR A.`` (and so on) in noise.

    ``chains`` chains of ``hops + 1`` variables each, every chain with its own value; the
    first chain is the queried one. ``depth`` places its value assignment; its later links
    follow at seeded depths (the other chains start in the first 60%).

    * ``question="resolve"`` (task ``vt``): what is the value of the chain's last variable?
      Answer: the 5-digit value (scored like a needle).
    * ``question="list"`` (task ``vt_list``, RULER's form): which variables hold the value?
      Answer: the chain's names joined by ``", "``; score: hits divided by
      ``max(len(answers), distinct names listed)`` (listing every variable is penalised).
    """
    _check_len(context_tokens)
    if question not in ("resolve", "list"):
        raise ValueError(f"question must be 'resolve' or 'list', got {question!r}")
    rng = _rng("vt", seed)
    d = _depth(rng, depth)
    taken: set[str] = set()
    values = _numbers(rng, chains)
    items: list[tuple[float, str]] = []
    all_chains: list[list[str]] = []
    for c in range(chains):
        names = [_var_name(rng, taken) for _ in range(hops + 1)]
        all_chains.append(names)
        start = d if c == 0 else round(rng.uniform(0.0, 0.6), 3)
        ds = [start] + sorted(round(rng.uniform(start, 1.0), 3) for _ in range(hops))
        items.append((ds[0], f"VAR {names[0]} = {values[c]}."))
        for h in range(1, hops + 1):
            items.append((ds[h], f"VAR {names[h]} = VAR {names[h - 1]}."))
    target = all_chains[0]
    if question == "list":
        q = f"Find all variables that are assigned the value {values[0]} in the text above."
        primer = (
            f"According to the chain(s) of variable assignment in the text above, {hops + 1} "
            f"variables are assigned the value {values[0]}, they are: VAR"
        )
    else:
        q = f"What is the value of VAR {target[-1]} in the text above? Answer with the number only."
        primer = f"The value of VAR {target[-1]} is"
    head = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text. "
        f"Question: {q}\n\n"
    )
    tail = f"\n\nQuestion: {q}"
    count = _counter(tokenizer)

    def build(n: int) -> tuple[str, dict[str, Any]]:
        units, where = _insert(_noise(n), items)
        return chat_prompt(head + " ".join(units) + tail, primer), {"needle_index": where[0]}

    prompt, got, meta = _fit(build, context_tokens, count, unit_tokens=5.0)
    meta = {"needle": items[0][1], "value": values[0], "chains": all_chains, **meta}
    if question == "resolve":
        return Sample("vt", prompt, values[0], got, d, seed, (values[0],), 8, meta)
    return Sample("vt_list", prompt, ", ".join(target), got, d, seed, tuple(target), 6 * (hops + 1) + 4, meta)


def cwe(
    context_tokens: int,
    seed: int = 0,
    depth: float | None = None,
    tokenizer: Any = None,
    share: float = 1 / 3,
    numbered: bool = False,
) -> Sample:
    """Common-word extraction: a word list in which one word is by far the most frequent.

    The top word fills ``share`` of the entries, the rest are drawn uniformly from ~60 other
    words (comma-separated, or ``1. word 2. word`` when ``numbered``); the prompt carries one
    worked example. ``depth`` is ignored (nominal 0.5). Answer: the most frequent word.

    SmolLM2-135M does NOT solve this format (about 0-12% with full KV, see FORMATS.md): it
    names words that are not in the list. It is kept as an honest aggregation probe.
    """
    _check_len(context_tokens)
    task = "cwe"
    rng = _rng(task, seed)
    vocab = sorted(set(WORDS))
    top = rng.choice(vocab)
    others = [w for w in vocab if w != top]
    q = "What is the most frequent word in the list?"
    head = (
        "Below is a list of words. One word appears in the list much more often than "
        'all the others. For example, in the list "cat, dog, cat, fish, cat, bird, cat" the most '
        f'frequent word is "cat". Question: {q}\n\n'
    )
    tail = f"\n\nQuestion: {q} Answer with one word."
    count = _counter(tokenizer)
    every = max(2, round(1 / share))

    def words_for(n: int) -> list[str]:
        r = random.Random(f"kvrecall:cwe-list:{seed}")
        out = [top if i % every == 0 else r.choice(others) for i in range(n)]
        r.shuffle(out)
        return out

    def build(n: int) -> tuple[str, dict[str, Any]]:
        ws = words_for(n)
        body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ws)) if numbered else ", ".join(ws)
        return chat_prompt(head + body + tail, 'The most frequent word is "'), {"n_words": n}

    prompt, got, meta = _fit(build, context_tokens, count, unit_tokens=2.0, min_units=10)
    return Sample(task, prompt, top, got, 0.5, seed, (top,), 6, meta)


def qa(
    context_tokens: int, seed: int = 0, depth: float | None = None, tokenizer: Any = None, num_facts: int = 3
) -> Sample:
    """Question answering over a synthetic town document: ``num_facts`` facts of the form
    ``The baker of the town is named Marta.`` embedded in neutral prose; one role is asked.

    ``depth`` places the queried fact; the other facts sit at seeded depths. Answer: the name.
    """
    _check_len(context_tokens)
    task = "qa"
    rng = _rng(task, seed)
    d = _depth(rng, depth)
    roles = rng.sample(ROLES, num_facts)
    names = rng.sample(NAMES, num_facts)
    facts = [f"The {r} of the town is named {n}. {n} is the {r}." for r, n in zip(roles, names, strict=True)]
    depths = [d] + [round(rng.uniform(0.0, 1.0), 3) for _ in range(num_facts - 1)]
    q = f"According to the document, what is the name of the {roles[0]} of the town?"
    head = f"Read the following document about a small town and answer the question. Question: {q}\n\n"
    tail = f"\n\nQuestion: {q}"
    count = _counter(tokenizer)

    def build(n: int) -> tuple[str, dict[str, Any]]:
        units, where = _insert(_prose(n, f"kvrecall:qa-prose:{seed}"), list(zip(depths, facts, strict=True)))
        return (
            chat_prompt(head + " ".join(units) + tail, f"The {roles[0]} of the town is named"),
            {"needle_index": where[0]},
        )

    prompt, got, meta = _fit(build, context_tokens, count, unit_tokens=13.0)
    return Sample(
        task,
        prompt,
        names[0],
        got,
        d,
        seed,
        (names[0],),
        6,
        {"needle": facts[0], "candidates": names, **meta},
    )


def longdoc(
    context_tokens: int,
    seed: int = 0,
    depth: float | None = None,
    tokenizer: Any = None,
    num_facts: int | None = None,
) -> Sample:
    """Long input, long output: a town document (``num_facts`` people and their roles, each
    stated twice, in neutral prose; default one per 256 tokens, 2 to 8) followed by a request
    for a long, detailed report on it.

    Not scored: the harness replays full KV's greedy continuation under each policy and
    measures fidelity (top-1 agreement, KL), which does not depend on the model's skill.
    ``depth`` is ignored (nominal 0.5); ``answer`` is empty.
    """
    _check_len(context_tokens)
    task = "longdoc"
    rng = _rng(task, seed)
    if num_facts is None:
        num_facts = min(8, max(2, context_tokens // 256))
    roles = rng.sample(ROLES, min(num_facts, len(ROLES)))
    names = rng.sample(NAMES, len(roles))
    facts = [f"The {r} of the town is named {n}. {n} is the {r}." for r, n in zip(roles, names, strict=True)]
    depths = sorted(round(rng.uniform(0.0, 1.0), 3) for _ in facts)
    head = "Read the following document about a small town.\n\n"
    tail = (
        "\n\nWrite a long and detailed report about the town in the document above. Describe every "
        "person who is named, what their work is, and what daily life in the town is like."
    )
    count = _counter(tokenizer)

    def build(n: int) -> tuple[str, dict[str, Any]]:
        units, _ = _insert(_prose(n, f"kvrecall:longdoc-prose:{seed}"), list(zip(depths, facts, strict=True)))
        return chat_prompt(head + " ".join(units) + tail, ""), {"names": names, "roles": roles}

    prompt, got, meta = _fit(build, context_tokens, count, unit_tokens=13.0)
    return Sample(task, prompt, "", got, 0.5, seed, (), 0, meta)


GENERATORS: dict[str, Callable[..., Sample]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "vt": vt,
    "cwe": cwe,
    "qa": qa,
    "longdoc": longdoc,
}


def make_sample(
    task: str, context_tokens: int, seed: int = 0, depth: float | None = None, tokenizer: Any = None
) -> Sample:
    """Build one sample of ``task`` (a name in :data:`TASKS`, or ``"longdoc"``) of about
    ``context_tokens`` tokens."""
    try:
        gen = GENERATORS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(GENERATORS)}") from None
    return gen(context_tokens, seed=seed, depth=depth, tokenizer=tokenizer)


def demo_sample(context_tokens: int = 1000, seed: int = 0, tokenizer: Any = None) -> Sample:
    """The ``kvrecall demo`` prompt: a 5-digit secret code hidden in filler; ask for it.

    Same format as :func:`niah_single` (the format the test model solves reliably with full KV),
    with the needle at a seeded depth. ``context_tokens`` is the requested length in tokens.
    """
    s = niah_single(context_tokens, seed=seed, depth=None, tokenizer=tokenizer)
    return dataclasses.replace(s, task="demo")


FAMILIES: tuple[str, ...] = ("in_prompt", "doc_first")
"""How a sample reaches the model: ``in_prompt``, the question inside the ingested prompt (the
generators' prompts); ``doc_first``, the document ingested alone and the question after it
(:func:`document_first`)."""

DOCUMENT_HEAD = "Read the following text.\n\n"
"""The document-first user turn's opening: it names no task, so nothing at ingest hints at the
question."""

_USER, _ASSISTANT = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


def document_first(sample: Sample) -> Sample:
    """``sample`` with its document cached before the question exists: the prompt becomes
    ``<chat opening> DOCUMENT_HEAD <haystack>`` (the ``question_at`` characters a session ingests
    alone) followed by ``<the question> <assistant turn + primer>`` (fed after the ingest).

    Every generator's user turn is ``head + "\n\n" + haystack + "\n\n" + question`` with the
    haystack free of blank lines, so the head (which may state the task or the question) is
    replaced by :data:`DOCUMENT_HEAD` and the question part is kept. Same haystack, needle,
    answer and depth; ``context_tokens`` is re-estimated by the length change in characters."""
    start = sample.prompt.index(_USER) + len(_USER)
    end = sample.prompt.rindex(_ASSISTANT)
    user = sample.prompt[start:end]
    body_start, question_start = user.index("\n\n") + 2, user.rindex("\n\n")
    if question_start < body_start:
        raise ValueError(f"{sample.task}: the prompt has no head / haystack / question structure")
    document = sample.prompt[:start] + DOCUMENT_HEAD + user[body_start:question_start]
    prompt = document + user[question_start:] + sample.prompt[end:]
    shrink = (len(sample.prompt) - len(prompt)) / CHARS_PER_TOKEN
    return dataclasses.replace(
        sample, prompt=prompt, question_at=len(document), context_tokens=round(sample.context_tokens - shrink)
    )


# --------------------------------------------------------------------------------------------
# scoring

_NUM = re.compile(r"\d+")
_WORD = re.compile(r"[A-Za-z]+")


def _numbers_in(text: str) -> list[str]:
    return _NUM.findall(text)


def score(sample: Sample, generated_text: str) -> float:
    """Score ``generated_text`` (the model's continuation after the prompt) in ``[0, 1]``.

    * niah_single / niah_multikey / demo: 1 if the first number generated is the code.
    * niah_multivalue: fraction of the codes among the generated numbers.
    * vt: hits / max(len(answers), distinct variable names listed).
    * cwe / qa: 1 if the first word generated is the answer (case-insensitive).
    """
    text = generated_text.split("<|im_end|>")[0]
    task = sample.task
    if task in ("niah_single", "niah_multikey", "demo", "vt"):
        nums = _numbers_in(text)
        return 1.0 if nums and nums[0] == sample.answer else 0.0
    if task == "niah_multivalue":
        got = set(_numbers_in(text))
        ref = sample.answers or tuple(sample.answer.split(", "))
        return sum(1 for r in ref if r in got) / len(ref)
    if task == "vt_list":
        ref = set(sample.answers or tuple(sample.answer.split(", ")))
        listed = {w for w in re.findall(r"\b[A-Z]{3}\b", text) if w != "VAR"}
        if not listed:
            return 0.0
        return len(ref & listed) / max(len(ref), len(listed))
    if task in ("cwe", "qa"):
        words = _WORD.findall(text)
        return 1.0 if words and words[0].lower() == sample.answer.lower() else 0.0
    raise ValueError(f"no scorer for task {task!r}")


# --------------------------------------------------------------------------------------------
# measurement (full KV, greedy) -- the source of FORMATS.md


def generate_full_kv(model: Any, tokenizer: Any, sample: Sample, max_new_tokens: int | None = None) -> str:
    """Greedy-decode ``sample`` with the model's own full KV cache; return the new text."""
    import torch

    ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = ids.to(model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens or sample.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)


def measure(
    tasks: Sequence[str],
    lengths: Sequence[int],
    seeds: Sequence[int],
    depths: Sequence[float | None] = (None,),
    verbose: bool = True,
) -> dict:
    """Full-KV greedy accuracy of each task at each length over ``seeds`` x ``depths`` (``None``:
    the seed draws the depth).

    Returns ``{(task, length): (sum_of_scores, n)}``; prints one line per sample when verbose.
    """
    import torch

    from kvrecall.models.smollm import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model()
    results: dict[tuple[str, int], tuple[float, int]] = {}
    for task in tasks:
        for length in lengths:
            total = 0.0
            for seed, depth in itertools.product(seeds, depths):
                s = make_sample(task, length, seed=seed, depth=depth, tokenizer=tokenizer)
                t0 = time.perf_counter()
                text = generate_full_kv(model, tokenizer, s)
                sc = score(s, text)
                total += sc
                if verbose:
                    print(
                        f"{task:16s} len={length:5d} ({s.context_tokens:5d}) seed={seed:2d} depth={s.depth:.2f} "
                        f"score={sc:.2f} ans={s.answer!r} got={text!r} [{time.perf_counter() - t0:.1f}s]",
                        flush=True,
                    )
            n = len(seeds) * len(depths)
            results[(task, length)] = (total, n)
            if verbose:
                print(f"== {task} @ {length}: {total:g}/{n}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvrecall.eval.tasks``: print a sample, or ``--measure`` full-KV accuracy."""
    p = argparse.ArgumentParser(prog="python -m kvrecall.eval.tasks", description=__doc__.splitlines()[0])
    p.add_argument("--task", action="append", choices=TASKS, help="task(s) (default: all)")
    p.add_argument("--length", type=int, action="append", help="context length(s) in tokens")
    p.add_argument("--seeds", type=int, default=8, help="number of seeds (0..N-1)")
    p.add_argument("--seed-offset", type=int, default=0)
    p.add_argument("--depth", type=float, action="append", help="needle depth(s) (default: drawn by the seed)")
    p.add_argument("--measure", action="store_true", help="run the model (full KV, greedy)")
    a = p.parse_args(argv)
    tasks = a.task or list(TASKS)
    lengths = a.length or [1024, 2048]
    seeds = list(range(a.seed_offset, a.seed_offset + a.seeds))
    if not a.measure:
        for t in tasks:
            s = make_sample(t, lengths[0], seed=seeds[0])
            print(f"--- {t}: {s.context_tokens} tokens, depth {s.depth}, answer {s.answer!r}\n{s.prompt}\n")
        return 0
    results = measure(tasks, lengths, seeds, a.depth or [None])
    print("\n| task | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for t in tasks:
        cells = []
        for n in lengths:
            tot, cnt = results[(t, n)]
            cells.append(f"{tot:g}/{cnt} ({100 * tot / cnt:.0f}%)")
        print(f"| {t} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
