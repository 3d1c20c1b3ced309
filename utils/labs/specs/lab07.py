"""Grading spec of lab 07, parallelism (chapter 07): a layer split by columns and by rows, ring
all-reduce traffic, the pipeline bubble, the alpha-beta fit and the KV cache per rank of a TP x PP
plan. Pure functions: nothing here starts a process (the sandbox allows none).

Expected values come from ``utils.cluster`` (imported inside functions) and, for the split, from
the matrix products written out below.
"""

from __future__ import annotations

import math
import random

from utils.labs.spec import (Case, Exercise, LabSpec, _compare_raises, _show, array_close,
                             call_with_tensors, choice, close, exact, one_of, tensor_arg)

ADAPTER = "utils.labs.spec:call_with_tensors"


def _mat(rng, rows, cols):
    return [[round(rng.gauss(0, 1), 3) for _ in range(cols)] for _ in range(rows)]


# --------------------------------------------------------------------------- 1: split a layer

def _split_ref(x, weight, world_size, split):
    import torch

    def ref(x, w, p, how):
        if how not in ("columns", "rows"):
            raise ValueError(f"split must be 'columns' or 'rows', got {how!r}")
        size = w.shape[0] if how == "columns" else w.shape[1]
        if isinstance(p, bool) or not isinstance(p, int) or p < 1 or size % p:
            raise ValueError(f"world_size must be a positive integer dividing {size}, got {p!r}")
        if how == "columns":  # rank r: output features r (rows of W, columns of W^T)
            parts = [x @ wr.T for wr in w.chunk(p, 0)]
            return parts, torch.cat(parts, -1)
        parts = [xr @ wr.T for xr, wr in zip(x.chunk(p, -1), w.chunk(p, 1))]
        return parts, sum(parts)

    return call_with_tensors(ref, x, weight, world_size, split)


def _parts_and_total(rtol, atol):
    inner = array_close(rtol, atol)

    def compare(expected, got):
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        if not isinstance(got, (list, tuple)) or len(got) != 2:
            return f"expected (parts, combined), got {_show(got)}"
        parts, total = got
        if not isinstance(parts, (list, tuple)) or len(parts) != len(expected[0]):
            return f"expected a list of {len(expected[0])} per-rank outputs, got {_show(parts)}"
        for r, (e, g) in enumerate(zip(expected[0], parts)):
            reason = inner(e, g)
            if reason:
                return f"rank {r}'s part: {reason}"
        reason = inner(expected[1], total)
        return f"combined: {reason}" if reason else None

    return compare


def _split_case(rng, batch, n_in, n_out, p, how, label=""):
    return Case((tensor_arg(_mat(rng, batch, n_in)), tensor_arg(_mat(rng, n_out, n_in)), p, how),
                label=label or f"x {batch}x{n_in}, W {n_out}x{n_in}, {p} ranks, by {how}")


def _hidden_split(rng):
    return [_split_case(rng, 3, 4, 6, 2, "columns"), _split_case(rng, 2, 6, 4, 3, "rows"),
            _split_case(rng, 1, 8, 8, 4, "rows"), _split_case(rng, 2, 4, 8, 8, "columns"),
            _split_case(rng, 2, 4, 6, 1, "rows"),
            Case(_split_case(rng, 2, 4, 6, 4, "columns").args, raises="ValueError",
                 label="4 ranks cannot split 6 output features"),
            Case(_split_case(rng, 2, 4, 6, 2, "diagonal").args, raises="ValueError",
                 label="an unknown split")]


# --------------------------------------------------------------------------- 2-4: formulas

def _allreduce_ref(nbytes, p):
    from utils.cluster import ring_allreduce_bytes

    return ring_allreduce_bytes(nbytes, p)


def _hidden_allreduce(rng):
    cases = [Case((rng.choice([1024, 4096, 2**20, 3 * 2**22]), p)) for p in (1, 2, 3, 4, 8, 16)]
    return cases + [Case((1024, 0), raises="ValueError", label="p = 0")]


def _bubble_ref(stages, microbatches):
    from utils.cluster import bubble_fraction

    return bubble_fraction(stages, microbatches)


def _hidden_bubble(rng):
    return [Case((k, m)) for k, m in ((1, 4), (2, 1), (4, 4), (4, 12), (8, 32),
                                      (rng.randint(2, 8), rng.randint(1, 64)))] + \
        [Case((2, 0), raises="ValueError", label="no micro-batches")]


def _fit_ref(nbytes, seconds):
    from utils.cluster import fit_alpha_beta

    return list(fit_alpha_beta(nbytes, seconds))


def _fit_case(rng, alpha, beta, noise=0.0, label=""):
    sizes = [2 ** k for k in range(10, 25, 2)]
    times = [(alpha + n / beta) * (1 + noise * rng.uniform(-1, 1)) for n in sizes]
    return Case((sizes, times), label=label or f"alpha {alpha:g} s, beta {beta:g} B/s"
                + (f", {noise:.0%} noise" if noise else ""))


