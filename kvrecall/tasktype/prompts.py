"""Labelled prompts for the task classifier, written for it (nothing downloaded, no eval template).

Labels are windowkv's task types. LOCALIZATION: the answer sits in one place of the context
(look up a value, who / when / where / which, quote a line, a hidden passkey, a yes-or-no check
of one statement). AGGREGATION: the answer draws on the whole context (summaries, counting
occurrences, listing every X, tracking a value through the text, trends and totals, the most
frequent item, overall sentiment, few-shot patterns, code over a whole module).

Each family has TRAIN and HELD_OUT instruction templates with different wordings. `generated`
assembles a prompt from a family's template, a filler document of documents.KINDS, a
placement (instruction before, after, or on both sides of the document; a neutral preamble),
and a chat wrapper (none, ChatML, Llama 3, Mistral, plain). The `train` split uses TRAIN
templates and documents of TRAIN_WORDS words; `heldout` uses HELD_OUT templates and documents
either shorter or longer than any in training (HELD_OUT_WORDS).

Two more sets check the head on prompts it was never built from: `harness` (the eval
harness's own generators, kvrecall.eval.tasks, labelled by HARNESS_LABELS) and `HANDWRITTEN`
(short prompts on other topics, written by hand).
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from kvrecall.tasktype import documents
from kvrecall.tasktype.documents import Slots
from kvrecall.v1 import kvrecall_pb2 as pb

LOCALIZATION, AGGREGATION = pb.TASK_TYPE_LOCALIZATION, pb.TASK_TYPE_AGGREGATION
SPLITS = ("train", "dev", "heldout")
TRAIN_WORDS = (40, 700)
HELD_OUT_WORDS = ((3, 39), (701, 4000))  # shorter and longer documents than training's
_GROUP = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    label: int  # pb.TaskType
    family: str  # e.g. "summary"; "harness:<task>" / "handwritten" for the check sets
    template: int  # index into the family's templates of its split (-1: none)
    words: int  # the filler document's requested length in words (0: not generated here)


@dataclass(frozen=True)
class Family:
    """A kind of request. `train` templates are small grammars: each `[a|b|c]` group is one
    of its options (:func:`expand`); `dev` templates are plain sentences that none of them
    expands to (tests/test_tasktype.py checks), seen while the grammars were written."""

    label: int
    train: tuple[str, ...]
    dev: tuple[str, ...]
    kinds: tuple[str, ...] = documents.KINDS  # the documents it is asked over


FAMILIES: dict[str, Family] = {
    # ---- localization ----------------------------------------------------------------------
    "value": Family(
        LOCALIZATION,
        (
            "[What is|What's|Tell me|Give me|Report|State] the [value|setting|number] [of|for] {key}[?|.]",
            "[Find|Look up|Locate|Search for|Retrieve] the value [of|for|assigned to] {key}[.| and report it.]",
            "[What|Which] [value|number] is [assigned to|given for|stored under|configured for] {key}?",
            "{key}[:| -] what [is|was] it set to?",
            "What did the [document|file|text|config] set {key} to?",
        ),
        (
            "Which number does the text give for {key}?",
            "Report the exact figure listed for {key}.",
            "{key}: what's it configured as?",
        ),
    ),
    "who": Family(
        LOCALIZATION,
        (
            "[Who|Which person|Which employee] [is|was|works as] the {role}[?| in the text?| according to the document?]",
            "[Name|Identify|Tell me] the [person|employee|colleague] who [moved|carried|delivered|handled] the {item}.",
            "Who [reported|filed|sent] the {metric} [figures|numbers|report][?| for the {service} team?]",
            "[According to the text|Based on the document|In the passage], who [moved|took] the {item} to {city}?",
        ),
        (
            "Whose job is it to look after the {item}?",
            "Identify the individual that serves as {role}.",
            "Tell me which colleague handled the {metric} report.",
        ),
    ),
    "when": Family(
        LOCALIZATION,
        (
            "[When|On what day|On which date|What day] did {name} [move|ship|deliver|take] the {item}?",
            "[When|On what date] was {key} [changed|set|updated]?",
            "[What date|When] did {name2} [report|submit|file] the {metric}[?| numbers?]",
            "On which day was the {item} [moved|sent] to {city}?",
        ),
        (
            "At what point in the week did the {item} arrive in {city}?",
            "Give the date on which {name2} filed the {metric} numbers.",
        ),
    ),
    "where": Family(
        LOCALIZATION,
        (
            "[Where|In which city|In what place] [is|was] the {item} [kept|stored|moved|now]?",
            "Where does {name} [work|live|keep the {item}]?",
            "[To which city|Where] did {name} [take|send|move] the {item}?",
        ),
        (
            "What location does the text give for the {item}?",
            "Where did the {item} end up?",
        ),
    ),
    "which": Family(
        LOCALIZATION,
        (
            "Which [service|team|server|component] [logged|raised|reported] the [first|last] [error|warning]?",
            "Which [item|object|thing] did {name} [move|carry|order]?",
            "Which function [takes|accepts|has] the [argument|parameter] {arg}?",
            "[Which|What] team did {name2} report for?",
        ),
        (
            "What is the name of the service whose error is mentioned first?",
            "Say which object {name} carried to {city}.",
        ),
    ),
    "quote": Family(
        LOCALIZATION,
        (
            "[Retrieve|Find|Locate|Return|Show] the [sentence|line|passage|entry] [that mentions|about|describing|"
            "containing] [the {item}|{name}|{key}][.| and copy it.| verbatim.]",
            "[Quote|Copy|Repeat] the [line|sentence] where {name} [is mentioned|appears].",
        ),
        (
            "Copy out, word for word, the part describing the {item}.",
            "Point me to the line about {key}.",
        ),
    ),
    "passkey": Family(
        LOCALIZATION,
        (
            "[A|One] [special|secret|hidden] [passkey|password|code|number] is hidden in the [text|document|notes]. "
            "[What is it?|Find it.|Give it to me.|Report it.]",
            "What is the [password|passkey|access code|secret token|PIN] [mentioned|hidden|given] in the [text|document]?",
            "[Find|Retrieve|Extract] the hidden [access code|passkey|number][ for {word}|].[ Answer with the number only.|]",
            "Somewhere in the [text|document|notes] there is a [secret|special] [number|code] for {word}. What is it?",
        ),
        (
            "There is one magic number buried in the notes above; what is it?",
            "The document conceals a PIN. Tell me the PIN.",
        ),
    ),
    "check": Family(
        LOCALIZATION,
        (
            "[Does|Did] the [document|text|passage] [say|state|mention] that {name} is the {role}?"
            "[ Answer yes or no.| Yes or no.|]",
            "Is {key} set to {value}[?| in the config?][ Answer yes or no.|]",
            "[Was|Is] the {item} [moved|sent|delivered] on {day}?",
            "Did {name2} [report|submit] the {metric}?[ Yes or no.| Answer with yes or no.|]",
        ),
        (
            "True or false: the text states that {name} took the {item} to {city}.",
            "Confirm whether {key} equals {value} in the document.",
        ),
    ),
    "amount": Family(
        LOCALIZATION,
        (
            "How much [does|did] the {item} cost[?| according to the record?| in the table?]",
            "How many [units|copies|boxes] of the {item} did {name} [order|buy|ship]?",
            "What [amount|number|figure] is [listed|recorded|given] for {name}[ in the table|]?",
            "How old is {name} according to the [record|entry|table]?",
        ),
        (
            "What is the price recorded next to the {item}?",
            "What quantity appears on {name}'s row?",
        ),
    ),
    "multivalue": Family(
        LOCALIZATION,
        (
            "What are the [two|three] [codes|values|numbers] [given|listed|recorded] for {key}?",
            "[Find|Give] both [phone numbers|codes|values] [listed|stated] for {name}.",
            "Which [two|three] [cities|dates] are given for the {item}?",
        ),
        (
            "{name} has more than one badge number in the notes; which are they?",
            "Report each of the codes that belong to {word}.",
        ),
    ),
    "lookup_code": Family(
        LOCALIZATION,
        (
            "What is the default [value|setting] of [factor|the factor argument] in {func}?",
            "What does [the function |]{func} return?",
            "Which [argument|parameter] does {func} [take|accept]?",
            "[Where|On which line] is {func} defined?",
        ),
        (
            "In {func}, what is factor's default?",
            "Show me only the body of {func}.",
        ),
        ("code",),
    ),
    "lookup_example": Family(
        LOCALIZATION,
        (
            "What output [do|does] the [examples|example list] give for [the input |]{word}?",
            "[Which|Find the] example [has|with] the input {word}[? Give its output.| and give its output.]",
        ),
        ("In the examples above, what was {word} mapped to?",),
        ("examples",),
    ),
    # ---- aggregation -----------------------------------------------------------------------
    "summary": Family(
        AGGREGATION,
        (
            "[Summarize|Summarise|Briefly summarize|Give a summary of|Write a summary of] the [text|document|"
            "passage|notes|article|conversation|thread][ above| below|][.| in two sentences.| in one paragraph.]",
            "[Write|Give|Provide] a [short|brief|concise|one-paragraph] [overview|summary|recap|synopsis] of the "
            "[whole |entire |full |][text|document|passage].",
            "Provide a TL;DR[ of these notes| of the document|].",
            "What is [this|the] [document|text|passage] about? [Summarize it.|Give a short summary.|Answer in a few "
            "sentences.]",
            "[Summarise|Recap] the main points[ of the document| of the discussion|].",
        ),
        (
            "Condense this document into three bullet points.",
            "What is this text about overall? Answer in two sentences.",
            "Sum up the key takeaways of the entire report.",
        ),
    ),
    "count": Family(
        AGGREGATION,
        (
            "How many times [is|was] [the {item}|{name}|{city}|the word {word}] mentioned[ in the text| in the "
            "document| in total|]?",
            "How many times does [the {item}|{name}|the word {word}] [appear|occur][ in the text| in total|]?",
            "Count [the number of|how many|all] [entries|lines|rows|sentences|emails] [that mention|about] "
            "[{name}|{city}|the {item}].",
            "How many [errors|warnings|entries|rows|reviews] [are there|appear|are listed] in [the log|the table|the "
            "document][?| altogether?]",
            "Count how often [the word |]{word} [occurs|appears|is used].",
            "What is the number of [distinct|different|unique] [names|cities|items] in the [text|document|list]?",
        ),
        (
            "Tally every occurrence of the word {word}.",
            "What is the total number of rows with a WARN level?",
            "In all, how many separate times does {name} come up?",
        ),
    ),
    "list_all": Family(
        AGGREGATION,
        (
            "List [all|every one of] the [names|people|items|dates|cities|services|errors] [that appear|mentioned|"
            "that occur] in the [document|text|notes|log].",
            "[Enumerate|Name|Extract] [all|every|each] [person|item|date|city] [mentioned|in the text|that is "
            "mentioned][.|, without duplicates.]",
            "Find all the [services|people|rows] that [logged a warning|mention {city}|ordered the {item}].",
            "Make a list of [every|all] [item|name|date] in the [text|document].",
        ),
        (
            "Give me every person referred to anywhere in the notes.",
            "Extract each distinct city the text mentions.",
            "Which people appear in the document? Include all of them.",
        ),
    ),
    "track": Family(
        AGGREGATION,
        (
            "Track [how|every change in|the value of] {key} [changes |][throughout|across|over] the [document|text|log].",
            "Describe how {name}'s [situation|role|work] [evolves|changes|develops] [over the course of|throughout|"
            "across] the [text|document].",
            "Put [all |][the |]events in chronological order.",
            "Follow [every|each] change to the {item} from beginning to end.",
            "[Keep track of|Track] [each|every] [update|change|move] of the {item} [through the text|across the "
            "document].",
        ),
        (
            "Trace each update to {key} from start to finish.",
            "Build a timeline of everything that happened.",
        ),
    ),
    "trend": Family(
        AGGREGATION,
        (
            "What is the [overall|general|long-term] trend [of|in] the [numbers|values|amounts|{metric}][ in the "
            "table| across the report|]?",
            "[Compute|Calculate|What is] the [average|median|total|sum of the] [amount|{metric}|value] [across|over|"
            "of] all [rows|entries|records|lines].",
            "How did the {metric} [develop|change|move] over the [whole|entire] [period|year|report]?",
            "What is the total {metric} [over|across|for] all the [entries|rows|days]?",
        ),
        (
            "Is {metric} generally rising or falling across the report?",
            "Add up every amount listed and give the sum.",
            "What's the mean of all the values shown?",
        ),
    ),
    "frequent": Family(
        AGGREGATION,
        (
            "Which [word|name|item|city] [occurs|appears|is mentioned] most [often|frequently][ in the list| in the "
            "document|]?",
            "What are the [three|five|top three|top ten] most [common|frequent] [words|items|names][ in the text|]?",
            "Find the most [frequent|common] [word|item|name|service] in the [text|list|log].",
        ),
        (
            "Find the entry that is repeated more than any other.",
            "Rank the top five words by how often they occur.",
        ),
    ),
    "sentiment": Family(
        AGGREGATION,
        (
            "What is the [overall|general] [sentiment|opinion|tone|mood] of the [reviews|emails|conversation|text]?",
            "What are the [main|key|recurring|common] [themes|topics|issues] [across|in] [all of the|the] [emails|"
            "reviews|notes|document]?",
            "Describe the [general|overall] [mood|attitude|tone] of the [whole |entire |][text|discussion].",
            "What do the [people|speakers|reviewers] [agree on|complain about|like] [overall|in general|most]?",
        ),
        (
            "How do the customers feel in general?",
            "Characterize the tone of the conversation as a whole.",
        ),
    ),
    "compare": Family(
        AGGREGATION,
        (
            "Compare the [first half|beginning|first part] of the [document|text] with the [second half|end|last part].",
            "What do [all of the|all the|the] [entries|emails|records|reviews] have in common?",
            "Group the [records|rows|entries] by [city|item|name|service] and [describe|summarize|count] each group.",
            "How do the [different|various] [speakers|reviewers|sections] [differ|compare]?",
        ),
        (
            "Contrast the views expressed by the different speakers.",
            "Cluster the rows by item and say what each cluster shows.",
        ),
    ),
    "rewrite": Family(
        AGGREGATION,
        (
            "[Translate|Render] the [entire|whole|full] [text|document|passage] into [French|German|Spanish|Japanese].",
            "Rewrite the [whole |entire |][document|text] in [plain|simple|formal] language.",
            "Turn [these notes|this document|the log] into a [structured|formal|short] report[ with headings|].",
            "[Proofread|Edit] the [whole|entire] [text|document] for [grammar|clarity].",
        ),
        (
            "Convert the full document into a formal letter.",
            "Paraphrase everything above for a ten-year-old.",
        ),
    ),
    "fewshot": Family(
        AGGREGATION,
        (
            "Follow the [pattern|format|rule] of the examples and [give|write|produce] the output for the [last|final|"
            "new] input.",
            "Continue [with|using] the same [rule|pattern|mapping] as the examples.",
            "[Learn|Work out|Figure out] the [mapping|rule|transformation] from the examples and apply it to the "
            "[final|last] input.",
        ),
        ("Infer the rule from the examples and apply it to the new case.",),
        ("examples",),
    ),
    "code": Family(
        AGGREGATION,
        (
            "[Complete|Finish|Implement] the [last|final|unfinished] function [of|in] this [module|file|script].",
            "[Explain|Describe] what [this|the] [program|module|code|script] does [as a whole|overall|in general].",
            "Write a docstring for the [module|file|code] that describes [all of its|each of its|every one of its] "
            "functions.",
            "Refactor the [code|module|file] to remove [the duplication|repetition] [between|across] the functions.",
            "[Add|Write] [type hints|unit tests|comments] for [all|every one] of the functions[ in this module|].",
        ),
        (
            "Finish the code below so that it runs.",
            "Review the whole file and list its problems.",
        ),
        ("code",),
    ),
}

HELD_OUT: dict[str, tuple[str, ...]] = {
    # The final test's wordings, written before the last round of training grammars and read
    # only through the reported accuracy (not used to tune anything).
    "value": ("I need the number configured for {key}.", "Quickly: {key} equals what?"),
    "who": ("Who was given the title of {role}?", "The {item} was moved by whom?"),
    "when": ("Tell me the weekday the {item} went to {city}.", "What was the date of {name2}'s {metric} report?"),
    "where": ("The {item} was taken to which place?", "Name the town where {name} left the {item}."),
    "which": (
        "Of all the services, which single one raised an error first?",
        "Pick out the team that {name2} filed numbers for.",
    ),
    "quote": ("Reproduce the exact sentence about {name}.", "Paste the line containing {key}."),
    "passkey": (
        "Buried in this text is a numeric key. Output the key.",
        "What's the hidden password? Reply with just the password.",
    ),
    "check": ("Is it correct that {name} works as the {role}?", "Verify: was the {item} sent to {city}?"),
    "amount": ("What did the {item} sell for?", "Give me {name}'s figure from the table."),
    "multivalue": ("Which values are attached to {key}? There may be several.", "Give both of the codes stored under {word}."),
    "lookup_code": ("What's the signature of {func}?", "Which value does {func} use for factor by default?"),
    "lookup_example": ("Look at the examples: what does {word} become?",),
    "summary": ("Give me the gist of this text in a few lines.", "Can you boil this document down to its essentials?"),
    "count": ("Determine how frequently {name} shows up across the document.", "How many entries mention {city} altogether?"),
    "list_all": ("Write down each name you can find in the text.", "Collect all dates mentioned and return them as a list."),
    "track": (
        "How does {key} change from the first mention to the last?",
        "Walk through the history of the {item} across the whole log.",
    ),
    "trend": ("Overall, are the amounts increasing or decreasing?", "What's the grand total of all the amounts?"),
    "frequent": ("Which item turns up the most times?", "Tell me the five words that occur most."),
    "sentiment": (
        "What's the prevailing attitude of the reviewers?",
        "Overall, are people happy or unhappy in these emails?",
    ),
    "compare": (
        "How is the start of the text different from the ending?",
        "Sort the records into groups by city and describe the groups.",
    ),
    "rewrite": ("Rewrite all of this as a bulleted list.", "Make the entire text sound more friendly."),
    "fewshot": ("Using the examples as a guide, produce the missing output.",),
    "code": ("Add error handling to every function in this file.", "What is the purpose of this module overall?"),
}  # fmt: skip

PREAMBLES = (
    "", "", "Read the following text.", "Here is a document.", "Below is some context.", "Context:",
    "Use the document below to complete the task.", "Please read carefully.",
)  # fmt: skip
SUFFIXES = ("", "", "", "Be concise.", "Answer briefly.", "Think step by step.", "Only use the document.")
SYSTEMS = ("You are a helpful assistant.", "You are a careful analyst.", "Answer truthfully.")
PRIMERS = ("", "", "", "Answer:", "Sure.", "Here is my answer:")


def _wrap(rng: random.Random, user: str) -> str:
    """The user turn in one of several chat formats (the classifier strips their markup)."""
    system, primer = rng.choice(SYSTEMS), rng.choice(PRIMERS)
    style = rng.randrange(5)
    if style == 0:
        return user
    if style == 1:
        return (
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{primer}"
        )
    if style == 2:
        return (
            f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n{primer}"
        )
    if style == 3:
        return f"<s>[INST] {user} [/INST] {primer}"
    return f"User: {user}\nAssistant: {primer}"


def _user_turn(rng: random.Random, instruction: str, document: str) -> str:
    preamble, suffix = rng.choice(PREAMBLES), rng.choice(SUFFIXES)
    ask = f"{instruction} {suffix}".strip()
    if rng.random() < 0.3:
        ask = f"{rng.choice(('Question:', 'Task:', 'Instruction:', 'Q:'))} {ask}"
    where = rng.random()
    if where < 0.45:  # after the document
        parts = (preamble, document, ask)
    elif where < 0.8:  # before it
        parts = (ask, document, preamble if rng.random() < 0.2 else "")
    else:  # on both sides, as the eval harness does
        parts = (ask, document, ask)
    return "\n\n".join(p for p in parts if p)


def expand(template: str, rng: random.Random) -> str:
    """`template` with each `[a|b|c]` group replaced by one of its options."""
    return _GROUP.sub(lambda m: rng.choice(m.group(1).split("|")), template)


def expansions(template: str) -> Iterator[str]:
    """Every wording `template` can expand to."""
    parts = _GROUP.split(template)  # text, options, text, options, ..., text
    for choice in itertools.product(*(group.split("|") for group in parts[1::2])):
        yield "".join(itertools.chain.from_iterable(itertools.zip_longest(parts[::2], choice, fillvalue="")))


def generated(n: int, split: str, seed: int = 0) -> list[LabelledPrompt]:
    """`n` prompts of `split` (SPLITS), the labels alternating and each label's
    families cycled, deterministic in (split, seed)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    by_label = {label: [f for f, family in FAMILIES.items() if family.label == label] for label in (LOCALIZATION, AGGREGATION)}
    out = []
    for i in range(n):
        rng = random.Random(f"kvrecall:tasktype:{split}:{seed}:{i}")
        names = by_label[(LOCALIZATION, AGGREGATION)[i % 2]]
        name = names[(i // 2) % len(names)]
        family = FAMILIES[name]
        templates = {"train": family.train, "dev": family.dev, "heldout": HELD_OUT[name]}[split]
        template = rng.randrange(len(templates))
        low, high = TRAIN_WORDS if split == "train" else rng.choice(HELD_OUT_WORDS)
        words = rng.randint(low, high)
        slots = Slots.draw(rng)
        document = documents.document(rng.choice(family.kinds), words, slots, rng)
        instruction = expand(templates[template], rng).format(**vars(slots))
        text = _wrap(rng, _user_turn(rng, instruction, document))
        out.append(LabelledPrompt(text, family.label, name, template, words))
    return out


# ---- the eval harness's own prompts: an out-of-distribution check, never trained on ----------
HARNESS_LABELS = {
    "niah_single": LOCALIZATION,
    "niah_multikey": LOCALIZATION,
    "niah_multivalue": LOCALIZATION,  # every value of one key: a few needles, found by lookup
    "vt": LOCALIZATION,  # a chain of a few assignments: RULER's multi-hop tracing of needles
    "qa": LOCALIZATION,
    "cwe": AGGREGATION,  # the most frequent word of the whole list
    "longdoc": AGGREGATION,  # a long report on the whole document
}
"""windowkv's task for each kvrecall.eval.tasks generator. vt is labelled LOCALIZATION: its
answer sits in two or three short assignments among noise (RULER files it under multi-hop
tracing, apart from its aggregation tasks), which favours the needle-friendly window score."""


def harness(lengths: tuple[int, ...] = (500, 2000, 8000), seeds: int = 4) -> list[LabelledPrompt]:
    """Every generator of kvrecall.eval.tasks at `lengths` (approximate tokens) and `seeds`."""
    from kvrecall.eval import tasks

    return [
        LabelledPrompt(
            tasks.make_sample(task, length, seed=seed, tokenizer=tasks.APPROX).prompt, label, f"harness:{task}", -1, 0
        )
        for task, label in HARNESS_LABELS.items()
        for length in lengths
        for seed in range(seeds)
    ]


# Hand-written prompts in topics and phrasings that neither the generator above nor the eval
# harness produces (short, no shared templates).
HANDWRITTEN_LOCALIZATION = (
    "The museum opened in 1921. Its first curator was Edith Marlowe, who catalogued the "
    "collection of Roman coins. In 1954 a fire destroyed the east wing, which was rebuilt "
    "in 1958 under the architect Tomas Brandt. The gift shop sells postcards and maps.\n\n"
    "Which architect rebuilt the east wing?",
    "Shipping manifest:\n- crate A17: ceramic tiles, 40 kg, port of Genoa\n- crate B02: "
    "olive oil, 120 kg, port of Valencia\n- crate C33: copper wire, 75 kg, port of Hamburg\n"
    "- crate D09: wool blankets, 30 kg, port of Oslo\n\nFrom which port did crate C33 leave?",
    "Meeting notes. Priya will book the venue. Jonas handles catering and must confirm "
    "the menu by Friday. Mei is responsible for the speaker list. The budget owner is "
    "Alvaro.\n\nQuestion: who is responsible for the catering?",
    "Here is a list of employee badges: Greta 4471, Samuel 9032, Ilse 1185, Oren 6620, "
    "Kaveh 3307. What badge number does Ilse have?",
    "In the novel, the lighthouse keeper keeps a red notebook hidden under the third stair. "
    "The children later find a brass key inside the clock. The storm arrives on the ninth "
    "night.\n\nWhere is the red notebook hidden?",
    "Config file:\nmax_connections = 250\ntimeout_ms = 4000\nretry_limit = 7\n"
    "log_dir = /var/log/app\n\nWhat value does retry_limit have?",
)
HANDWRITTEN_AGGREGATION = (
    "Email 1: The server was slow on Monday. Email 2: We upgraded the database on Tuesday. "
    "Email 3: Users reported faster pages on Wednesday. Email 4: Costs rose by ten percent.\n\n"
    "Write a two-sentence summary of this email thread.",
    "Translate each word to French, following the examples.\ncat -> chat\ndog -> chien\n"
    "house -> maison\nbread -> pain\nwater ->",
    "Write a Python function `mean_of_squares(xs)` that returns the mean of the squares of "
    "a list of numbers, with a docstring and a check for the empty list.",
    "Reviews: 'Great battery, poor screen.' 'Screen is dim, battery lasts days.' "
    "'Love the battery.' 'The screen scratches easily.'\n\nWhat do the reviewers think "
    "overall? Give the general sentiment about battery and screen.",
    "Count how many times the word 'river' appears in this text: The river bends near the "
    "mill. Children swim in the river. The old river road floods each spring, and the river "
    "carries leaves to the sea.",
    "Here are the quarterly sales: Q1 120, Q2 135, Q3 150, Q4 170. Describe the overall "
    "trend over the year in a short paragraph.",
)


def handwritten() -> list[LabelledPrompt]:
    """The hand-written prompts, in ChatML as a chat server would render them."""
    return [
        LabelledPrompt(
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", label, "handwritten", i, 0
        )
        for label, texts in ((LOCALIZATION, HANDWRITTEN_LOCALIZATION), (AGGREGATION, HANDWRITTEN_AGGREGATION))
        for i, text in enumerate(texts)
    ]
