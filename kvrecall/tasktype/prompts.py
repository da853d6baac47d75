"""A labelled prompt set for the task classifier, generated locally (nothing downloaded).

Labels are windowkv's task types: LOCALIZATION (question answering, needle lookup, variable
tracking: the answer sits in one place of the context) and AGGREGATION (summary, code,
few-shot, counting / common words: the answer draws on the whole context). Each category
mixes kvrecall.eval.tasks generators with templates of its own; every own category has several
instruction phrasings, placed before or after the context, and phrasing 0 is held out of
training entirely (`unseen` prompts measure generalisation to wording the head never saw).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from kvrecall.eval import tasks
from kvrecall.v1 import kvrecall_pb2 as pb

LOCALIZATION, AGGREGATION = pb.TASK_TYPE_LOCALIZATION, pb.TASK_TYPE_AGGREGATION


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    label: int  # pb.TaskType
    category: str  # e.g. "summary"
    phrasing: int  # instruction template index (0 = held out of training)


def _prose(rng: random.Random, sentences: int) -> str:
    return " ".join(tasks._prose(sentences, f"tasktype:{rng.random()}"))


def _chat(rng: random.Random, instruction: str, context: str, primer: str = "") -> str:
    user = f"{instruction}\n\n{context}" if rng.random() < 0.5 else f"{context}\n\n{instruction}"
    return tasks.chat_prompt(user, primer)


# ---- localisation ---------------------------------------------------------------------------
LOOKUP = (
    "What is the access code of room {room}? Answer with the number only.",
    "Find the sentence that gives the access code of room {room} and report the code.",
    "According to the text, which code opens room {room}?",
    "Look up room {room} in the document: what is its access code?",
)
FACT_QA = (
    "Who delivered the letters on {day}? Answer with a name.",
    "In the passage, which person is said to have delivered the letters on {day}?",
    "Based on the document, name the person who delivered the letters on {day}.",
)


def _lookup(rng: random.Random, phrasing: int) -> str:
    room = rng.randint(10, 99)
    facts = [f"The access code of room {r} is {rng.randint(1000, 9999)}." for r in (room, room + 1, room + 7)]
    text = tasks._prose(rng.randint(8, 30), f"lookup:{rng.random()}")
    for fact in facts:
        text.insert(rng.randint(0, len(text)), fact)
    return _chat(rng, LOOKUP[phrasing].format(room=room), " ".join(text), "The code is")


def _fact_qa(rng: random.Random, phrasing: int) -> str:
    day = rng.choice(("Monday", "Tuesday", "Friday", "Sunday"))
    text = tasks._prose(rng.randint(8, 30), f"factqa:{rng.random()}")
    text.insert(
        rng.randint(0, len(text)), f"On {day} the letters were delivered by {rng.choice(tasks.NAMES)}."
    )
    return _chat(rng, FACT_QA[phrasing].format(day=day), " ".join(text))


# ---- aggregation ----------------------------------------------------------------------------
SUMMARY = (
    "Summarize the text above in two sentences.",
    "Write a short summary of this passage.",
    "Give a one-paragraph overview of what the document describes.",
    "What is the overall mood and subject of the whole text? Summarise it briefly.",
)
CODE = (
    "Complete the last function of this module.",
    "Explain what this program does as a whole.",
    "Write a docstring for the module below that describes all of its functions.",
    "Refactor the code to remove the duplication between the functions.",
)
FEWSHOT = (
    "Follow the pattern of the examples and give the output for the last input.",
    "Here are some examples. Continue with the same rule.",
    "Learn the mapping from the examples and apply it to the final input.",
)
COUNT = (
    "How many of the sentences above mention the weather?",
    "Count how often each animal appears in the list and report the totals.",
    "List every distinct word that occurs in the text.",
    "Which items appear most often overall? Give the top three.",
)


def _summary(rng: random.Random, phrasing: int) -> str:
    return _chat(rng, SUMMARY[phrasing], _prose(rng, rng.randint(8, 30)), "Summary:")


def _code(rng: random.Random, phrasing: int) -> str:
    words = rng.sample(tasks.WORDS, 8)
    functions = []
    for i in range(rng.randint(3, 7)):
        name, arg = words[i % 8], words[(i + 3) % 8]
        op = rng.choice(("+", "-", "*"))
        functions.append(
            f"def {name}_{i}({arg}, factor={rng.randint(2, 9)}):\n"
            f"    total = 0\n    for item in {arg}:\n        total = total {op} item * factor\n    return total\n"
        )
    functions.append(f"def {words[0]}_summary(values):\n    ")
    return _chat(rng, CODE[phrasing], "```python\n" + "\n".join(functions) + "\n```")


def _fewshot(rng: random.Random, phrasing: int) -> str:
    rule = rng.choice(("upper", "double", "reverse", "plural"))

    def apply(word: str, n: int) -> tuple[str, str]:
        if rule == "upper":
            return word, word.upper()
        if rule == "double":
            return str(n), str(2 * n)
        if rule == "reverse":
            return word, word[::-1]
        return word, word + "s"

    lines = []
    for _ in range(rng.randint(4, 16)):
        source, target = apply(rng.choice(tasks.WORDS), rng.randint(1, 500))
        lines.append(f"Input: {source}\nOutput: {target}")
    source, _ = apply(rng.choice(tasks.WORDS), rng.randint(1, 500))
    lines.append(f"Input: {source}\nOutput:")
    return _chat(rng, FEWSHOT[phrasing], "\n\n".join(lines))


def _count(rng: random.Random, phrasing: int) -> str:
    if rng.random() < 0.5:
        context = ", ".join(rng.choice(tasks.WORDS[:20]) for _ in range(rng.randint(30, 150)))
    else:
        context = _prose(rng, rng.randint(8, 30))
    return _chat(rng, COUNT[phrasing], context)


# ---- the eval generators (their own fixed wording: no held-out phrasing) ----------------------
def _generator(task: str) -> Callable[[random.Random, int], str]:
    def build(rng: random.Random, phrasing: int) -> str:
        return tasks.make_sample(
            task, rng.randint(160, 480), seed=rng.randint(0, 10**6), tokenizer=tasks.APPROX
        ).prompt

    return build


CATEGORIES: dict[str, tuple[int, Callable[[random.Random, int], str], int]] = {
    # category: (label, builder, phrasings; 1 = a generator with fixed wording)
    "niah_single": (LOCALIZATION, _generator("niah_single"), 1),
    "niah_multikey": (LOCALIZATION, _generator("niah_multikey"), 1),
    "vt": (LOCALIZATION, _generator("vt"), 1),
    "qa": (LOCALIZATION, _generator("qa"), 1),
    "lookup": (LOCALIZATION, _lookup, len(LOOKUP)),
    "fact_qa": (LOCALIZATION, _fact_qa, len(FACT_QA)),
    "cwe": (AGGREGATION, _generator("cwe"), 1),
    "summary": (AGGREGATION, _summary, len(SUMMARY)),
    "code": (AGGREGATION, _code, len(CODE)),
    "fewshot": (AGGREGATION, _fewshot, len(FEWSHOT)),
    "count": (AGGREGATION, _count, len(COUNT)),
}


def labelled_prompts(per_category: int, seed: int = 0) -> list[LabelledPrompt]:
    """`per_category` prompts of every category, phrasings cycled, deterministic in `seed`."""
    out = []
    for category, (label, build, phrasings) in CATEGORIES.items():
        for i in range(per_category):
            rng = random.Random(f"kvrecall:tasktype:{category}:{seed}:{i}")
            phrasing = i % phrasings
            out.append(
                LabelledPrompt(build(rng, phrasing), label, category, phrasing if phrasings > 1 else -1)
            )
    return out
