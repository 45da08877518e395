"""The toy world's prompt grammar and its parser.

Every segment prompt says on its own what should be visible at the end of its segment, with subject
and setting restated (as LongLive / MemFlow switch prompts do); at most one event per segment:

    static   "a red circle and a blue square on a grey background"    | "an empty grey background"
    leave    "the red circle leaves, a blue square remains on a grey background"
             | "the red circle leaves the grey background empty"
    return   "the red circle comes back to the blue square on the grey background"
             | "the red circle comes back to the empty grey background"
    enter    "a green triangle joins the red circle and the blue square on the grey background"
             | "a green triangle appears on the empty grey background"

Lists read "A", "A and B", "A, B and C". No prompt mentions the hidden attribute (size). ``parse``
inverts ``describe`` exactly and rejects anything else with the offending text in the message.
Prompts stay under MAX_PROMPT_BYTES; toyworld/text.py's word-level tokenizer gives at most 18 tokens, within the
tiny preset's text_len of 32 (a test checks every training prompt fits).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from toyworld.palette import BACKGROUNDS, COLOURS, SHAPES

MAX_PROMPT_BYTES = 120
Kind = tuple[str, str]  # (colour, shape)
# every word and mark the grammar writes (toyworld/text.py's tokenizer has one id for each; a test checks that
# describe never writes another)
VOCABULARY: tuple[str, ...] = (
    "a", "an", "the", "and", ",", "on", "background", "empty", "leaves", "remains", "remain", "comes", "back", "to",
    "joins", "appears", *COLOURS, *SHAPES, *BACKGROUNDS)

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_BG = "|".join(BACKGROUNDS)
_ENTITY = re.compile(rf"(a|the) ({_COLOUR}) ({_SHAPE})")
_FORMS = (  # (event, subject article, regex with groups subject?, list?, bg); static forms last
    ("leave", "the", re.compile(rf"(?P<subject>.+?) leaves, (?P<list>.+) remains? on a (?P<bg>{_BG}) background")),
    ("leave", "the", re.compile(rf"(?P<subject>.+?) leaves the (?P<bg>{_BG}) background empty")),
    ("return", "the", re.compile(rf"(?P<subject>.+?) comes back to (?P<list>.+) on the (?P<bg>{_BG}) background")),
    ("return", "the", re.compile(rf"(?P<subject>.+?) comes back to the empty (?P<bg>{_BG}) background")),
    ("enter", "a", re.compile(rf"(?P<subject>.+?) joins (?P<list>.+) on the (?P<bg>{_BG}) background")),
    ("enter", "a", re.compile(rf"(?P<subject>.+?) appears on the empty (?P<bg>{_BG}) background")),
    (None, None, re.compile(rf"(?P<list>.+) on a (?P<bg>{_BG}) background")),
    (None, None, re.compile(rf"an empty (?P<bg>{_BG}) background")),
)


@dataclass(frozen=True)
class SceneText:
    """What a prompt says: the background, what is visible at the end of its segment, what has gone."""

    background: str
    present: tuple[Kind, ...]  # visible at the end of the segment (the event's subject last when it arrives)
    absent: tuple[Kind, ...]  # said to have left
    event: str | None = None  # 'leave', 'return', 'enter' or None
    subject: Kind | None = None  # the entity of the event


def _phrase(article: str, kind: Kind) -> str:
    return f"{article} {kind[0]} {kind[1]}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(background: str, others: Sequence[Kind], event: str | None = None, subject: Kind | None = None) -> str:
    """The prompt of a segment. others: the entities visible besides the event's subject (all of them
    for a static segment; the remaining ones for a leave)."""
    others = list(others)
    if (event is None) != (subject is None):
        raise ValueError(f"describe: event {event!r} and subject {subject!r} go together")
    if event is None:
        text = f"{_join([_phrase('a', k) for k in others])} on a {background} background" if others \
            else f"an empty {background} background"
    elif event == "leave":
        verb = "remains" if len(others) == 1 else "remain"
        text = (f"the {subject[0]} {subject[1]} leaves, {_join([_phrase('a', k) for k in others])} {verb} "
                f"on a {background} background") if others else \
            f"the {subject[0]} {subject[1]} leaves the {background} background empty"
    elif event == "return":
        text = (f"the {subject[0]} {subject[1]} comes back to {_join([_phrase('the', k) for k in others])} "
                f"on the {background} background") if others else \
            f"the {subject[0]} {subject[1]} comes back to the empty {background} background"
    elif event == "enter":
        text = (f"a {subject[0]} {subject[1]} joins {_join([_phrase('the', k) for k in others])} "
                f"on the {background} background") if others else \
            f"a {subject[0]} {subject[1]} appears on the empty {background} background"
    else:
        raise ValueError(f"describe: unknown event {event!r}")
    if len(text.encode()) > MAX_PROMPT_BYTES:
        raise ValueError(f"describe: prompt {text!r} is {len(text.encode())} bytes, over {MAX_PROMPT_BYTES}")
    return text


def _entity(text: str, article: str, prompt: str) -> Kind:
    m = _ENTITY.fullmatch(text)
    if m is None or m.group(1) != article:
        raise ValueError(f"prompt {prompt!r}: {text!r} is not '{article} <colour> <shape>' "
                         f"(colours {list(COLOURS)}, shapes {list(SHAPES)})")
    return m.group(2), m.group(3)


def _entity_list(text: str, article: str, prompt: str) -> tuple[Kind, ...]:
    items = re.split(r", | and ", text)
    kinds = tuple(_entity(item, article, prompt) for item in items)
    if _join(items) != text:
        raise ValueError(f"prompt {prompt!r}: the list {text!r} must read 'A', 'A and B' or 'A, B and C'")
    return kinds


def _parse_form(text: str, event: str | None, article: str | None, m: re.Match, prompt: str) -> SceneText:
    groups = m.groupdict()
    list_article = "a" if event in (None, "leave") else "the"
    others = _entity_list(groups["list"], list_article, prompt) if groups.get("list") else ()
    subject = _entity(groups["subject"], article, prompt) if event else None
    if event == "leave":
        present, absent = others, (subject,)
    elif event in ("return", "enter"):
        present, absent = (*others, subject), ()
    else:
        present, absent = others, ()
    if len({k[0] for k in (*present, *absent)}) != len(present) + len(absent):
        raise ValueError(f"prompt {prompt!r}: every entity of a video has its own colour")
    if describe(groups["bg"], others, event, subject) != text:
        raise ValueError(f"prompt {prompt!r} is not in the toy world's grammar (verb or article wrong)")
    return SceneText(background=groups["bg"], present=present, absent=absent, event=event, subject=subject)


def parse(prompt: str) -> SceneText:
    """The scene a prompt describes; ValueError (naming the prompt) for text outside the grammar."""
    text = prompt.strip()
    first_error = None
    for event, article, form in _FORMS:  # event forms first: a static list would swallow their verbs
        m = form.fullmatch(text)
        if m is None:
            continue
        try:
            return _parse_form(text, event, article, m, prompt)
        except ValueError as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    raise ValueError(f"prompt {prompt!r} is not in the toy world's grammar (see toyworld/language.py)")
