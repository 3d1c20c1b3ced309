"""Chapter 06's serving engine (utils.serving): block tables with copy-on-write and prefix
caching, the paged cache with per-row positions, continuous/static batching, chunked prefill."""

from __future__ import annotations

import pytest
import torch

from utils import kvcache as K
from utils import serving as S
from utils.llama import CourseLlama, StaticKVCache, causal_cache_mask
from utils.paths import MODELS_DIR


@pytest.fixture(scope="module")
def small_model():
    return CourseLlama.from_checkpoint(MODELS_DIR / "small")


def test_causal_cache_mask_shapes():
    m = causal_cache_mask(torch.tensor([1, 2]), 4)
    assert m.tolist() == [[True, True, False, False], [True, True, True, False]]
    mb = causal_cache_mask(torch.tensor([[0], [2]]), 3)
    assert mb.shape == (2, 1, 1, 3)
    assert mb[:, 0, 0].tolist() == [[True, False, False], [True, True, True]]


@torch.inference_mode()
def test_paged_batch_at_different_positions_matches_each_sequence_alone(small_model):
    a = S.corpus_prompt(13, offset=0)[0].tolist()
    b = S.corpus_prompt(6, offset=500)[0].tolist()
    cache = S.PagedKVCache(small_model, num_blocks=8, block_size=4)
    alloc = cache.allocator
    na, nb = len(a) - 2, len(b) - 2  # prefill all but two tokens, each alone
    alloc.allocate("a", na)
    alloc.allocate("b", nb)
    S.paged_forward(small_model, cache, ["a"], [a[:na]], [0])
    S.paged_forward(small_model, cache, ["b"], [b[:nb]], [0])
    for seq in ("a", "b"):
        alloc.append(seq)
        alloc.append(seq)
    # one batch of two rows, two tokens each, at positions (11, 12) and (4, 5)
    got = S.paged_forward(small_model, cache, ["a", "b"], [a[na:], b[nb:]], [na, nb])
    assert got.shape == (2, 2, small_model.config.vocab_size)
    for row, seq in enumerate((a, b)):
        static = StaticKVCache(small_model.config, 1, len(seq))
        small_model(torch.tensor([seq[:-2]]), static, torch.arange(len(seq) - 2))
        ref = small_model(torch.tensor([seq[-2:]]), static, torch.arange(len(seq) - 2, len(seq)))
        torch.testing.assert_close(got[row], ref[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(got[row], small_model(torch.tensor([seq]))[0, -2:],
                                   atol=1e-4, rtol=0)
    assert cache.bytes_per_token() == 2 * small_model.config.num_layers * (
        small_model.config.num_kv_heads * small_model.config.head_dim * 4)


@torch.inference_mode()
def test_paged_copy_on_write_keeps_the_parent_intact(small_model):
    seq = S.corpus_prompt(7, offset=300)[0].tolist()
    cache = S.PagedKVCache(small_model, num_blocks=6, block_size=4)
    alloc = cache.allocator
    alloc.allocate("p", 6)
    S.paged_forward(small_model, cache, ["p"], [seq[:6]], [0])
    alloc.fork("p", "c")
    alloc.append("c")  # writes into the shared block [4, 8): copied first
    assert alloc.copies == [(1, 2)]
    child = S.paged_forward(small_model, cache, ["c"], [[seq[6]]], [6])
    assert alloc.copies == []  # carried out by bind
    torch.testing.assert_close(child[0, 0], small_model(torch.tensor([seq]))[0, -1],
                               atol=1e-4, rtol=0)
    alloc.append("p")  # the parent's block 1 is private again: writes in place
    parent = S.paged_forward(small_model, cache, ["p"], [[seq[0]]], [6])
    torch.testing.assert_close(parent[0, 0], small_model(torch.tensor([seq[:6] + seq[:1]]))[0, -1],
                               atol=1e-4, rtol=0)


def test_block_allocator_tables_fork_copy_on_write_and_errors():
    a = S.BlockAllocator(6, 4)
    assert a.allocate("a", 6) == 0 and a.table("a") == [0, 1]
    a.allocate("b", 3)
    assert a.table("b") == [2]
    assert a.append("a") == 1 and a.append("a") == 1  # fills block 1: 7, 8 tokens
    assert a.append("a") == 3 and a.table("a") == [0, 1, 3]  # a fresh block for the 9th
    assert a.lengths["a"] == 9 and a.slot("a", 8) == 12 and a.slot("a", 5) == 5
    a.fork("a", "c")
    assert a.table("c") == [0, 1, 3] and a.ref[:4] == [2, 2, 1, 2]
    assert a.copies == []
    assert a.append("c") == 4  # the shared last block is copied before the write
    assert a.copies == [(3, 4)] and a.table("c") == [0, 1, 4] and a.table("a") == [0, 1, 3]
    assert a.ref[3] == 1 and a.ref[4] == 1
    a.free("a")
    a.free("b")
    assert a.num_free() == 3  # blocks 2, 3, 5
    a.allocate("d", 8)
    assert a.table("d") == [2, 3]  # lowest free first
    with pytest.raises(MemoryError):
        a.allocate("e", 9)  # needs 3, one left
    assert "e" not in a.tables
    a.allocate("e", 1)
    assert a.table("e") == [5]
    with pytest.raises(MemoryError):
        a.append("d")  # needs a fresh block: none left
    for bad in (lambda: a.append("zz"), lambda: a.free("zz"), lambda: a.table("zz"),
                lambda: a.fork("zz", "yy")):
        with pytest.raises(KeyError):
            bad()
    with pytest.raises(ValueError):
        a.allocate("d", 2)
    with pytest.raises(ValueError):
        a.fork("d", "c")
    with pytest.raises(ValueError):
        S.BlockAllocator(0, 4)


def test_prefix_caching_reuses_full_blocks_and_evicts_when_needed():
    a = S.BlockAllocator(12, 4, prefix_caching=True)
    tokens = list(range(100, 110))  # 10 tokens: two full blocks
    assert a.allocate("a", 10, tokens) == 0 and a.table("a") == [0, 1, 2]
    assert a.allocate("x", 10, tokens) == 0  # not registered yet: no hit
    a.free("x")
    a.register_prefix("a", tokens)
    assert a.allocate("b", 10, tokens) == 8  # both full blocks of all but the last token
    assert a.table("b") == [0, 1, 3] and a.ref[0] == a.ref[1] == 2
    assert a.allocate("c", 9, tokens[:9]) == 8  # 8 cached, the 9th runs
    assert a.allocate("d", 8, tokens[:8]) == 4  # the 8th token must run: only block 0
    assert a.table("d")[0] == 0 and a.table("d")[1] not in (0, 1)
    other = [7] + tokens[1:]  # differs in the first block: nothing matches
    assert a.allocate("o", 10, other) == 0
    assert a.hit_tokens == 20 and a.prompt_tokens == 10 * 4 + 9 + 8
    for s in ("a", "b", "c", "d", "o"):
        a.free(s)
    assert list(a.evictable) == [1, 0] and a.num_free() == 12  # LRU: 1 was freed first
    assert a.allocate("e", 10, tokens) == 8 and a.table("e")[:2] == [0, 1]  # a freed cached block
    a.free("e")
    big = list(range(48))
    assert a.allocate("f", 48, big) == 0  # needs all 12 blocks: the cached ones are evicted
    assert a.table("f") == list(range(2, 12)) + [0, 1]  # free blocks first, then LRU evictions
    assert not a.cached and not a.evictable
    with pytest.raises(MemoryError):
        a.allocate("g", 1, [1])
    a.free("f")
    assert a.allocate("g", 10, tokens) == 0  # evicted: a miss
    off = S.BlockAllocator(6, 4)  # without prefix caching nothing is ever reused
    off.allocate("a", 9, tokens)
    off.register_prefix("a", tokens)
    assert off.allocate("b", 9, tokens) == 0 and not off.cached


def _greedy(model, r):
    out = K.generate(model, torch.tensor([r.prompt]), r.max_new, "static")
    return out[0, len(r.prompt):].tolist()


def test_engine_outputs_equal_greedy_generation(small_model):
    workload = S.poisson_workload(6, rate=200.0, seed=0, prompt_range=(4, 20),
                                  output_range=(2, 8))
    expected = {r.rid: _greedy(small_model, r) for r in workload}
    for kwargs in (dict(policy="continuous"), dict(policy="static"),
                   dict(policy="static", max_batch=3, chunk=3, block_size=4)):
        res = S.run_engine(small_model, workload, **kwargs)
        assert res["outputs"] == expected, kwargs
        assert res["generated"] == sum(r.max_new for r in workload)
        assert len(res["ttft"]) == len(workload) and all(t >= 0 for t in res["ttft"])
        assert res["throughput"] > 0
        mem = res["memory"]
        assert 0 <= mem["paged_waste"] < mem["contiguous_waste"] < 1
    assert all(r.output == [] for r in workload)  # the engine works on copies
    steps = {p: S.run_engine(small_model, workload, policy=p, max_batch=3)["steps"]
             for p in ("continuous", "static")}
    assert steps["continuous"] < steps["static"]  # static batches pad to their longest request
    with pytest.raises(ValueError, match="policy"):
        S.run_engine(small_model, workload, policy="fifo")
    with pytest.raises(ValueError, match="exceed"):
        S.run_engine(small_model, [S.Request(0, 0.0, [1] * 500, 20)])
    with pytest.raises(ValueError):
        S.run_engine(small_model, workload, chunk=0)


def test_prefix_caching_in_the_engine_hits_and_changes_nothing(small_model):
    wl = S.poisson_workload(5, rate=2.0, seed=1, prompt_range=(3, 10), output_range=(2, 5),
                            shared_prefix=24)
    assert all(r.prompt[:24] == wl[0].prompt[:24] for r in wl)
    plain = S.run_engine(small_model, wl, block_size=8)
    cached = S.run_engine(small_model, wl, block_size=8, prefix_caching=True)
    assert plain["prefix_hit_rate"] == 0
    assert cached["prefix_hit_rate"] > 0
    assert cached["outputs"] == plain["outputs"] == {r.rid: _greedy(small_model, r) for r in wl}
    chunked = S.run_engine(small_model, wl, block_size=8, prefix_caching=True, chunk=4)
    assert chunked["outputs"] == plain["outputs"]


def test_workload_and_percentile():
    wl = S.poisson_workload(20, rate=10.0, seed=3, prompt_range=(5, 9), output_range=(2, 4))
    assert wl == S.poisson_workload(20, rate=10.0, seed=3, prompt_range=(5, 9),
                                    output_range=(2, 4))
    arrivals = [r.arrival for r in wl]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert all(5 <= len(r.prompt) <= 9 and 2 <= r.max_new <= 4 for r in wl)
    assert S.percentile([3, 1, 2, 4], 50) == 2
    assert S.percentile([3, 1, 2, 4], 99) == 4
    assert S.percentile([5.0], 1) == 5.0
    assert S.corpus_prompt(5, 10).shape == (1, 5)