def _pair_close(rel_tol):
    number = close(rel_tol, 0.0)

    def compare(expected, got):
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        if not isinstance(got, (list, tuple)) or len(got) != 2:
            return f"expected (alpha, beta), got {_show(got)}"
        for name, e, g in zip(("alpha", "beta"), expected, got):
            reason = number(e, g)
            if reason:
                return f"{name}: {reason}"
        return None

    return compare


def _hidden_fit(rng):
    return [_fit_case(rng, 1e-5, 2e10), _fit_case(rng, 3e-4, 4e9, 0.05),
            _fit_case(rng, 2e-6, 3e11, 0.02),
            Case(([1024], [1e-4]), raises="ValueError", label="one point"),
            Case(([1024, 2048], [1e-4]), raises="ValueError", label="lengths differ")]


# --------------------------------------------------------------------------- 5: KV per rank

def _kv_ref(num_layers, kv_heads, head_dim, seq_len, batch, tp, pp, dtype_bytes):
    for name, v in (("tp", tp), ("pp", pp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if pp > num_layers:
        raise ValueError(f"pp ({pp}) must be at most num_layers ({num_layers})")
    layers = math.ceil(num_layers / pp)
    return 2 * layers * max(1, kv_heads // tp) * head_dim * seq_len * batch * dtype_bytes


def _hidden_kv(rng):
    return [Case((32, 32, 128, 4096, 1, 1, 1, 2), label="Llama-2-7B, 4096 tokens, fp16"),
            Case((80, 8, 128, 4096, 4, 8, 1, 2), label="Llama-2-70B, TP 8"),
            Case((80, 8, 128, 4096, 1, 16, 1, 2), label="Llama-2-70B, TP 16: KV heads replicated"),
            Case((80, 8, 128, 2048, 2, 4, 3, 2), label="Llama-2-70B, TP 4 x PP 3 (80 / 3 layers)"),
            Case((6, 2, 64, 512, 8, 2, 2, 4), label="the teacher, TP 2 x PP 2, fp32"),
            Case((6, 2, 64, 512, 1, 2, 7, 4), raises="ValueError", label="more stages than layers")]


# --------------------------------------------------------------------------- 6: concept

DP_OPTIONS = ("a", "b", "c", "d")


def _dp_answer():
    return "c"


SPEC = LabSpec(
    lab="lab07",
    notebook="lab07_parallelism.ipynb",
    title="Lab 07: tensor-parallel splits, ring traffic, the pipeline bubble, alpha-beta, memory",
    seed=7700, timeout_s=90, cell_timeout_s=30, call_timeout_s=10, memory_mb=4096,
    preimport=("torch",),
    exercises=(
        Exercise(
            name="split_linear", points=3, title="A linear layer split by columns and by rows",
            expected=_split_ref, adapter=ADAPTER, compare=_parts_and_total(1e-5, 1e-5),
            public=(_split_case(random.Random(1), 2, 4, 6, 2, "columns"),
                    _split_case(random.Random(2), 2, 4, 6, 2, "rows")),
            hidden=_hidden_split,
            hint="columns: x @ W[rows_r].T, then concatenate; rows: x[:, cols_r] @ W[:, cols_r].T, "
                 "then add",
            references=("utils.parallel.shard_tensor_parallel", "utils.fusion.matmul_split_cols",
                        "utils.fusion.matmul_split_rows")),
        Exercise(
            name="allreduce_bytes_per_rank", points=1, title="Ring all-reduce traffic per rank",
            expected=_allreduce_ref, compare=close(1e-9, 1e-9),
            public=(Case((2**20, 4), label="1 MiB, 4 ranks"),), hidden=_hidden_allreduce,
            references=("utils.cluster.ring_allreduce_bytes",)),
        Exercise(
            name="pipeline_bubble", points=1, title="GPipe's bubble fraction",
            expected=_bubble_ref, compare=close(1e-9, 1e-12),
            public=(Case((2, 4), label="2 stages, 4 micro-batches"),), hidden=_hidden_bubble,
            references=("utils.cluster.bubble_fraction",)),
        Exercise(
            name="fit_latency_bandwidth", points=2, title="The alpha-beta fit",
            expected=_fit_ref, compare=_pair_close(1e-4),
            public=(_fit_case(random.Random(3), 5e-5, 1e10),),
            hidden=_hidden_fit, hint="least squares of t = alpha + n * (1 / beta): a line in n",
            references=("utils.cluster.fit_alpha_beta",)),
        Exercise(
            name="kv_bytes_per_rank", points=2, title="KV-cache bytes per rank of a TP x PP plan",
            expected=_kv_ref, compare=exact(),
            public=(Case((32, 32, 128, 4096, 1, 2, 1, 2), label="Llama-2-7B, TP 2, fp16"),),
            hidden=_hidden_kv, hint="a rank holds at least one KV head; the largest stage counts",
            references=("utils.cluster.memory_per_rank",)),
        Exercise(
            name="ANSWER_DATA_PARALLEL", points=1, kind="value",
            title="What data parallelism buys at inference",
            expected=_dp_answer, compare=choice(),
            public=(Case(label="your answer is one of 'a', 'b', 'c', 'd' (graded on submission)",
                         compare=one_of(DP_OPTIONS), expected="a", graded=False),),
            hidden=lambda rng: [Case(label="the answer")],
            hint="each request still runs on one replica"),
    ),
)
