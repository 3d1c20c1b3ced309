"""The course corpus (King James Version, public domain) and its fixed train/validation split.

The split is by chapter: every ``HELD_OUT_EVERY``-th chapter is held out, so validation text is
never seen in training (not even as a neighbouring verse) yet covers every part of the book.
See ``data/README.md`` for the source and licence.
"""

from __future__ import annotations

import gzip
from functools import lru_cache

import torch

from utils.paths import DATA_DIR

CORPUS_PATH = DATA_DIR / "kjv.txt.gz"
HELD_OUT_EVERY = 20
SPLITS = ("train", "validation")


@lru_cache(maxsize=1)
def _chapters() -> tuple[str, ...]:
    text = gzip.open(CORPUS_PATH, "rt", encoding="utf-8").read()
    return tuple(chapter.strip() + "\n" for chapter in text.split("\n\n") if chapter.strip())


def load_corpus(split: str = "train") -> str:
    """Return the text of one split, chapters separated by a blank line.

    >>> len(load_corpus("validation")) < len(load_corpus("train")) / 10
    True
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    held_out = split == "validation"
    chapters = [
        c for i, c in enumerate(_chapters(), start=1) if (i % HELD_OUT_EVERY == 0) == held_out
    ]
    return "\n".join(chapters)


def sample_sentences(n: int = 8, split: str = "validation") -> list[str]:
    """``n`` real verses from a split, evenly spaced (deterministic), for embedding tests."""
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    verses = [v for v in load_corpus(split).splitlines() if len(v.split()) >= 8]
    step = max(1, len(verses) // n)
    return verses[::step][:n]


def token_windows(token_ids: torch.Tensor, context_length: int,
                  max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (N, context_length) of a 1-D token stream, the tail dropped:
    the batches every quality metric and calibration set is computed on."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1:
        raise ValueError("token_ids must be a 1-D tensor of token ids, got "
                         f"{getattr(token_ids, 'shape', type(token_ids).__name__)}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    n = len(token_ids) // context_length
    if n == 0:
        raise ValueError(f"need at least context_length={context_length} tokens, "
                         f"got {len(token_ids)}")
    return token_ids[: n * context_length].view(n, context_length)  # (N, T)
