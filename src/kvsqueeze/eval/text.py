"""Offline text sources for the tasks: RULER's noise filler, English prose, and word lists.

Nothing here downloads anything.

- ``NOISE``: the repeated filler of the RULER paper (Hsieh et al., 2024, arXiv:2404.06654).
- ``prose_paragraphs()``: natural English prose shipped with CPython itself — the paragraphs of
  the Python Language Reference that ``pydoc`` serves (``pydoc_data.topics``), with code blocks,
  headings and lists removed. It stands in for RULER's Paul Graham essays (haystack) and is the
  held text of the fidelity metric. It changes slightly between Python versions; results record
  the version.
- ``common_words()``: English nouns, adjectives and verbs from the ``wonderwords`` package (the
  word source RULER uses for needle keys and common-words extraction), profanity removed.
"""

from __future__ import annotations

import functools
import re
import sys
from importlib import resources

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PROSE_SOURCE = f"Python {sys.version_info.major}.{sys.version_info.minor} reference (pydoc_data.topics)"

_HEADING = re.compile(r"^[*=\-~^\"]{3,}$")


@functools.cache
def prose_paragraphs() -> tuple[str, ...]:
    """Paragraphs of plain English prose (each one line, >= 200 characters), in a fixed order."""
    from pydoc_data.topics import topics

    return tuple(paragraph for name in sorted(topics) for paragraph in plain_paragraphs(topics[name]))


def plain_paragraphs(document: str) -> list[str]:
    """The paragraphs of ``document`` that are plain prose, each joined into one line: at least 200
    characters, a capital first and a sentence's end last; indented blocks (code, lists, tables,
    notes), headings and doctests are left out."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", document):
        lines = block.split("\n")
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        if any(_HEADING.match(line.strip()) for line in lines) or ">>>" in block:
            continue
        text = " ".join(line.strip() for line in lines)
        if len(text) >= 200 and text[-1] in ".!?" and text[0].isupper():
            paragraphs.append(text)
    return paragraphs


@functools.cache
def prose_words() -> tuple[str, ...]:
    """The words of ``prose_paragraphs()`` in order (a haystack that can be cut anywhere)."""
    return tuple(word for paragraph in prose_paragraphs() for word in paragraph.split())


def noise_sentences() -> tuple[str, ...]:
    """The five sentences of ``NOISE``."""
    return tuple(s if s.endswith(".") else s + "." for s in NOISE.split(". "))


def _wonderwords_list(name: str) -> list[str]:
    text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    return [w.strip().lower() for w in text.splitlines() if w.strip()]


@functools.cache
def _lists() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    banned = set(_wonderwords_list("profanitylist.txt"))

    def clean(name: str) -> tuple[str, ...]:
        words = {w for w in _wonderwords_list(name) if w.isalpha() and w.isascii() and 3 <= len(w) <= 10}
        return tuple(sorted(words - banned))

    return clean("nounlist.txt"), clean("adjectivelist.txt"), clean("verblist.txt")


def nouns() -> tuple[str, ...]:
    return _lists()[0]


def adjectives() -> tuple[str, ...]:
    return _lists()[1]


@functools.cache
def common_words() -> tuple[str, ...]:
    """Nouns, adjectives and verbs, deduplicated and sorted."""
    noun, adjective, verb = _lists()
    return tuple(sorted(set(noun) | set(adjective) | set(verb)))
