"""Which self-generated queries to keep: no empty, unfinished, too short, too long or degenerate ones, no duplicates.

A query written by the model itself (`delia.generation.magpie`) is kept only if it is new: its normalised text
(lower case, words only) is not one already kept, and its word 3-gram shingles overlap no kept query's by a Jaccard
of `near_duplicate` or more. Near duplicates are found with MinHash locality-sensitive hashing (32 stable hashes in 8
bands of 4: a pair at Jaccard 0.7 shares a band with probability 0.89, at 0.8 with 0.985), each candidate then checked
exactly, so a check costs about the same whatever the number of queries kept. Every hash is stable across processes,
so a resumed run drops exactly what the first run would have.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field

# The reasons a candidate is dropped, in the order they are checked
EMPTY = "empty"
UNFINISHED = "unfinished"  # the model did not end its user turn within the token limit
TOO_SHORT = "too short"
TOO_LONG = "too long"
BROKEN = "broken characters"
REPETITIVE = "repetitive"
NOT_TEXT = "mostly not letters"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near duplicate"
REASONS = (EMPTY, UNFINISHED, TOO_SHORT, TOO_LONG, BROKEN, REPETITIVE, NOT_TEXT, DUPLICATE, NEAR_DUPLICATE)

SHINGLE_WORDS = 3
HASHES, BANDS = 32, 8
_PRIME = (1 << 61) - 1
_RANDOM = random.Random(17)  # fixed: the same hash functions in every process and run
_COEFFICIENTS = [(_RANDOM.randrange(1, _PRIME), _RANDOM.randrange(_PRIME)) for _ in range(HASHES)]
_WORD = re.compile(r"\w+")
_RUN = re.compile(r"(.)\1{9,}")  # one character ten times or more in a row


def normalise(text: str) -> str:
    """Lower case, words only, single spaces: what makes two queries the same query."""
    return " ".join(_WORD.findall(text.lower()))


def shingles(normalised: str) -> set[str]:
    """The word 3-grams of a normalised query (the whole query when it is shorter)."""
    words = normalised.split()
    if len(words) <= SHINGLE_WORDS:
        return {normalised}
    return {" ".join(words[start : start + SHINGLE_WORDS]) for start in range(len(words) - SHINGLE_WORDS + 1)}


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _bands(pieces: set[str]) -> list[tuple[int, ...]]:
    """The MinHash signature of `pieces`, cut into BANDS bands (each band keyed by its number too)."""
    values = [_stable_hash(piece) for piece in pieces]
    signature = [min((a * value + b) % _PRIME for value in values) for a, b in _COEFFICIENTS]
    rows = HASHES // BANDS
    return [(band, *signature[band * rows : (band + 1) * rows]) for band in range(BANDS)]


def degenerate_reason(text: str) -> str | None:
    """Why `text` is no usable query whatever else is kept: broken characters, repetition, or mostly not letters."""
    if "\ufffd" in text:
        return BROKEN
    words = normalise(text).split()
    if _RUN.search(text) or (len(words) >= 8 and len(set(words)) < 0.3 * len(words)):
        return REPETITIVE
    grams = Counter(tuple(words[start : start + 4]) for start in range(len(words) - 3))
    if grams and max(grams.values()) >= 3:
        return REPETITIVE
    visible = [character for character in text if not character.isspace()]
    if sum(character.isalpha() for character in visible) < 0.3 * len(visible):
        return NOT_TEXT
    return None


@dataclass
class QueryFilter:
    """Keeps the queries worth answering, in the order offered; `dropped` counts the others by reason."""

    min_words: int = 3
    min_chars: int = 10
    max_chars: int = 2000
    near_duplicate: float = 0.7  # word 3-gram Jaccard at or above which two queries are the same query
    dropped: Counter = field(default_factory=Counter)
    _exact: set[str] = field(default_factory=set)
    _shingles: list[set[str]] = field(default_factory=list)
    _index: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def reason(self, text: str, finished: bool = True) -> str | None:
        """Why `text` would be dropped now, or None if it would be kept (nothing is recorded)."""
        text = text.strip()
        if not text:
            return EMPTY
        if not finished:
            return UNFINISHED
        normalised = normalise(text)
        if len(normalised.split()) < self.min_words or len(text) < self.min_chars:
            return TOO_SHORT
        if len(text) > self.max_chars:
            return TOO_LONG
        reason = degenerate_reason(text)
        if reason is not None:
            return reason
        if normalised in self._exact:
            return DUPLICATE
        if self._nearest(shingles(normalised)) >= self.near_duplicate:
            return NEAR_DUPLICATE
        return None

    def offer(self, text: str, finished: bool = True) -> str | None:
        """Keep `text` (return None) or count it as dropped (return why)."""
        reason = self.reason(text, finished)
        if reason is None:
            self.add(text)
        else:
            self.dropped[reason] += 1
        return reason

    def add(self, text: str) -> None:
        """Record `text` as kept without checking it (a query a resumed run already kept)."""
        normalised = normalise(text.strip())
        self._exact.add(normalised)
        pieces = shingles(normalised)
        self._shingles.append(pieces)
        for band in _bands(pieces):
            self._index.setdefault(band, []).append(len(self._shingles) - 1)

    def _nearest(self, pieces: set[str]) -> float:
        """The highest Jaccard between `pieces` and a kept query's shingles that shares a MinHash band with it."""
        candidates = {kept for band in _bands(pieces) for kept in self._index.get(band, ())}
        best = 0.0
        for kept in candidates:
            other = self._shingles[kept]
            best = max(best, len(pieces & other) / len(pieces | other))
        return best


def describe_dropped(dropped: Counter | dict[str, int]) -> str:
    """'12 unfinished, 3 duplicate' (largest first), or 'none'."""
    parts = [f"{count} {reason}" for reason, count in sorted(dropped.items(), key=lambda item: -item[1]) if count]
    return ", ".join(parts) or "none"
