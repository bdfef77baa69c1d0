"""Byte-level BPE tokeniser, trained on a run's training split with ``tokenizers``.

Legend: N tokens of an encoded text.

Byte-level means every string encodes (the 256 bytes are the base alphabet), so a
tokeniser trained on one corpus never fails on another. The tokeniser is saved as one
JSON file beside the run and inside every checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moeblocks._optional import require
from moeblocks.runtime.errors import UsageError

if TYPE_CHECKING:  # imported lazily at run time: `tokenizers` is the optional `sra` extra
    from tokenizers import Tokenizer

__all__ = ["decode", "encode", "load_tokenizer", "save_tokenizer", "train_tokenizer"]

_CHUNK_CHARS = 1 << 20  # encode in ~1 MB pieces (cut at line ends) to bound memory


def _chunks(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start + _CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokeniser of at most ``vocab_size`` entries on ``text``.

    Deterministic for a given text and size (the merge order breaks ties by pair).
    """
    require("tokenizers", "sra", "the SRA tokeniser")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(text), trainer=trainer)
    return tok


def encode(tok: Tokenizer, text: str) -> np.ndarray:
    """Encode ``text`` to a 1-D int32 array of token ids."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(_chunks(text))):
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.int32)


def decode(tok: Tokenizer, ids: list[int]) -> str:
    """Decode token ids back to text."""
    return tok.decode(ids)


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Write the tokeniser as JSON to ``path`` (atomically)."""
    from moeblocks.runtime.durable import atomic_write_text

    atomic_write_text(path, tok.to_str())


def load_tokenizer(
    path: Path, *, sha256: str | None = None, vocab_size: int | None = None
) -> Tokenizer:
    """Read a tokeniser saved by :func:`save_tokenizer`.

    Args:
        path: The JSON file.
        sha256: The SHA-256 the file must have (the one a checkpoint recorded), if any.
        vocab_size: The model's vocabulary; a tokeniser with more entries is refused.

    Raises:
        UsageError: For a missing or unreadable file, another tokeniser than the one
            recorded, or one too large for the model; each names the file.
    """
    require("tokenizers", "sra", "the SRA tokeniser")
    from tokenizers import Tokenizer

    if not path.is_file():
        raise UsageError(f"tokenizer file {path} does not exist")
    text = path.read_bytes()
    if sha256 is not None and hashlib.sha256(text).hexdigest() != sha256:
        raise UsageError(
            f"tokenizer file {path} is not the tokeniser this run was trained with "
            f"(its SHA-256 differs from the {sha256[:16]}... recorded)"
        )
    try:
        tok = Tokenizer.from_str(text.decode("utf-8"))
    except Exception as err:  # tokenizers raises its own Exception type on bad JSON
        raise UsageError(f"tokenizer file {path} is unreadable: {err}") from err
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise UsageError(
            f"tokenizer file {path} has {tok.get_vocab_size()} entries, more than the "
            f"model's vocab_size {vocab_size}"
        )
    return tok
