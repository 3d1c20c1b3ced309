"""Shared fixtures: the small course model loaded once per test session (per xdist worker), a
seeded generator, and the thread policy of the test run (see ``utils.bench.set_threads``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def small_lm():
    """(model, tokenizer, first 2048 held-out token ids) of the course's small model. Tests must
    not change it: take ``copy.deepcopy`` first."""
    from utils.models import encode_split, load_course_model

    model, tok = load_course_model("small")
    return model, tok, encode_split("validation", tok)[:2048]


@pytest.fixture(scope="session")
def small(small_lm):
    return small_lm[0]


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh generator seeded with 0: the same numbers in every test and on every run."""
    return torch.Generator().manual_seed(0)
