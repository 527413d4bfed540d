"""The demo document: ~1k tokens of varied filler with one hidden fact, and its question."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_SUBJECTS = [
    "The harbour",
    "The old mill",
    "The library",
    "The market square",
    "The lighthouse",
    "The orchard",
    "The railway station",
    "The town hall",
    "The bakery",
    "The river path",
    "The museum",
    "The school",
]
_VERBS = [
    "was rebuilt",
    "was painted",
    "was visited by travellers",
    "was quiet",
    "was crowded",
    "was cleaned",
    "was closed for repairs",
    "was decorated with lanterns",
    "hosted a small fair",
]
_WHENS = [
    "in early spring",
    "after the long winter",
    "during the harvest",
    "on a rainy Tuesday",
    "before the festival",
    "at the end of summer",
    "late in the evening",
    "on market day",
]
_DETAILS = [
    "Children played nearby.",
    "A cold wind came from the hills.",
    "Nobody remembered why.",
    "The mayor gave a short speech.",
    "Fishermen sold their catch.",
    "The bells rang twice.",
    "Tea was served in the afternoon.",
    "Old photographs were put on display.",
]


@dataclass(frozen=True)
class DemoCase:
    context: str
    question: str
    answer: str


def demo_case(sentences: int = 62, depth: float = 0.4, seed: int = 7) -> DemoCase:
    """A document of ``sentences`` filler sentences with the fact at relative ``depth``."""
    rng = random.Random(seed)
    code = str(rng.randint(1000, 9999))
    lines = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_WHENS)}. {rng.choice(_DETAILS)}"
        for _ in range(sentences)
    ]
    lines.insert(int(depth * sentences), f"Remember this: the access code for the north gate is {code}.")
    return DemoCase(
        context="Notes from the town archive.\n" + " ".join(lines),
        question="What is the access code for the north gate? Answer with the number only.",
        answer=code,
    )


def contains_answer(answer: str, expected: str) -> bool:
    """True when ``expected`` appears in ``answer`` as a whole word/number ("6305" is not in "63055")."""
    return re.search(rf"(?<!\w){re.escape(expected)}(?!\w)", answer) is not None
