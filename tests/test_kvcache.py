"""Chapter 06: KV caches, tiled attention, sampling and speculative decoding (utils.kvcache); the
serving engine's tests are in test_serving.py."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from utils import kvcache as KV
from utils import serving as SV
from utils.llama import CourseLlama
from utils.paths import MODELS_DIR


@pytest.fixture(scope="module")
def small():
    return CourseLlama.from_checkpoint(MODELS_DIR / "small")


@pytest.fixture(scope="module")
def teacher():
    return CourseLlama.from_checkpoint(MODELS_DIR / "teacher")


@pytest.fixture(scope="module")
def prompt():
    return SV.corpus_prompt(24, offset=500)


def test_every_cache_generates_the_same_tokens(small, prompt):
    outs = [KV.generate(small, prompt, 24, mode) for mode in ("none", "dynamic", "static")]
    assert outs[0].shape == (1, 48)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="cache"):
        KV.generate(small, prompt, 4, "paged")
    with pytest.raises(ValueError, match="positions"):
        KV.generate(small, prompt, 600)


def test_recompute_flops_sum():
    without, with_cache = KV.recompute_flops(10, 4, 3)  # steps re-run 4, 5, 6 tokens
    assert (without, with_cache) == (2 * 10 * 15, 2 * 10 * 6)


@pytest.mark.parametrize("causal,tq,tk", [(False, 37, 53), (True, 70, 70), (False, 5, 130)])
def test_tiled_attention_equals_sdpa(causal, tq, tk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, tq, 16, generator=g)
    k, v = torch.randn(2, 3, tk, 16, generator=g), torch.randn(2, 3, tk, 8, generator=g)
    ours = KV.flash_attention_tiled(q, k, v, block_q=16, block_k=32, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert (ours - ref).abs().max() < 1e-5
    assert torch.allclose(KV.attention_naive(q, k, v, causal), ref, atol=1e-5)


def test_tiles_and_flops():
    assert KV.attention_tiles(128, 64, 64, causal=False) == (4, 4)
    assert KV.attention_tiles(128, 64, 64, causal=True) == (3, 4)  # the upper-right tile skipped
    assert KV.attention_tiles(100, 32, 32, causal=True) == (1 + 2 + 3 + 4, 16)
    from utils.roofline import counted_matmul_flops

    q = k = v = torch.randn(1, 1, 96, 8)
    expected = KV.attention_flops(96, 96, 8)
    assert sum(counted_matmul_flops(lambda: KV.attention_naive(q, k, v)).values()) == expected
    assert sum(counted_matmul_flops(lambda: KV.flash_attention_tiled(q, k, v, 32, 32)).values()) \
        == expected


def test_logits_processors_match_transformers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(1)) * 3
    for t, k, p in ((0.7, 20, 0.9), (1.3, 200, 0.5), (1.0, 1, 1.0)):
        ours = KV.process_logits(logits, t, k, p)
        theirs = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, TemperatureLogitsWarper(t)(
            None, logits)))
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
        assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])
    for bad in (lambda: KV.top_p_filter(logits, 0.0), lambda: KV.top_k_filter(logits, 0),
                lambda: KV.apply_temperature(logits, 0.0)):
        with pytest.raises(ValueError):
            bad()


def test_speculative_formulas():
    assert KV.expected_tokens_per_call(0.0, 5) == 1.0
    assert KV.expected_tokens_per_call(1.0, 5) == 6.0
    assert math.isclose(KV.expected_tokens_per_call(0.5, 2), 1.75)
    rng = random.Random(0)  # Monte Carlo: accept until the first rejection, plus one token
    sims = []
    for _ in range(20000):
        n = 0
        while n < 4 and rng.random() < 0.7:
            n += 1
        sims.append(n + 1)
    assert abs(sum(sims) / len(sims) - KV.expected_tokens_per_call(0.7, 4)) < 0.03
    assert math.isclose(KV.speculative_speedup(0.5, 2, 0.25), 1.75 / 1.5)
    assert KV.optimal_draft_length(0.8, 0.0, 12) == 12
    assert KV.optimal_draft_length(0.0, 0.1, 12) == 1
    for bad in (lambda: KV.expected_tokens_per_call(1.2, 3),
                lambda: KV.expected_tokens_per_call(0.5, -1),
                lambda: KV.speculative_speedup(0.5, 2, -1)):
        with pytest.raises(ValueError):
            bad()


def test_accept_or_resample_is_exact_and_the_test_has_power():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2])
    n, counts, accepted = 20000, [0] * 5, 0
    for d in torch.multinomial(q, n, replacement=True, generator=g).tolist():
        token, ok = KV.accept_or_resample(p, q, d, g)
        counts[token] += 1
        accepted += ok
    assert counts[4] == 0  # p(4) = 0 is never emitted
    assert KV.chi_square_pvalue(counts, p.tolist()) > 1e-3
    beta = KV.acceptance_probability(p, q)
    assert math.isclose(beta, 0.1 + 0.1 + 0.2 + 0.1)
    assert abs(accepted / n - beta) < 5 * math.sqrt(beta * (1 - beta) / n)
    wrong = [0] * 5  # the common mistake: resample from p instead of the residual
    for d in torch.multinomial(q, n, replacement=True, generator=g).tolist():
        u = float(torch.rand((), generator=g))
        token = d if u < min(1.0, float(p[d] / q[d])) else int(torch.multinomial(p, 1, generator=g))
        wrong[token] += 1
    assert KV.chi_square_pvalue(wrong, p.tolist()) < 1e-6


def test_prompt_lookup_draft():
    assert KV.prompt_lookup_draft([1, 2, 3, 4, 9, 2, 3], 2) == [4, 9]
    assert KV.prompt_lookup_draft([5, 6, 7], 3) == []
    assert KV.prompt_lookup_draft([1, 8, 1], 4) == [8, 1]  # the 1-gram [1] recurs


def test_greedy_speculative_decoding_is_identical(teacher, small, prompt):
    ref = KV.generate(teacher, prompt, 40, "static")
    for drafter, gamma in ((small, 3), (None, 4)):
        out, stats = KV.speculative_generate(teacher, prompt, 40, gamma, drafter)
        assert torch.equal(out, ref)
        assert stats["target_calls"] == stats["rounds"] and stats["accepted"] <= stats["proposed"]
        assert stats["target_calls"] < 40  # some drafts were accepted
    out, stats = KV.speculative_generate(small, prompt, 20, 4, small)  # its own drafter
    assert stats["alpha"] == 1.0 and torch.equal(out, KV.generate(small, prompt, 20, "static"))


def test_speculative_sampling_first_token_follows_the_target(small):
    torch.manual_seed(0)
    from utils.llama import LlamaConfig

    drafter = CourseLlama.from_config(LlamaConfig(4096, 64, 1, 2, 1, 128, 512))
    ids = SV.corpus_prompt(8, offset=100)
    with torch.inference_mode():
        p = torch.softmax(small(ids)[0, -1], -1)
    g = torch.Generator().manual_seed(3)
    counts = [0] * len(p)
    for _ in range(300):
        out, _ = KV.speculative_generate(small, ids, 2, 2, drafter, sampling={"temperature": 1.0},
                                         generator=g)
        counts[int(out[0, 8])] += 1
    assert KV.chi_square_pvalue(counts, p.tolist()) > 1e-3
    with pytest.raises(ValueError, match="generator"):
        KV.speculative_generate(small, ids, 2, 2, drafter, sampling={})
