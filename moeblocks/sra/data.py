"""Offline corpora and the deterministic batch order of training.

Legend: B batch, S sequence length, N tokens in a split.

Three sources, all local:

- ``"pydoc"`` (default): the text of CPython's ``pydoc_data.topics`` (the help pages of
  the language reference), ~465k characters that ship with every Python. Topics in
  sorted order; every 10th (from the 6th) is validation, so the split is fixed.
- ``"synthetic"``: a generated language with known word classes (numbers, colours,
  animals, verbs in past and present, function words) arranged by a small grammar in
  which the time word decides the verb's tense. :data:`WORD_CLASSES` gives the class of
  every word, so tests can ask whether experts specialise by class.
- a path: a plain-text file (first 90 % of lines train, the rest validation) or a folder
  with train / valid (/ test) files, e.g. the raw WikiText-103 layout
  ``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``. Files are decoded strictly
  (UTF-8 unless told otherwise): a byte that does not decode, or a NUL byte (binary
  data), is an error that names the file and the byte offset. Paths are recorded
  absolute (:func:`data_spec`), so a run means the same file from any working folder.

The batch of step ``s`` depends only on ``(seed, s)``, so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from moeblocks.runtime.errors import UsageError

__all__ = [
    "BUILTIN_DATA",
    "WORD_CLASSES",
    "Corpus",
    "batch_at",
    "data_spec",
    "eval_windows",
    "load_corpus",
    "synthetic_text",
]

BUILTIN_DATA = ("pydoc", "synthetic")
_HASH_CHARS = 1 << 20  # characters encoded at a time by Corpus.fingerprint
"""Data specs that name a built-in corpus rather than a path."""


@dataclass(frozen=True)
class Corpus:
    """Raw text of a corpus, split.

    Attributes:
        name: The data spec it was loaded from (``pydoc``, ``synthetic`` or an absolute
            path).
        train: Training text (also what the tokeniser is trained on).
        valid: Validation text.
        test: Test text, or an empty string where the source has none.
        encoding: The encoding the files were decoded with.
    """

    name: str
    train: str
    valid: str
    test: str = ""
    encoding: str = "utf-8"

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the three splits: equal exactly when the text is the same."""
        h = hashlib.sha256()
        for part in (self.train, self.valid, self.test):
            h.update(len(part).to_bytes(8, "little"))
            for start in range(0, len(part), _HASH_CHARS):  # no full copy of a big corpus
                h.update(part[start : start + _HASH_CHARS].encode("utf-8", "surrogatepass"))
        return h.hexdigest()


# --- synthetic language -------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NUMBERS = _words("one two three four five six seven eight nine ten eleven twelve")
_COLOURS = _words("red blue green yellow black white purple orange grey brown pink silver")
_ANIMALS = _words("cat dog fox horse mouse bird cow sheep goat lion tiger bear wolf frog duck owl")
_VERBS = {  # present -> past
    "chases": "chased",
    "sees": "saw",
    "follows": "followed",
    "finds": "found",
    "likes": "liked",
    "helps": "helped",
    "watches": "watched",
    "meets": "met",
    "feeds": "fed",
    "calls": "called",
}
_PRESENT = tuple(_VERBS)
_FUNCTION = _words("the a and near with times yesterday today now , .")

WORD_CLASSES: dict[str, str] = {
    **dict.fromkeys(_NUMBERS, "number"),
    **dict.fromkeys(_COLOURS, "colour"),
    **dict.fromkeys(_ANIMALS, "animal"),
    **dict.fromkeys(_VERBS, "verb_present"),
    **dict.fromkeys(_VERBS.values(), "verb_past"),
    **dict.fromkeys(_FUNCTION, "function"),
}
"""Class of every word of the synthetic language (punctuation counts as function)."""


def _noun_phrase(rng: random.Random) -> list[str]:
    words = [rng.choice(["the", "a"])]
    if rng.random() < 0.6:
        words.append(rng.choice(_COLOURS))
    words.append(rng.choice(_ANIMALS))
    return words


def _verb(rng: random.Random, past: bool) -> str:
    present = rng.choice(_PRESENT)
    return _VERBS[present] if past else present


def _sentence(rng: random.Random) -> str:
    # S -> TIME , NP VERB NP [NUM times] [and VERB NP] [near|with NP] .
    # The time word fixes the tense of every verb: the one long-range rule to learn.
    time = rng.choice(["yesterday", "today", "now"])
    past = time == "yesterday"
    words = [time, ",", *_noun_phrase(rng), _verb(rng, past), *_noun_phrase(rng)]
    if rng.random() < 0.4:
        words += [rng.choice(_NUMBERS), "times"]
    if rng.random() < 0.3:
        words += ["and", _verb(rng, past), *_noun_phrase(rng)]
    if rng.random() < 0.3:
        words += [rng.choice(["near", "with"]), *_noun_phrase(rng)]
    return " ".join([*words, "."])


def synthetic_text(num_sentences: int, seed: int) -> str:
    """``num_sentences`` lines of the synthetic language, space-separated words.

    ``text.split()`` recovers the words; :data:`WORD_CLASSES` maps each to its class.
    """
    rng = random.Random(seed)
    return "\n".join(_sentence(rng) for _ in range(num_sentences)) + "\n"


# --- loading ------------------------------------------------------------------------


