"""Grading spec of lab 06, the KV cache, FlashAttention's tile step, speculative decoding and paged
KV blocks (chapter 06).

Expected values come from ``utils.kvcache``, ``utils.fusion`` and ``utils.serving`` (imported
inside functions). Two exercises are graded through adapters that run inside the sandbox and hold
no expected values: ``run_accept_reject`` draws drafts from q with a seeded generator and returns
the histogram of emitted tokens and the number of accepts, which ``_statistical`` tests against
p (Pearson's chi-square) and against beta = sum min(p, q); ``run_block_ops`` replays a list of
allocator operations on the learner's class and logs each result (or exception name) and the free
count, compared with the reference allocator's log.
"""

from __future__ import annotations

import math
import random

from utils.labs.spec import (Case, Exercise, LabSpec, _compare_raises, _show, array_close,
                             call_with_tensors, close, exact, tensor_arg)

ADAPTER = "utils.labs.spec:call_with_tensors"


def _mat(rng, *shape, digits=3):
    if len(shape) == 1:
        return [round(rng.gauss(0, 1), digits) for _ in range(shape[0])]
    return [_mat(rng, *shape[1:], digits=digits) for _ in range(shape[0])]


def _tuple_of_arrays(rtol, atol, names):
    """A tuple (list after encoding) of tensors, each ``array_close``."""
    inner = array_close(rtol, atol)

    def compare(expected, got):
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} tensors ({', '.join(names)}), got {_show(got)}"
        for name, e, g in zip(names, expected, got):
            reason = inner(e, g)
            if reason:
                return f"{name}: {reason}"
        return None

    return compare


# --------------------------------------------------------------------------- 1: one cached step


def _kv_step_ref(k_cache, v_cache, length, q, k_new, v_new):
    def ref(kc, vc, n, q, k, v):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < kc.shape[1]:
            raise ValueError(f"length must be an integer in 0..{kc.shape[1] - 1}, got {n!r}")
        kc, vc = kc.clone(), vc.clone()
        kc[:, n], vc[:, n] = k, v
        s = (q.unsqueeze(1) @ kc[:, :n + 1].transpose(1, 2)).squeeze(1) / math.sqrt(q.shape[-1])
        return (s.softmax(-1).unsqueeze(1) @ vc[:, :n + 1]).squeeze(1), kc, vc

    return call_with_tensors(ref, k_cache, v_cache, length, q, k_new, v_new)


def _kv_case(rng, heads, max_len, dim, length, label=None):
    cache = lambda: [[[round(rng.gauss(0, 1), 3) if t < length else 0.0 for _ in range(dim)]
                      for t in range(max_len)] for _ in range(heads)]
    return Case((tensor_arg(cache()), tensor_arg(cache()), length, tensor_arg(_mat(rng, heads, dim)),
                 tensor_arg(_mat(rng, heads, dim)), tensor_arg(_mat(rng, heads, dim))),
                label=label or f"{heads} heads, cache {max_len}, d {dim}, {length} cached")


def _hidden_kv(rng):
    cases = [_kv_case(rng, rng.randint(1, 4), 8, rng.choice([2, 4, 8]), rng.randint(1, 6))
             for _ in range(4)]
    return cases + [_kv_case(rng, 2, 5, 4, 0, "empty cache (length 0): attends to itself only"),
                    _kv_case(rng, 2, 5, 4, 4, "the last free slot (length = max_len - 1)"),
                    Case(_kv_case(rng, 2, 5, 4, 0).args[:2] + (5,) + _kv_case(rng, 2, 5, 4, 0).args[3:],
                         raises="ValueError", label="length 5 = max_len: no slot left"),
                    Case(_kv_case(rng, 2, 5, 4, 0).args[:2] + (-1,) + _kv_case(rng, 2, 5, 4, 0).args[3:],
                         raises="ValueError", label="length -1")]


# --------------------------------------------------------------------------- 2: a tile step


def _tile_ref(m, l, o, scores, values):
    from utils.fusion import flash_attention_update

    return call_with_tensors(flash_attention_update, m, l, o, scores, values)


