"""Labelled prompts for the task classifier, written for it (nothing downloaded, no eval template).

Labels are windowkv's task types. LOCALIZATION: the answer sits in one place of the context
(look up a value, who / when / where / which, quote a line, a hidden passkey, a yes-or-no check
of one statement). AGGREGATION: the answer draws on the whole context (summaries, counting
occurrences, listing every X, tracking a value through the text, trends and totals, the most
frequent item, overall sentiment, few-shot patterns, code over a whole module).

`generated` assembles a prompt from a family's instruction, a filler document of
documents.KINDS, a placement (instruction before, after, or on both sides of the document; a
neutral preamble or opener) and a chat wrapper (none, ChatML, Llama 3, Mistral, plain). Splits:

* `train`: the families' `train` grammars, documents of TRAIN_WORDS words;
* `dev`: the families' `dev` sentences, looked at while the grammars were written (so its
  accuracy flatters the head), documents of HELD_OUT_WORDS;
* `heldout`: HELD_OUT sentences, written once the grammars were final and not used to tune
  anything, documents of HELD_OUT_WORDS (shorter and longer than any in training).

Two more sets check the head on prompts of other sources: `harness` (the eval harness's own
generators, kvrecall.eval.tasks, labelled by HARNESS_LABELS; never trained on) and
`handwritten` (short prompts on other topics, written by hand for the earlier classifier).
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
            "[Tell me|Show me|I need|Give] the [exact |current |][value|setting|figure|number] "
            "[listed|written|given] for {key}.",
            "[How large|How big|How high] is {key}[?| in the config?]",
            "[Could you check|Check|Please check] what {key} is set to.",
        ),
        (
            "Which number does the text give for {key}?",
            "Report the exact figure listed for {key}.",
            "{key}: what's it configured as?",
            "I need the number configured for {key}.",
            "Quickly: {key} equals what?",
        ),
    ),
    "who": Family(
        LOCALIZATION,
        (
            "[Who|Which person|Which employee] [is|was|works as] the {role}[?| in the text?| according to the document?]",
            "[Name|Identify|Tell me] the [person|employee|colleague] who [moved|carried|delivered|handled] the {item}.",
            "Who [reported|filed|sent] the {metric} [figures|numbers|report][?| for the {service} team?]",
            "[According to the text|Based on the document|In the passage], who [moved|took] the {item} to {city}?",
            "[Who|Which person] [serves|acts|works] as [the |]{role}?",
            "[Whose|Which person's] [name|job] is [given|listed] as {role}?",
            "Tell me [the name of|who is] the {role}.",
            "By whom was the {item} [moved|delivered|handled]?",
        ),
        (
            "Whose job is it to look after the {item}?",
            "Identify the individual that serves as {role}.",
            "Tell me which colleague handled the {metric} report.",
            "Who was given the title of {role}?",
            "The {item} was moved by whom?",
        ),
    ),
    "when": Family(
        LOCALIZATION,
        (
            "[When|On what day|On which date|What day] did {name} [move|ship|deliver|take] the {item}?",
            "[When|On what date] was {key} [changed|set|updated]?",
            "[What date|When] did {name2} [report|submit|file] the {metric}[?| numbers?]",
            "On which day was the {item} [moved|sent] to {city}?",
            "[Tell me|Give me|State] the [day|date|time] [when|on which] {name} [moved|shipped] the {item}.",
            "What was the date [of|on] {name2}'s {metric} [report|entry]?",
        ),
        (
            "At what point in the week did the {item} arrive in {city}?",
            "Give the date on which {name2} filed the {metric} numbers.",
            "Tell me the weekday the {item} went to {city}.",
        ),
    ),
    "where": Family(
        LOCALIZATION,
        (
            "[Where|In which city|In what place] [is|was] the {item} [kept|stored|moved|now]?",
            "Where does {name} [work|live|keep the {item}]?",
            "[To which city|Where] did {name} [take|send|move] the {item}?",
            "[Name|Give|Tell me] the [city|place|location|town] [where|to which] {name} [took|sent|left] "
            "the {item}.",
            "What [place|city|location] [is|was] the {item} [sent|taken|moved] to?",
        ),
        (
            "What location does the text give for the {item}?",
            "Where did the {item} end up?",
            "The {item} was taken to which place?",
        ),
    ),
    "which": Family(
        LOCALIZATION,
        (
            "Which [service|team|server|component] [logged|raised|reported] the [first|last] [error|warning]?",
            "Which [item|object|thing] did {name} [move|carry|order]?",
            "Which function [takes|accepts|has] the [argument|parameter] {arg}?",
            "[Which|What] team did {name2} report for?",
            "[Pick out|Point out|Name] the [team|service|item] that {name2} [reported|filed] [for|about].",
            "[Of the services|Among the teams], which [one |][failed|reported] first?",
        ),
        (
            "What is the name of the service whose error is mentioned first?",
            "Say which object {name} carried to {city}.",
            "Of all the services, which single one raised an error first?",
            "Pick out the team that {name2} filed numbers for.",
        ),
    ),
    "quote": Family(
        LOCALIZATION,
        (
            "[Retrieve|Find|Locate|Return|Show] the [sentence|line|passage|entry] [that "
            "mentions|about|describing|containing] [the {item}|{name}|{key}][.| and copy it.| verbatim.]",
            "[Quote|Copy|Repeat] the [line|sentence] where {name} [is mentioned|appears].",
            "[Reproduce|Return|Paste|Give me] the [exact |][sentence|line|entry] [about|on|containing|that "
            "names] [{name}|{key}|the {item}].",
        ),
        (
            "Copy out, word for word, the part describing the {item}.",
            "Point me to the line about {key}.",
        ),
    ),
    "passkey": Family(
        LOCALIZATION,
        (
            "[A|One] [special|secret|hidden] [passkey|password|code|number] is hidden in the "
            "[text|document|notes]. [What is it?|Find it.|Give it to me.|Report it.]",
            "What is the [password|passkey|access code|secret token|PIN] [mentioned|hidden|given] in the [text|document]?",
            "[Find|Retrieve|Extract] the hidden [access code|passkey|number][ for {word}|].[ Answer with the number only.|]",
            "Somewhere in the [text|document|notes] there is a [secret|special] [number|code] for {word}. What is it?",
            "[Output|Return|Tell me|Reveal] the [hidden|secret|buried] [key|code|password|number][.| and "
            "nothing else.]",
            "[The text|This document|Somewhere here] [hides|contains|conceals] a [secret|hidden] "
            "[code|number|key]. [What is it?|Report it.|Give it.]",
        ),
        (
            "There is one magic number buried in the notes above; what is it?",
            "The document conceals a PIN. Tell me the PIN.",
            "Buried in this text is a numeric key. Output the key.",
            "What's the hidden password? Reply with just the password.",
        ),
    ),
    "check": Family(
        LOCALIZATION,
        (
            "[Does|Did] the [document|text|passage] [say|state|mention] that {name} is the {role}?[ Answer "
            "yes or no.| Yes or no.|]",
            "Is {key} set to {value}[?| in the config?][ Answer yes or no.|]",
            "[Was|Is] the {item} [moved|sent|delivered] on {day}?",
            "Did {name2} [report|submit] the {metric}?[ Yes or no.| Answer with yes or no.|]",
            "[Is it true|Is it correct|Can you confirm|Check whether|Verify] that {name} [is|works as] the "
            "{role}[?|.]",
            "[True or false|Yes or no]: {key} is {value}.",
        ),
        (
            "True or false: the text states that {name} took the {item} to {city}.",
            "Confirm whether {key} equals {value} in the document.",
            "Verify: was the {item} sent to {city}?",
        ),
    ),
    "amount": Family(
        LOCALIZATION,
        (
            "How much [does|did] the {item} cost[?| according to the record?| in the table?]",
            "How many [units|copies|boxes] of the {item} did {name} [order|buy|ship]?",
            "What [amount|number|figure] is [listed|recorded|given] for {name}[ in the table|]?",
            "How old is {name} according to the [record|entry|table]?",
            "What [did|does] the {item} [sell for|cost|go for]?",
            "[Give me|Tell me|What is] {name}'s [figure|amount|number] [from|in] the [table|record]?",
            "[What price|How much] [was|is] [listed|paid] for the {item}?",
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
            "[Which|What] [values|codes|numbers] [are attached to|belong to|are listed for] {key}?",
            "Give [the two|both of the|the three] codes [stored under|given for] {word}.",
        ),
        (
            "{name} has more than one badge number in the notes; which are they?",
            "Report each of the codes that belong to {word}.",
            "Which values are attached to {key}? There may be several.",
        ),
    ),
    "lookup_code": Family(
        LOCALIZATION,
        (
            "What is the default [value|setting] of [factor|the factor argument] in {func}?",
            "What does [the function |]{func} return?",
            "Which [argument|parameter] does {func} [take|accept]?",
            "[Where|On which line] is {func} defined?",
            "What is the [signature|first line|default argument] of {func}?",
            "[Which|What] value does {func} use for [factor|its factor] [by default|]?",
        ),
        (
            "In {func}, what is factor's default?",
            "Show me only the body of {func}.",
            "What's the signature of {func}?",
        ),
        ("code",),
    ),
    "lookup_example": Family(
        LOCALIZATION,
        (
            "What output [do|does] the [examples|example list] give for [the input |]{word}?",
            "[Which|Find the] example [has|with] the input {word}[? Give its output.| and give its output.]",
            "[Look at|Check] the examples: what [does|did] {word} [become|map to|turn into]?",
        ),
        (
            "In the examples above, what was {word} mapped to?",
        ),
        ("examples",),
    ),
    # ---- aggregation -----------------------------------------------------------------------
    "summary": Family(
        AGGREGATION,
        (
            "[Summarize|Summarise|Briefly summarize|Give a summary of|Write a summary of] the "
            "[text|document|passage|notes|article|conversation|thread][ above| below|][.| in two "
            "sentences.| in one paragraph.]",
            "[Write|Give|Provide] a [short|brief|concise|one-paragraph] [overview|summary|recap|synopsis] "
            "of the [whole |entire |full |][text|document|passage].",
            "Provide a TL;DR[ of these notes| of the document|].",
            "What is [this|the] [document|text|passage] about? [Summarize it.|Give a short summary.|Answer "
            "in a few sentences.]",
            "[Summarise|Recap] the main points[ of the document| of the discussion|].",
            "Give [me |][the gist|an outline|the main idea|a digest] of [this|the] "
            "[text|document|passage][.| in a few lines.]",
            "[Boil|Condense|Shorten|Reduce] [this|the] [document|text|passage] [down |][to|into] [its "
            "essentials|a few sentences|a short paragraph|bullet points].",
            "[Can you|Could you|Please] [summarize|recap|outline] [this|the whole|the entire] "
            "[text|document]?",
        ),
        (
            "Condense this document into three bullet points.",
            "What is this text about overall? Answer in two sentences.",
            "Sum up the key takeaways of the entire report.",
            "Can you boil this document down to its essentials?",
        ),
    ),
    "count": Family(
        AGGREGATION,
        (
            "How many times [is|was] [the {item}|{name}|{city}|the word {word}] mentioned[ in the text| in "
            "the document| in total|]?",
            "How many times does [the {item}|{name}|the word {word}] [appear|occur][ in the text| in total|]?",
            "Count [the number of|how many|all] [entries|lines|rows|sentences|emails] [that mention|about] "
            "[{name}|{city}|the {item}].",
            "How many [errors|warnings|entries|rows|reviews] [are there|appear|are listed] in [the log|the "
            "table|the document][?| altogether?]",
            "Count how often [the word |]{word} [occurs|appears|is used].",
            "What is the number of [distinct|different|unique] [names|cities|items] in the [text|document|list]?",
            "[Determine|Work out|Find out|Tell me] how [often|frequently|many times] {name} [shows "
            "up|appears|is named] [across|in] the [document|text].",
            "How many [entries|lines|records|rows] [mention|refer to|include] [{city}|{name}|the {item}][ "
            "altogether| in total| in all|]?",
            "[Tally|Count] [up |][the |][occurrences|mentions|appearances] of [{name}|the {item}|{word}].",
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
            "List [all|every one of] the [names|people|items|dates|cities|services|errors] [that "
            "appear|mentioned|that occur] in the [document|text|notes|log].",
            "[Enumerate|Name|Extract] [all|every|each] [person|item|date|city] [mentioned|in the text|that "
            "is mentioned][.|, without duplicates.]",
            "Find all the [services|people|rows] that [logged a warning|mention {city}|ordered the {item}].",
            "Make a list of [every|all] [item|name|date] in the [text|document].",
            "[Write down|Collect|Gather|Return] [each|every|all the] [name|date|city|item][s|] [you can "
            "find|mentioned|that appear] in the [text|document|notes][.| as a list.]",
            "Who [are all the people|are the people] [mentioned|named|referred to] [anywhere |][in the "
            "text|in the notes]?",
        ),
        (
            "Give me every person referred to anywhere in the notes.",
            "Extract each distinct city the text mentions.",
            "Which people appear in the document? Include all of them.",
            "Collect all dates mentioned and return them as a list.",
        ),
    ),
    "track": Family(
        AGGREGATION,
        (
            "Track [how|every change in|the value of] {key} [changes |][throughout|across|over] the [document|text|log].",
            "Describe how {name}'s [situation|role|work] [evolves|changes|develops] [over the course "
            "of|throughout|across] the [text|document].",
            "Put [all |][the |]events in chronological order.",
            "Follow [every|each] change to the {item} from beginning to end.",
            "[Keep track of|Track] [each|every] [update|change|move] of the {item} [through the text|across "
            "the document].",
            "How does {key} change from [the first mention to the last|start to end|beginning to end]?",
            "[Walk through|Describe|Trace] the [history|sequence of changes|story] of [the {item}|{key}] "
            "[across|through] the [whole|entire] [log|document|text].",
            "[Build|Make|Draw up] a [timeline|chronology|history] of [the events|everything that "
            "happens|all changes].",
        ),
        (
            "Trace each update to {key} from start to finish.",
            "Build a timeline of everything that happened.",
        ),
    ),
    "trend": Family(
        AGGREGATION,
        (
            "What is the [overall|general|long-term] trend [of|in] the [numbers|values|amounts|{metric}][ "
            "in the table| across the report|]?",
            "[Compute|Calculate|What is] the [average|median|total|sum of the] [amount|{metric}|value] "
            "[across|over|of] all [rows|entries|records|lines].",
            "How did the {metric} [develop|change|move] over the [whole|entire] [period|year|report]?",
            "What is the total {metric} [over|across|for] all the [entries|rows|days]?",
            "[Overall|In general|Across the report], [are|do] the [amounts|numbers|values] [increasing or "
            "decreasing|go up or down|rise or fall]?",
            "What's the [grand total|sum|overall total|mean|average] of [all |every one of |][the "
            "amounts|the values|the numbers]?",
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
            "Which [word|name|item|city] [occurs|appears|is mentioned] most [often|frequently][ in the "
            "list| in the document|]?",
            "What are the [three|five|top three|top ten] most [common|frequent] [words|items|names][ in the text|]?",
            "Find the most [frequent|common] [word|item|name|service] in the [text|list|log].",
            "Which [item|word|name] [turns up|shows up|comes up|is repeated] the most [times|often]?",
            "[Tell me|List|Give] the [five|three|ten] [words|names|items] that [occur|appear|repeat] most[ "
            "often|].",
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
            "What are the [main|key|recurring|common] [themes|topics|issues] [across|in] [all of the|the] "
            "[emails|reviews|notes|document]?",
            "Describe the [general|overall] [mood|attitude|tone] of the [whole |entire |][text|discussion].",
            "What do the [people|speakers|reviewers] [agree on|complain about|like] [overall|in general|most]?",
            "What's the [prevailing|dominant|general] [attitude|feeling|opinion] of the "
            "[reviewers|writers|customers]?",
            "[Overall|On the whole|In general], are [people|the customers|the writers] [happy or "
            "unhappy|satisfied or not|positive or negative]?",
            "How do [the customers|the reviewers|people] feel [overall|in general|on the whole]?",
        ),
        (
            "Characterize the tone of the conversation as a whole.",
            "Overall, are people happy or unhappy in these emails?",
        ),
    ),
    "compare": Family(
        AGGREGATION,
        (
            "Compare the [first half|beginning|first part] of the [document|text] with the [second half|end|last part].",
            "What do [all of the|all the|the] [entries|emails|records|reviews] have in common?",
            "Group the [records|rows|entries] by [city|item|name|service] and [describe|summarize|count] each group.",
            "How do the [different|various] [speakers|reviewers|sections] [differ|compare]?",
            "How is the [start|beginning|first part] of the [text|document] different from the "
            "[ending|end|rest]?",
            "[Sort|Split|Divide] the [records|rows|entries] into groups by [city|item|name] and "
            "[describe|summarize] the groups.",
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
            "Rewrite [all of this|the whole thing|everything above] as [a bulleted list|a table|a short "
            "story].",
            "Make the [entire|whole] [text|document] sound [more friendly|more formal|less technical].",
            "[Paraphrase|Restate] [everything|the whole text|the document] [for a child|in simpler words|in "
            "your own words].",
        ),
        (
            "Convert the full document into a formal letter.",
            "Paraphrase everything above for a ten-year-old.",
        ),
    ),
    "fewshot": Family(
        AGGREGATION,
        (
            "Follow the [pattern|format|rule] of the examples and [give|write|produce] the output for the "
            "[last|final|new] input.",
            "Continue [with|using] the same [rule|pattern|mapping] as the examples.",
            "[Learn|Work out|Figure out] the [mapping|rule|transformation] from the examples and apply it "
            "to the [final|last] input.",
            "Using the examples as a [guide|model|template], [produce|write|give] the [missing|next|last] "
            "output.",
            "[Infer|Deduce|Find] the [rule|pattern] [behind|from|in] the examples and [apply|use] it "
            "[on|for] the [new|last|final] [case|input|item].",
        ),
        (
            "Infer the rule from the examples and apply it to the new case.",
        ),
        ("examples",),
    ),
    "code": Family(
        AGGREGATION,
        (
            "[Complete|Finish|Implement] the [last|final|unfinished] function [of|in] this [module|file|script].",
            "[Explain|Describe] what [this|the] [program|module|code|script] does [as a whole|overall|in general].",
            "Write a docstring for the [module|file|code] that describes [all of its|each of its|every one "
            "of its] functions.",
            "Refactor the [code|module|file] to remove [the duplication|repetition] [between|across] the functions.",
            "[Add|Write] [type hints|unit tests|comments] for [all|every one] of the functions[ in this module|].",
            "[Add|Write] [error handling|logging|docstrings|tests] [to|for] every function in this "
            "[file|module].",
            "What is the [purpose|overall goal|job] of this [module|file|program][ overall| as a whole|]?",
            "[Finish|Complete] the [code|script|program] below so that it [runs|works|passes its tests].",
            "Review the [whole |entire |][file|module|code] and [list|describe] its "
            "[problems|bugs|weaknesses].",
        ),
        ("Rename the variables across the whole module so they read better.",),
        ("code",),
    ),
}

HELD_OUT: dict[str, tuple[str, ...]] = {
    # The final test's wordings: written after the training grammars were final, and used only
    # through the reported accuracy (nothing was tuned on them). No training grammar expands to
    # any of them (tests/test_tasktype.py checks).
    "value": (
        "Hey, do you know what number {key} was given in this file?",
        "Look through the settings and tell me {key}'s number, nothing else.",
        "I'm debugging: which setting did they pick for {key}?",
    ),
    "who": (
        "Somebody is named as the {role} in here. Who?",
        "I forgot who took the {item} to {city}; can you remind me?",
        "Which colleague carries the title {role}?",
    ),
    "when": (
        "Remind me which day of the week the {item} left for {city}.",
        "By what date had {name2} sent in the {metric} figures?",
        "When exactly does the text say {name} moved the {item}?",
    ),
    "where": (
        "Where on earth did the {item} go?",
        "What's the destination city of the {item}?",
        "{name} left with the {item}. Where to?",
    ),
    "which": (
        "I want to know which one of the services threw the earliest error.",
        "Out of everything {name} handled, which object went to {city}?",
        "Tell me the team {name2} is reporting for.",
    ),
    "quote": (
        "Cite the sentence in which {name} appears, word for word.",
        "Give me the original wording of the entry on {key}.",
        "Which sentence talks about the {item}? Please copy it exactly.",
    ),
    "passkey": (
        "I hid a number somewhere in this text. Can you spot it?",
        "What's the secret combination mentioned somewhere in the notes?",
        "Dig out the concealed passcode and print it.",
    ),
    "check": (
        "Am I right that {name} is the {role} here?",
        "Quick check: does {key} have the value {value}?",
        "Was it {name2} who reported the {metric}, yes or no?",
    ),
    "amount": (
        "What's the cost of the {item} on record?",
        "Read off the quantity next to {name}.",
        "How much was charged for the {item}?",
    ),
    "multivalue": (
        "{word} has several codes in the text. Give me those codes.",
        "Some setting appears with more than one value for {key}; what are the values?",
        "Tell me the two cities named for the {item}.",
    ),
    "lookup_code": (
        "What default does {func} give to factor?",
        "Print just the definition of {func}.",
        "What argument name does {func} expect?",
    ),
    "lookup_example": (
        "According to the examples, what is the output when the input is {word}?",
        "Find {word} among the examples and tell me its output.",
    ),
    "summary": (
        "Can you give me the short version of all this?",
        "I don't have time to read this. What does it say, in a nutshell?",
        "Please write an abstract for the document.",
    ),
    "count": (
        "How often is {city} brought up, all told?",
        "Tell me the number of log lines at WARN level.",
        "Go through the text and count every reference to {name}.",
    ),
    "list_all": (
        "Name everybody who appears in these notes.",
        "Produce a complete list of the items in the document.",
        "Pull out all of the dates and show them one per line.",
    ),
    "track": (
        "Describe every change {key} goes through, in order.",
        "How did things develop for {name} from the beginning of the text to the end?",
        "Lay out the sequence of events as they happen in the log.",
    ),
    "trend": (
        "Do the figures go up or down over time?",
        "Give the mean of the amounts in the table.",
        "What is the overall direction of {metric} in these records?",
    ),
    "frequent": (
        "Which word shows up more than all the others?",
        "What name comes up most often here?",
        "Give the three items mentioned the largest number of times.",
    ),
    "sentiment": (
        "Are the reviews mostly positive or mostly negative?",
        "How would you describe the mood across these messages?",
        "What worries come up again and again in the emails?",
    ),
    "compare": (
        "Point out the differences between the early entries and the later ones.",
        "What themes do the speakers share, and where do they disagree?",
        "Split the rows by city and explain what separates the groups.",
    ),
    "rewrite": (
        "Turn the whole passage into a poem.",
        "Please simplify all of the text above so a beginner understands it.",
        "Translate everything into Italian.",
    ),
    "fewshot": (
        "Here are some input/output pairs. What should the output be for the last one?",
        "Apply the same transformation shown in the examples to the final input.",
    ),
    "code": (
        "What does this entire script accomplish?",
        "Write unit tests covering all the functions in this file.",
        "Fix the bugs in this module.",
    ),
}

PREAMBLES = (
    "", "", "Read the following text.", "Here is a document.", "Below is some context.", "Context:",
    "Use the document below to complete the task.", "Please read carefully.",
)  # fmt: skip
SUFFIXES = ("", "", "", "Be concise.", "Answer briefly.", "Think step by step.", "Only use the document.")
SYSTEMS = ("You are a helpful assistant.", "You are a careful analyst.", "Answer truthfully.")
PRIMERS = ("", "", "", "Answer:", "Sure.", "Here is my answer:")
OPENERS = ("Quick question:", "Hi!", "Hello,", "One more thing:", "Here is my request:", "I need your help.")


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
    if rng.random() < 0.2:
        ask = f"{rng.choice(OPENERS)} {ask}"
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
tracing, apart from its aggregation tasks), which favours the needle-friendly window score. A
CPU run did not separate the modes on it (windowkv answers as full KV in either, at 2,000
tokens and budget 128: bench/results/2026-11-30-cpu-windowkv-vt-task-mode.json)."""


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
