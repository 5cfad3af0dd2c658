"""Checking a sentence against the knowledge base before a customer can see it.

A sentence is supported when one passage holds it: every number, e-mail address and link
in it occurs in that passage, nearly all of its content words do (`SUPPORT_MIN`), and it
says yes or no the same way as the passage sentence closest to it (a "not", "no", "never",
"n't" or "without" on one side only is a flipped claim: "you don't need permission" above a
passage saying that you do). A bare "Yes." or "No." is a claim with nothing behind it.
The fixed frames of `core.knowledge.answers` carry no facts and always pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.knowledge.retrieval import content_words
from core.knowledge.sentences import split_sentences

SUPPORT_MIN = 0.8  # share of a sentence's content words that its passage must hold

_FACT = re.compile(
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|https?://\S+|www\.\S+|\d+(?:[.,:/-]\d+)*",
    re.IGNORECASE,
)
_NEGATION = re.compile(
    r"\b(?:not|no|never|none|nothing|nobody|neither|nor|without|cannot|unable)\b|n't\b",
    re.IGNORECASE,
)
# "Yes," / "No." opening a sentence (not "No order ships…").
_YES_NO = re.compile(
    r"^\W*(?:yes|yeah|yep|no|nope|sure|absolutely|of course)\s*(?:[,.!:;-]+\s*|$)", re.I
)


def facts_in(text: str) -> list[str]:
    return [m.group(0).rstrip(".,:/-").lower() for m in _FACT.finditer(text)]


def invented_facts(text: str, sources: Sequence[str]) -> list[str]:
    """The facts (numbers, e-mails, links) in `text` that appear in none of `sources`."""
    haystack = re.sub(r"\s+", " ", " ".join(sources)).lower()
    # A number must occur as a whole number: "9.95" is not in "$19.95".
    return [
        fact
        for fact in facts_in(text)
        if fact and not re.search(rf"(?<![\w.]){re.escape(fact)}(?!\d|[.,]\d)", haystack)
    ]


def negated(text: str) -> bool:
    """Whether `text` says no: an odd number of negations ("not without" is a yes)."""
    return len(_NEGATION.findall(text.replace("’", "'"))) % 2 == 1


@dataclass(frozen=True)
class Verdict:
    supported: bool
    reason: str = ""  # why not, for the operator's log


class Verifier:
    """Checks sentences against a set of passages (the ones an answer was built from)."""

    def __init__(self, passages: Iterable[str], frames: Iterable[str] = ()) -> None:
        self.passages = [p for p in passages if p.strip()]
        self.frames = {
            " ".join(sentence.split()).lower() for f in frames for sentence in split_sentences(f)
        }
        self._flat = [" ".join(p.split()).lower() for p in self.passages]
        self._words = [content_words(p) for p in self.passages]
        self._sentences = [
            [(s, content_words(s)) for s in split_sentences(p)] for p in self.passages
        ]

    def check(self, sentence: str) -> Verdict:
        text = " ".join(sentence.split())
        if text.lower() in self.frames:
            return Verdict(True)
        if any(text.lower() in passage for passage in self._flat):
            return Verdict(True)  # quoted verbatim
        claim = _YES_NO.sub("", text)
        words = content_words(claim)
        if not words:
            if _YES_NO.match(text):
                return Verdict(False, f"a bare yes/no: {text!r}")
            return Verdict(False, f"no content to check: {text!r}")
        best, best_cover = -1, 0.0
        for i, passage_words in enumerate(self._words):
            cover = len(words & passage_words) / len(words)
            if cover > best_cover:
                best, best_cover = i, cover
        if best < 0 or best_cover < SUPPORT_MIN:
            return Verdict(
                False, f"only {best_cover:.0%} of its words are in one passage: {text!r}"
            )
        passage = self.passages[best]
        invented = invented_facts(text, [passage])
        if invented:
            return Verdict(False, f"facts not in the passage ({', '.join(invented)}): {text!r}")
        source, _ = max(self._sentences[best], key=lambda pair: len(words & pair[1]))
        source_claim = _YES_NO.sub("", source)
        if negated(claim) != negated(source_claim):
            return Verdict(False, f"says the opposite of {source!r}: {text!r}")
        if _YES_NO.match(text):
            # "No, …" must agree with the passage: its own "No, …" or a negated claim.
            expected = _says_no(source) if _YES_NO.match(source) else negated(source_claim)
            if _says_no(text) != expected:
                return Verdict(False, f"answers yes/no unlike {source!r}: {text!r}")
        return Verdict(True)

    def supported_sentences(self, text: str) -> tuple[list[str], list[str]]:
        """The sentences of `text` that pass, and the reasons for those that do not."""
        kept, dropped = [], []
        for sentence in split_sentences(text):
            verdict = self.check(sentence)
            if verdict.supported:
                kept.append(sentence)
            else:
                dropped.append(verdict.reason)
        return kept, dropped


def _says_no(text: str) -> bool:
    opener = _YES_NO.match(text)
    return opener is not None and opener.group(0).strip(" ,.!").lower() in ("no", "nope")