def _tile_case(rng, rows, block, dv, first=False, masked=False, label=None):
    m = [float("-inf")] * rows if first else [round(rng.uniform(-1, 2), 3) for _ in range(rows)]
    l = [0.0] * rows if first else [round(rng.uniform(0.5, 4), 3) for _ in range(rows)]
    o = [[0.0] * dv for _ in range(rows)] if first else _mat(rng, rows, dv)
    s = _mat(rng, rows, block)
    if masked:
        s[0] = [float("-inf")] * block
        s[-1][0] = float("-inf")
    return Case((tensor_arg(m), tensor_arg(l), tensor_arg(o), tensor_arg(s),
                 tensor_arg(_mat(rng, block, dv))),
                label=label or f"{rows} rows, block {block}, Dv {dv}")


def _hidden_tile(rng):
    cases = [_tile_case(rng, rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 4))
             for _ in range(4)]
    return cases + [_tile_case(rng, 3, 4, 2, first=True, label="the first block (m = -inf, l = 0)"),
                    _tile_case(rng, 3, 4, 2, masked=True,
                               label="-inf scores: a row wholly masked in this block"),
                    _tile_case(rng, 4, 3, 2, first=True, masked=True,
                               label="first block with a wholly masked row: it stays m=-inf, l=0, O=0"),
                    Case(_tile_case(rng, 2, 3, 2).args[:4] + (tensor_arg(_mat(rng, 4, 2)),),
                         raises="ValueError", label="values with 4 rows for a block of 3")]


# --------------------------------------------------------------------------- 3, 4: formulas


def _tokens_ref(alpha, gamma):
    from utils.kvcache import expected_tokens_per_call

    return expected_tokens_per_call(alpha, gamma)


def _best_ref(alpha, cost_ratio, max_gamma):
    from utils.kvcache import optimal_draft_length

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return optimal_draft_length(alpha, cost_ratio, max_gamma)


def _hidden_tokens(rng):
    return [Case((round(rng.uniform(0.05, 0.95), 3), rng.randint(1, 10))) for _ in range(5)] + [
        Case((0.0, 4), label="alpha 0: only the target's token"),
        Case((1.0, 5), label="alpha 1: gamma + 1"),
        Case((0.5, 0), label="gamma 0: plain decoding"),
        Case((1.5, 3), raises="ValueError", label="alpha 1.5"),
        Case((0.5, -1), raises="ValueError", label="gamma -1")]


def _hidden_best(rng):
    return [Case((round(rng.uniform(0.3, 0.95), 3), round(rng.uniform(0.01, 0.5), 3), 20))
            for _ in range(5)] + [
        Case((0.0, 0.1, 10), label="alpha 0: gamma 1 (drafting never pays)"),
        Case((0.8, 0.0, 12), label="free drafts (c = 0): the longest, 12"),
        Case((0.9, 0.05, 3), label="capped at max_gamma 3"),
        Case((-0.1, 0.1, 8), raises="ValueError", label="alpha -0.1")]


# --------------------------------------------------------------------------- 5: accept / reject


def run_accept_reject(fn, p, q, n, seed):
    """Adapter (sandbox): n drafts from q, each through the learner's rule; returns the emitted
    tokens' histogram and the number of drafts the rule accepted."""
    import torch

    p_t, q_t = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q_t, n, replacement=True, generator=gen).tolist()
    counts, accepted = [0] * len(p), 0
    for d in drafts:
        token, ok = fn(p_t, q_t, d, gen)
        counts[int(token)] += 1
        accepted += bool(ok)
    return {"counts": counts, "accepted": accepted}


def _accept_expected(p, q, n, seed):
    return {"p": p, "beta": sum(min(a, b) for a, b in zip(p, q)), "n": n}


def _statistical(expected, got):
    from utils.kvcache import chi_square_pvalue

    if not (isinstance(got, dict) and isinstance(got.get("counts"), list)):
        return f"the adapter could not collect (token, accepted) pairs, got {_show(got)}"
    n, beta = expected["n"], expected["beta"]
    if sum(got["counts"]) != n:
        return f"{sum(got['counts'])} tokens emitted for {n} drafts"
    pval = chi_square_pvalue(got["counts"], expected["p"])
    if pval < 1e-3:
        return (f"the emitted tokens do not follow p (chi-square p-value {pval:.1e}; counts "
                f"{got['counts']} for p = {expected['p']})")
    sigma = math.sqrt(max(beta * (1 - beta), 1e-12) / n)
    rate = got["accepted"] / n
    if abs(rate - beta) > 5 * sigma + 1e-9:
        return (f"acceptance frequency {rate:.4f}, expected beta = sum min(p, q) = {beta:.4f} "
                f"(within 5 standard errors, {5 * sigma:.4f})")
    return None


