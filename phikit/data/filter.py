"""Cheap quality heuristics: pure scorers `str -> float`, and rules that compose them into a list.

A `Rule` names a scorer and the range it must fall in; `first_failure(text, rules)` returns the name
of the first rule a text breaks (the reason it is removed), or None. `default_rules(...)` builds the
list the `phikit data filter` command uses; a recipe may list its own.

The scorers and default thresholds follow Gopher's quality filters (Rae et al. 2021, appendix A:
word count 50..100,000, mean word length 3..10, symbol-to-word ratio <= 0.1, >= 80% of words with a
letter, duplicate-line and top n-gram fractions) and C4's line rules, loosened a little for short
documents. The "language" rule is a stop-word test (Gopher keeps documents with at least two
English stop words; we ask for a fraction), so it only knows English: set its minimum to 0 for other
languages or for code.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

_WORD = re.compile(r"\w+", re.UNICODE)
_TOKEN = re.compile(r"\S+")
# Frequent English function words; English prose has 35-50% of its words in a list like this.
STOPWORDS = frozenset("""
a about after all also an and any are as at be because been but by can could do does for from had
has have he her his how i if in into is it its may more most no not of on one or other our out she
so some such than that the their them then there these they this those to under up was we were what
when where which while who will with would you your
""".split())
BOILERPLATE = ("lorem ipsum", "javascript", "cookie", "terms of use", "privacy policy", "all rights reserved",
               "click here", "subscribe", "sign up", "log in")


def words(text: str) -> list[str]:
    return _TOKEN.findall(text)


def n_words(text: str) -> float:
    return len(words(text))


def mean_word_length(text: str) -> float:
    w = words(text)
    return sum(map(len, w)) / len(w) if w else 0.0


def symbol_ratio(text: str) -> float:
    """'#' and ellipses ('...', '…') per word (Gopher)."""
    w = words(text)
    return (text.count("#") + text.count("...") + text.count("…")) / len(w) if w else 1.0


def alpha_word_fraction(text: str) -> float:
    """Fraction of words with at least one letter (Gopher wants >= 0.8)."""
    w = words(text)
    return sum(any(c.isalpha() for c in t) for t in w) / len(w) if w else 0.0


def non_alnum_char_fraction(text: str) -> float:
    """Fraction of non-space characters that are neither letters nor digits (spam, tables of symbols)."""
    chars = [c for c in text if not c.isspace()]
    return sum(not c.isalnum() for c in chars) / len(chars) if chars else 1.0


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line (Gopher: <= 0.3)."""
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def top_ngram_fraction(text: str, n: int = 2) -> float:
    """Fraction of word characters covered by the most frequent word n-gram (Gopher: 2-grams <= 0.2)."""
    w = [t.lower() for t in _WORD.findall(text)]
    if len(w) < n + 1:
        return 0.0
    grams = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count == 1:
        return 0.0
    return count * sum(map(len, gram)) / sum(map(len, w))


def duplicate_ngram_fraction(text: str, n: int = 5) -> float:
    """Fraction of word characters inside word n-grams that occur more than once (Gopher: 5-grams <= 0.15)."""
    w = [t.lower() for t in _WORD.findall(text)]
    if len(w) < n:
        return 0.0
    grams = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    covered = [False] * len(w)
    for i in range(len(w) - n + 1):
        if grams[tuple(w[i:i + n])] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(t) for t, c in zip(w, covered) if c) / sum(map(len, w))


def stopword_fraction(text: str) -> float:
    """Fraction of words that are common English function words: a cheap English-language test."""
    w = [t.lower() for t in _WORD.findall(text)]
    return sum(t in STOPWORDS for t in w) / len(w) if w else 0.0


def boilerplate_line_fraction(text: str) -> float:
    """Fraction of non-empty lines with a boilerplate phrase (C4: cookie, javascript, lorem ipsum, ...)."""
    lines = [ln.lower() for ln in text.split("\n") if ln.strip()]
    return sum(any(p in ln for p in BOILERPLATE) for ln in lines) / len(lines) if lines else 0.0


@dataclass(frozen=True)
class Rule:
    """`score(text)` must lie in [min, max] (either bound may be None)."""

    name: str
    score: Callable[[str], float]
    min: float | None = None
    max: float | None = None

    def __call__(self, text: str) -> bool:
        s = self.score(text)
        return (self.min is None or s >= self.min) and (self.max is None or s <= self.max)


def default_rules(min_words: int = 50, max_words: int = 100_000, max_symbol_ratio: float = 0.1,
                  min_alpha_words: float = 0.8, max_non_alnum: float = 0.25, max_duplicate_lines: float = 0.3,
                  max_top_2gram: float = 0.2, max_duplicate_5grams: float = 0.15, min_stopwords: float = 0.15,
                  max_boilerplate_lines: float = 0.3) -> list[Rule]:
    """The heuristic rules with Gopher-like thresholds; a threshold of None turns its rule off."""
    rules = [
        Rule("too-short", n_words, min=min_words), Rule("too-long", n_words, max=max_words),
        Rule("word-length", mean_word_length, min=3, max=10),
        Rule("symbols", symbol_ratio, max=max_symbol_ratio),
        Rule("non-alphabetic", alpha_word_fraction, min=min_alpha_words),
        Rule("non-alphanumeric", non_alnum_char_fraction, max=max_non_alnum),
        Rule("repeated-lines", duplicate_line_fraction, max=max_duplicate_lines),
        Rule("repeated-2grams", top_ngram_fraction, max=max_top_2gram),
        Rule("repeated-5grams", duplicate_ngram_fraction, max=max_duplicate_5grams),
        Rule("language", stopword_fraction, min=min_stopwords),
        Rule("boilerplate", boilerplate_line_fraction, max=max_boilerplate_lines),
    ]
    return [r for r in rules if not (r.min is None and r.max is None)]


def first_failure(text: str, rules: list[Rule]) -> str | None:
    """Name of the first rule text breaks, or None when it passes them all."""
    return next((r.name for r in rules if not r(text)), None)


def filter_documents(inputs: list, out, rules: list[Rule], min_quality: float | None = None,
                     overwrite: bool = False, every: int = 1000):
    """The filter stage: keep documents that pass every rule and, when min_quality is set, whose
    "quality" field (written by `phikit data score`) is at least min_quality. Returns the finished Stage."""
    from pathlib import Path

    from .docs import DataError, Stage, count_documents, iter_documents, progress

    total = count_documents(inputs)
    if total == 0:
        raise DataError(f"{', '.join(map(str, inputs))}: no documents to filter")
    settings = {"inputs": [str(Path(i).resolve()) for i in inputs], "min_quality": min_quality,
                "rules": [[r.name, r.min, r.max] for r in rules]}
    stage = Stage(out, "filter", settings, every=every, overwrite=overwrite)
    if stage.done:
        return stage
    with stage:
        for i, doc in enumerate(progress(iter_documents(inputs), total=total, desc="filter")):
            if i < stage.skip:
                continue
            if min_quality is not None and "quality" not in doc:
                raise DataError(f"document {doc.get('id')} has no 'quality' field: run `phikit data score` first, "
                                "or leave out --min-quality")
            reason = first_failure(doc["text"], rules)
            if reason is None and min_quality is not None and doc["quality"] < min_quality:
                reason = "low-quality"
            if reason:
                stage.drop(doc, reason)
            else:
                stage.keep(doc)
            stage.step()
    stage.finish()
    return stage