def _pydoc_corpus() -> Corpus:
    from pydoc_data import topics

    names = sorted(topics.topics)
    valid = [n for i, n in enumerate(names) if i % 10 == 5]
    train = [n for n in names if n not in valid]

    def join(keys: list[str]) -> str:
        return "\n\n".join(topics.topics[k].strip() for k in keys) + "\n"

    return Corpus("pydoc", join(train), join(valid))


def _read(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 4].hex(" ")
        raise UsageError(
            f"data file {path} is not valid {encoding} at byte {err.start} ({bad}...); "
            "pass --encoding with the file's encoding (e.g. latin-1)"
        ) from err
    nul = text.find("\0")
    if nul >= 0:
        at = len(text[:nul].encode(encoding))
        raise UsageError(f"data file {path} has a NUL byte at byte {at}: is it a binary file?")
    if not text.strip():
        raise UsageError(f"data file {path} is empty")
    return text


def _find_split(folder: Path, names: tuple[str, ...]) -> Path | None:
    hits = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and any(n in p.name.lower().replace("-", ".").replace("_", ".").split(".") for n in names)
    ]
    if len(hits) > 1:
        raise UsageError(
            f"data folder {folder} has several {names[0]} files: {[p.name for p in hits]}"
        )
    return hits[0] if hits else None


def data_spec(data: str) -> str:
    """``--data`` as a run records it: a built-in name as is, a path made absolute."""
    return data if data in BUILTIN_DATA else os.path.abspath(data)


def load_corpus(spec: str, encoding: str = "utf-8") -> Corpus:
    """Load the corpus named by ``spec``: ``pydoc``, ``synthetic`` or a file/folder path.

    Args:
        spec: The data spec; a relative path is taken from the working folder and
            recorded absolute in the result's ``name``.
        encoding: Text encoding of the files (built-in corpora ignore it).

    Raises:
        UsageError: For a missing path, an unknown encoding, a file that does not
            decode or holds NUL bytes, an empty file, or a folder without train and
            valid files.
    """
    try:
        encoding = codecs.lookup(encoding).name
    except LookupError as err:
        raise UsageError(f"--encoding {encoding!r} is not a known text encoding") from err
    if spec == "pydoc":
        return _pydoc_corpus()
    if spec == "synthetic":
        # Fixed generator seeds: the corpus is the same for every run seed.
        return Corpus(
            "synthetic",
            synthetic_text(20000, seed=1),
            synthetic_text(2000, seed=2),
            synthetic_text(2000, seed=3),
        )
    path = Path(data_spec(spec))
    if not path.exists():
        raise UsageError(f"--data {spec}: no such file or folder (or use 'pydoc' or 'synthetic')")
    if path.is_file():
        lines = _read(path, encoding).splitlines(keepends=True)
        cut = max(1, int(len(lines) * 0.9))
        return Corpus(str(path), "".join(lines[:cut]), "".join(lines[cut:]), encoding=encoding)
    if not path.is_dir():
        raise UsageError(f"--data {spec} is neither a regular file nor a folder")
    train = _find_split(path, ("train",))
    valid = _find_split(path, ("valid", "val", "validation", "dev"))
    if train is None or valid is None:
        raise UsageError(
            f"--data {spec}: a data folder needs a train and a valid file "
            "(e.g. wiki.train.raw, wiki.valid.raw)"
        )
    test = _find_split(path, ("test",))
    text = [_read(p, encoding) if p else "" for p in (train, valid, test)]
    return Corpus(str(path), *text, encoding=encoding)


# --- batches ------------------------------------------------------------------------


def check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    """Raise :class:`UsageError` when a split is shorter than one training sequence."""
    if len(tokens) < seq_len + 1:
        # A text file validates on its last 10 % of lines: one line leaves nothing.
        more = (
            "a file with more lines (its last 10 % validate) or a folder with train and valid files"
            if split == "validation" and len(tokens) == 0
            else "more text"
        )
        raise UsageError(
            f"the {split} split has {len(tokens)} tokens, fewer than one sequence "
            f"(seq_len + 1 = {seq_len + 1}); use {more}, or a shorter sequence "
            f"(train --set seq_len=N)"
        )


def batch_at(
    tokens: Int[Tensor, " N"], step: int, batch_size: int, seq_len: int, seed: int
) -> tuple[Int[Tensor, "B S"], Int[Tensor, "B S"]]:
    """The training batch of ``step``: random windows, drawn from ``(seed, step)`` only.

    Returns:
        Inputs and next-token targets, int64.
    """
    g = torch.Generator().manual_seed(seed * 2**32 + step)
    starts_B = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts_B.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]  # [B, S] each


def eval_windows(
    tokens: Int[Tensor, " N"], seq_len: int, max_tokens: int = 0
) -> tuple[Int[Tensor, "W S"], Int[Tensor, "W S"]]:
    """Non-overlapping validation windows from the start of the split.

    Args:
        tokens: The validation tokens.
        seq_len: S.
        max_tokens: Stop after about this many tokens (0 = the whole split).

    Returns:
        Inputs and targets for W windows (W >= 1 once :func:`check_length` passed).
    """
    W = (len(tokens) - 1) // seq_len
    if max_tokens:
        W = max(1, min(W, max_tokens // seq_len))
    n = W * seq_len
    return (tokens[:n].long().view(W, seq_len), tokens[1 : n + 1].long().view(W, seq_len))