def _dist(rng, k, zeros=0):
    w = [rng.uniform(0.1, 1.0) for _ in range(k)]
    for i in rng.sample(range(k), zeros):
        w[i] = 0.0
    s = sum(w)
    return [round(v / s, 6) for v in w[:-1]] + [round(1 - sum(round(v / s, 6) for v in w[:-1]), 6)]


def _hidden_accept(rng):
    cases = []
    for _ in range(3):
        k = rng.randint(4, 8)
        cases.append(Case((_dist(rng, k), _dist(rng, k), 3000, rng.randrange(10**6)),
                          label=f"random p, q over {k} tokens, hidden seed"))
    p = _dist(rng, 6)
    return cases + [
        Case((p, _dist(rng, 6, zeros=2), 3000, rng.randrange(10**6)),
             label="q is 0 where p is not: only the residual can emit those tokens"),
        Case((p, p, 2000, rng.randrange(10**6)), label="p == q: every draft is accepted"),
        Case((p, [1.0, 0, 0, 0, 0, 0], 3000, rng.randrange(10**6)),
             label="a deterministic drafter (q one-hot)")]


# --------------------------------------------------------------------------- 6: block tables


def run_block_ops(cls, num_blocks, block_size, ops):
    """Adapter (sandbox): replay ``ops`` on ``cls(num_blocks, block_size)``; log each result
    (or exception class name) and ``num_free()`` after it."""
    blocks = cls(num_blocks, block_size)
    log = []
    for op, *args in ops:
        try:
            result = getattr(blocks, op)(*args)
            result = list(result) if isinstance(result, (list, tuple)) else result
        except (MemoryError, KeyError, ValueError) as err:
            result = type(err).__name__
        log.append([op, result, blocks.num_free()])
    return log


class _Reference:
    """``utils.serving.BlockAllocator`` with the lab's return values."""

    def __init__(self, num_blocks, block_size):
        from utils.serving import BlockAllocator

        self.a = BlockAllocator(num_blocks, block_size)

    def allocate(self, seq, num_tokens):
        self.a.allocate(seq, num_tokens)
        return self.a.table(seq)

    def append(self, seq):
        return self.a.append(seq)

    def fork(self, parent, child):
        self.a.fork(parent, child)

    def free(self, seq):
        self.a.free(seq)

    def table(self, seq):
        return self.a.table(seq)

    def num_free(self):
        return self.a.num_free()


def _blocks_expected(num_blocks, block_size, ops):
    return run_block_ops(_Reference, num_blocks, block_size, ops)


def _random_ops(rng, length):
    seqs, ops, names = [], [], iter("abcdefghij")
    for _ in range(length):
        r = rng.random()
        if not seqs or r < 0.2:
            s = next(names, None)
            if s is None:
                continue
            ops.append(["allocate", s, rng.randint(1, 7)])
            seqs.append(s)
        elif r < 0.6:
            ops.append(["append", rng.choice(seqs)])
        elif r < 0.75:
            s = next(names, None)
            if s is None:
                continue
            ops.append(["fork", rng.choice(seqs), s])
            seqs.append(s)
        elif r < 0.9:
            s = rng.choice(seqs)
            ops.append(["free", s])
            seqs.remove(s)
        else:
            ops.append(["table", rng.choice(seqs)])
    return ops


def _hidden_blocks(rng):
    cases = [Case((rng.randint(6, 12), rng.choice([2, 3, 4]), _random_ops(rng, rng.randint(15, 30))),
                  label="a random operation sequence") for _ in range(4)]
    return cases + [
        Case((4, 2, [["allocate", "a", 3], ["fork", "a", "b"], ["append", "a"], ["append", "b"],
                     ["table", "a"], ["table", "b"], ["free", "a"], ["append", "b"]]),
             label="fork, then both append into the shared half-full block (copy-on-write)"),
        Case((3, 2, [["allocate", "a", 4], ["allocate", "b", 3], ["append", "a"], ["allocate", "c", 1],
                     ["free", "a"], ["allocate", "c", 1]]),
             label="running out of blocks, then freeing"),
        Case((6, 4, [["allocate", "a", 8], ["fork", "a", "b"], ["free", "a"], ["append", "b"],
                     ["table", "b"], ["free", "b"], ["table", "b"], ["append", "zz"]]),
             label="freeing a forked parent; unknown sequences raise KeyError")]


SPEC = LabSpec(
    lab="lab06",
    notebook="lab06_kv_cache_decoding.ipynb",
    title="Lab 06: the KV cache, FlashAttention's tile step, speculative decoding, paged blocks",
    seed=6600, timeout_s=120, cell_timeout_s=30, call_timeout_s=15, memory_mb=4096,
    preimport=("torch",),
    exercises=(
        Exercise(
            name="kv_step", points=3, title="One decode step over a preallocated KV cache",
            expected=_kv_step_ref, adapter=ADAPTER,
            compare=_tuple_of_arrays(1e-5, 1e-6, ("out", "k_cache", "v_cache")),
            public=(_kv_case(random.Random(1), 2, 4, 2, 2,
                             "2 heads, cache of 4, d 2, 2 cached"),),
            hidden=_hidden_kv, hint="write slot `length` first, then attend over length + 1 keys",
            references=("utils.llama.StaticKVCache", "torch.nn.functional.scaled_dot_product_attention")),
        Exercise(
            name="flash_tile_step", points=3, title="One tile of FlashAttention's recurrence",
            expected=_tile_ref, adapter=ADAPTER,
            compare=_tuple_of_arrays(1e-5, 1e-6, ("m", "l", "o")),
            public=(_tile_case(random.Random(2), 2, 3, 2, first=True,
                               label="the first block of 2 rows"),
                    _tile_case(random.Random(3), 2, 3, 2, label="a later block")),
            hidden=_hidden_tile, hint="shift by the new max; rows with m = -inf shift by 0",
            references=("utils.fusion.flash_attention_update", "utils.fusion.flash_attention_reference")),
        Exercise(
            name="tokens_per_target_call", points=1, title="Expected tokens per target call",
            expected=_tokens_ref, compare=close(1e-9, 1e-12),
            public=(Case((0.8, 4), label="alpha 0.8, gamma 4"),),
            hidden=_hidden_tokens, references=("utils.kvcache.expected_tokens_per_call",)),
        Exercise(
            name="best_draft_length", points=2, title="The draft length that maximises the speed-up",
            expected=_best_ref, compare=exact(),
            public=(Case((0.8, 0.1, 16), label="alpha 0.8, c 0.1"),),
            hidden=_hidden_best,
            references=("utils.kvcache.optimal_draft_length", "utils.kvcache.speculative_speedup")),
        Exercise(
            name="accept_or_resample_token", points=4, title="Speculative sampling's accept/reject rule",
            expected=_accept_expected, adapter="utils.labs.specs.lab06:run_accept_reject",
            compare=_statistical,
            public=(Case(([0.5, 0.3, 0.2], [0.2, 0.3, 0.5], 3000, 0), label="3 tokens, seed 0"),),
            hidden=_hidden_accept, hint="accept with probability min(1, p/q); else sample max(0, p - q)",
            references=("utils.kvcache.accept_or_resample", "utils.kvcache.verify_sampled")),
        Exercise(
            name="PagedBlocks", points=4, title="A block-table allocator with copy-on-write",
            expected=_blocks_expected, adapter="utils.labs.specs.lab06:run_block_ops",
            compare=exact(),
            public=(Case((4, 2, [["allocate", "a", 3], ["append", "a"], ["append", "a"],
                                 ["fork", "a", "b"], ["append", "b"], ["table", "b"], ["free", "a"]]),
                         label="allocate, append, fork, copy-on-write, free"),),
            hidden=_hidden_blocks, hint="lowest free block first; copy the last block if shared",
            references=("utils.serving.BlockAllocator", "utils.serving.PagedKVCache")),
    ),
)
