"""Chapter 01: operator fusion and graph compilation, by the memory-traffic model.

Fusion does not lower the arithmetic: a fused chain of element-wise operators does exactly the
FLOPs of the unfused chain. What it removes is memory traffic (each unfused operator reads its
inputs from memory and writes its output back; a fused kernel reads the chain's inputs once and
writes its output once) and per-operator overhead (kernel launches, dispatch, allocation). A
common claim is the opposite ("fusion lowers computational complexity"); the course teaches the
traffic model instead and measures it.

What is here, each checked against a library where one exists:
- Byte/FLOP counts of an element-wise chain, unfused vs fused, and the predicted speed-up when
  memory-bound (``chain_traffic``, ``predicted_speedup``); three runners of one chain: eager
  PyTorch, hand-fused by cache tiling, and ``torch.compile`` (Inductor's generated C++ loop).
- Softmax three ways: naive, safe (max-subtracted) and online (Milakov and Gimelshein,
  "Online normalizer calculation for softmax", 2018, Sec. 3: 4 memory accesses per element for
  safe softmax, 3 for the online form), and FlashAttention's recurrence built on it (Dao et al.
  2022, Algorithm 1, lines 10-12: the output rescaled as the running max moves), checked against
  ``torch.nn.functional.scaled_dot_product_attention``, with its memory-traffic count.
- GEMM epilogue fusion (bias + GELU applied before C leaves the kernel): its byte model and a
  prediction from a measured GEMM time and bandwidth.
- Horizontal fusion (Q, K and V projections as one GEMM), folding a norm's scale into the next
  linear layer, BatchNorm into a convolution (checked against ``torch.nn.utils.fusion``), RoPE
  sin/cos tables precomputed (Su et al., RoFormer, 2021, Sec. 3.4.2; checked against
  transformers), split-K and row/column splits of a matmul.
- Graphs: a course-written Llama decoder block built from the teacher's weights (traceable by
  ``torch.fx.symbolic_trace``), FX passes that remove identity and dead operators and rewrite a
  pattern into a fused operator, and helpers to compile blocks with ``torch.compile``.

``report_rows()`` measures the chapter's headline cases for ``python -m utils.report 01``.
"""

from __future__ import annotations

import copy
import math
import operator
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The course model lives in utils.llama; chapter 01 uses (and its notebook names) these parts.
from utils.llama import (CourseDecoderBlock, CourseLlama, CourseRMSNorm, apply_rope,  # noqa: F401
                         rms_norm_reference, rope_tables, rotate_half)
from utils.validation import check_positive_int, check_tensor

CHAPTER = "01"  # found by utils.report; notebooks/01_*.ipynb, solutions/lab01_*.ipynb

# --------------------------------------------------------------------------- byte/FLOP model


@dataclass(frozen=True)
class ElementwiseOp:
    """One element-wise operator of a chain.

    ``tensor_inputs`` counts the full-size tensors it reads (the chain's running value included;
    a broadcast bias vector or a scalar counts 0 since its bytes are negligible);
    ``flops`` is the arithmetic per output element (a count, not a time: GELU's erf costs tens).
    """

    name: str
    tensor_inputs: int
    flops: int


# bias + GELU + scale + residual: the epilogue of a transformer MLP or attention projection.
BIAS_GELU_SCALE_RESIDUAL: tuple[ElementwiseOp, ...] = (
    ElementwiseOp("add bias", 1, 1),
    ElementwiseOp("gelu (erf)", 1, 20),
    ElementwiseOp("mul scale", 1, 1),
    ElementwiseOp("add residual", 2, 1),
)


def _check_chain(ops: Sequence[ElementwiseOp]) -> None:
    if not ops or not all(isinstance(op, ElementwiseOp) for op in ops):
        raise ValueError("ops must be a non-empty sequence of ElementwiseOp")
    if ops[0].tensor_inputs < 1 or any(op.tensor_inputs < 1 for op in ops[1:]):
        raise ValueError("every op must read at least one full-size tensor (the running value)")


def chain_traffic(ops: Sequence[ElementwiseOp], numel: int, bytes_per_value: float = 4,
                  write_allocate: bool = False) -> dict[str, float]:
    """Bytes moved and FLOPs of an element-wise chain on tensors of ``numel`` elements.

    Unfused: every operator reads its ``tensor_inputs`` from memory and writes its output, so the
    bytes are sum(tensor_inputs + 1) x numel x bytes. Fused: one kernel reads the chain's external
    inputs once (the first op's inputs plus each later op's extra inputs) and writes one output.
    FLOPs are the same both ways. ``write_allocate=True`` counts each write twice, as a CPU cache
    does without streaming stores (it reads the line before writing it).
    """
    _check_chain(ops)
    check_positive_int("numel", numel)
    if not bytes_per_value > 0:
        raise ValueError(f"bytes_per_value must be > 0, got {bytes_per_value!r}")
    w = 2 if write_allocate else 1
    unfused_reads = sum(op.tensor_inputs for op in ops)
    fused_reads = ops[0].tensor_inputs + sum(op.tensor_inputs - 1 for op in ops[1:])
    return {
        "unfused_bytes": float((unfused_reads + w * len(ops)) * numel * bytes_per_value),
        "fused_bytes": float((fused_reads + w) * numel * bytes_per_value),
        "flops": float(sum(op.flops for op in ops) * numel),
        "unfused_kernels": len(ops),
        "fused_kernels": 1,
    }


def predicted_speedup(ops: Sequence[ElementwiseOp], numel: int, bytes_per_value: float = 4, *,
                      bandwidth: float | None = None, overhead_s: float = 0.0,
                      write_allocate: bool = False) -> float:
    """Predicted time(unfused) / time(fused).

    Without ``bandwidth``: the memory-bound limit, unfused bytes / fused bytes. With it (bytes/s),
    the time model t = kernels x overhead_s + bytes / bandwidth, which tends to the kernel-count
    ratio for tiny tensors and to the byte ratio for huge ones.
    """
    t = chain_traffic(ops, numel, bytes_per_value, write_allocate)
    if bandwidth is None:
        return t["unfused_bytes"] / t["fused_bytes"]
    if not bandwidth > 0 or overhead_s < 0:
        raise ValueError(f"bandwidth must be > 0 and overhead_s >= 0, got {bandwidth}, "
                         f"{overhead_s}")
    unfused = t["unfused_kernels"] * overhead_s + t["unfused_bytes"] / bandwidth
    fused = t["fused_kernels"] * overhead_s + t["fused_bytes"] / bandwidth
    return unfused / fused


def measure_bandwidth(numel: int = 2**24, min_run_time: float = 0.3) -> float:
    """Achievable memory bandwidth (bytes/s) of a copy of ``numel`` fp32 values, counted as one
    read and one write (the same counting as ``chain_traffic``): chapter 00's
    ``utils.bench.measure_bandwidth`` at the chain's tensor size."""
    from utils.bench import measure_bandwidth as measure_stream

    check_positive_int("numel", numel)
    return measure_stream(numel * 4, "copy", min_run_time=min_run_time)["bytes_per_s"]


# --------------------------------------------------------------------------- the chain, 3 ways


def _check_chain_args(x, bias, residual):
    for name, value in (("x", x), ("bias", bias), ("residual", residual)):
        check_tensor(name, value)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)}")
    if bias.shape != x.shape[-1:]:
        raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")


def bias_gelu_scale_residual(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                             scale: float = 0.5) -> torch.Tensor:
    """Eager reference: ``gelu(x + bias) * scale + residual``, four operators, four passes."""
    return F.gelu(x + bias) * scale + residual


# Below this many elements per tensor the tiled path runs on the calling thread: handing work
# to another thread costs tens of microseconds, more than the whole chain takes on small tensors.
TILED_PARALLEL_MIN_NUMEL = 2**18  # 1 MiB of fp32 per tensor

_POOLS: dict = {}  # worker count -> ThreadPoolExecutor, created on first use, reused after


def _worker_pool(workers: int):
    """One thread pool per worker count, created on the first call that needs it and reused by
    every later call (creating a pool per call costs more than a small chain takes)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="fusion-tiled")
    return pool


def bias_gelu_scale_residual_into(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                                  scale: float = 0.5, *, out: torch.Tensor) -> torch.Tensor:
    """Eager, into a preallocated ``out``: the same four operators and the same nine tensor
    passes as ``bias_gelu_scale_residual`` (each in-place operator still reads and writes the
    whole tensor), but no new allocation, so no fresh pages to fault in."""
    _check_chain_args(x, bias, residual)
    check_tensor("out", out)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must have the shape and dtype of x {tuple(x.shape)} {x.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    torch.add(x, bias, out=out)
    torch.ops.aten.gelu_(out)
    out.mul_(scale)
    return out.add_(residual)


def bias_gelu_scale_residual_tiled(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                                   scale: float = 0.5, block_rows: int | None = None,
                                   block_bytes: int = 128 * 1024, workers: int | None = None,
                                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Hand-fused by cache tiling: the same four operators, run tile by tile on rows small
    enough (``block_bytes``, default 128 KiB) to stay in the L2 cache between operators, in place
    on one reused buffer. Main memory then sees the fused traffic: x and residual read once, the
    output written once. Still four (cheap) operator calls per tile.

    Like Inductor's loop, each of ``workers`` threads (default: torch's thread count) takes a
    contiguous range of rows and runs the whole chain on it; a 128 KiB tile (32768 floats) is at
    PyTorch's parallel grain size, so each operator runs on its worker's core with no
    thread-pool barrier between operators. The worker threads come from a pool created once and
    reused; below ``TILED_PARALLEL_MIN_NUMEL`` elements everything runs on the calling thread.
    ``out`` (optional) receives the result instead of a new tensor."""
    _check_chain_args(x, bias, residual)
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    rows, cols = x2.shape
    if block_rows is None:
        block_rows = max(1, block_bytes // (cols * x.element_size()))
    check_positive_int("block_rows", block_rows)
    workers = workers or torch.get_num_threads()
    check_positive_int("workers", workers)
    if out is None:
        out2 = torch.empty_like(x2)
    else:
        check_tensor("out", out)
        if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous tensor of the shape and dtype of x "
                             f"{tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
        out2 = out.view(-1, cols)

    def run(lo: int, hi: int) -> None:
        buf = torch.empty(min(block_rows, hi - lo), cols, dtype=x.dtype)
        for start in range(lo, hi, block_rows):
            stop = min(hi, start + block_rows)
            b = buf[: stop - start]
            torch.add(x2[start:stop], bias, out=b)        # read x (DRAM), write b (cache)
            torch.ops.aten.gelu_(b)                       # in cache
            b.mul_(scale)                                 # in cache
            torch.add(b, r2[start:stop], out=out2[start:stop])  # read residual, write out (DRAM)

    if x2.numel() < TILED_PARALLEL_MIN_NUMEL:
        workers = 1
    bounds = [rows * i // workers for i in range(workers + 1)]
    ranges = [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]
    if len(ranges) == 1:
        run(*ranges[0])
    else:
        futures = [_worker_pool(len(ranges) - 1).submit(run, lo, hi) for lo, hi in ranges[1:]]
        run(*ranges[0])  # the calling thread takes the first range itself
        for f in futures:
            f.result()  # re-raises a worker's error
    return out2.view_as(x) if out is None else out


def compiled_chain(dynamic: bool = False) -> Callable:
    """``torch.compile`` (Inductor) of the eager chain: one generated C++ loop on CPU (Triton on a
    GPU). Compiles on the first call per input shape (tens of seconds cold, about 2 s warm)."""
    return torch.compile(bias_gelu_scale_residual, dynamic=dynamic)


def _chain_into(x, bias, residual, scale, out):
    return torch.add(F.gelu(x + bias) * scale, residual, out=out)


def compiled_chain_into(dynamic: bool = False) -> Callable:
    """``torch.compile`` of the chain writing into a preallocated ``out`` (the last argument):
    Inductor's loop stores straight into ``out``, so no output is allocated per call."""
    return torch.compile(_chain_into, dynamic=dynamic)


def inductor_code(fn: Callable, *args, **kwargs) -> tuple[object, str]:
    """Run a compiled ``fn`` once and return ``(result, generated source)`` that Inductor wrote
    (``torch._inductor.utils.run_and_get_code``)."""
    from torch._inductor.utils import run_and_get_code

    result, codes = run_and_get_code(fn, *args, **kwargs)
    return result, "\n".join(codes)


def kernel_source(code: str, max_lines: int = 60) -> str:
    """The C++ kernel part of Inductor's CPU output code (the ``cpp_fused_*`` source string)."""
    lines = code.splitlines()
    start = next((i for i, line in enumerate(lines) if "cpp_fused" in line and "'''" in line),
                 None)
    if start is None:
        start = next((i for i, line in enumerate(lines) if "cpp_fused" in line), 0)
    end = next((i for i in range(start + 1, len(lines)) if "'''" in lines[i]), len(lines))
    return "\n".join(lines[start:min(end + 1, start + max_lines)])


# --------------------------------------------------------------------------- softmax

# memory accesses per element (reads + writes) of each variant, Milakov and Gimelshein 2018, Sec. 3
SOFTMAX_ACCESSES = {"naive": 3, "safe": 4, "online": 3}


def softmax_naive(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x) / sum exp(x): two passes (sum, normalise), overflows once x > ~88 in float32."""
    check_tensor("x", x)
    e = torch.exp(x)
    return e / e.sum(dim, keepdim=True)


def softmax_safe(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum exp(x - max): same value, no overflow, but three passes over x."""
    check_tensor("x", x)
    m = x.amax(dim, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(dim, keepdim=True)


def online_softmax_stats(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the last dimension in blocks, carrying the running max m and the running
    sum d of exp(x - m):

        m_new = max(m, max_j x_j)        d_new = d * exp(m - m_new) + sum_j exp(x_j - m_new)

    Returns (m, d) per row. A row that is all -inf keeps m = -inf and d = 0."""
    check_tensor("x", x)
    check_positive_int("block", block)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    m = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype)
    d = torch.zeros(x.shape[:-1], dtype=x.dtype)
    for start in range(0, x.shape[-1], block):
        xb = x[..., start:start + block]
        m_new = torch.maximum(m, xb.amax(-1))
        # where every value so far is -inf, shift by 0 instead (avoids -inf - -inf = nan)
        shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        d = d * torch.exp(m - shift) + torch.exp(xb - shift.unsqueeze(-1)).sum(-1)
        m = m_new
    return m, d


def softmax_online(x: torch.Tensor, dim: int = -1, block: int = 128) -> torch.Tensor:
    """Online softmax: one pass for (max, sum) by ``online_softmax_stats``, one to normalise.
    Matches ``torch.softmax``, including NaN on a row that is entirely -inf."""
    check_tensor("x", x)
    xt = x.movedim(dim, -1)
    m, d = online_softmax_stats(xt, block)
    return (torch.exp(xt - m.unsqueeze(-1)) / d.unsqueeze(-1)).movedim(-1, dim)


# --------------------------------------------------------------------------- FlashAttention


def flash_attention_update(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor,
                           scores: torch.Tensor, values: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of FlashAttention's recurrence (Dao et al. 2022, Algorithm 1, lines 10-12): the
    online-softmax state ``(m, l)`` of each query row plus its normalised output ``o``, updated
    with one block of scores ``S_j`` (rows x block) and the block's values ``V_j`` (block x Dv):

        m~ = rowmax(S_j),  P~ = exp(S_j - m~),  l~ = rowsum(P~)
        m' = max(m, m~),   l' = e^(m - m') l + e^(m~ - m') l~
        O' = (l e^(m - m') O + e^(m~ - m') P~ V_j) / l'

    ``(m, l)`` is Milakov and Gimelshein's (max, normaliser) pair; the new part is O, rescaled
    by e^(m - m') l / l' whenever the running max moves. Start from m = -inf, l = 0, O = 0.
    Scores may hold -inf (masked keys); a row whose scores are all -inf so far keeps m = -inf,
    l = 0, O = 0 (shifts by 0 instead of -inf, as ``online_softmax_stats`` does)."""
    for name, value in (("m", m), ("l", l), ("o", o), ("scores", scores), ("values", values)):
        check_tensor(name, value)
    if scores.dim() < 1 or scores.shape[-1] == 0:
        raise ValueError(f"scores must hold a non-empty block, got shape {tuple(scores.shape)}")
    if values.shape[-2:-1] != scores.shape[-1:]:
        raise ValueError(f"values must have {scores.shape[-1]} rows (the block size of scores), "
                         f"got shape {tuple(values.shape)}")
    if m.shape != scores.shape[:-1] or l.shape != m.shape or o.shape[:-1] != m.shape:
        raise ValueError(f"m, l must have shape {tuple(scores.shape[:-1])} and o that plus "
                         f"(Dv,), got {tuple(m.shape)}, {tuple(l.shape)}, {tuple(o.shape)}")
    m_blk = scores.amax(-1)
    m_new = torch.maximum(m, m_blk)
    shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(scores - shift.unsqueeze(-1))              # e^(m~ - m') P~, in one step
    alpha = torch.exp(m - shift)                             # e^(m - m'): 0 on the first block
    l_new = alpha * l + p.sum(-1)
    safe = torch.where(l_new > 0, l_new, torch.ones_like(l_new))
    o_new = ((alpha * l).unsqueeze(-1) * o + p @ values) / safe.unsqueeze(-1)
    return m_new, l_new, o_new


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              block: int = 64, causal: bool = False,
                              scale: float | None = None) -> torch.Tensor:
    """Attention softmax(q k^T * scale) v computed FlashAttention's way: K and V in blocks of
    ``block`` keys, each query row carrying its running max, running denominator and rescaled
    output (``flash_attention_update``). The largest intermediate is one (Tq, block) block of
    scores; the (Tq, Tk) score matrix is never formed. Shapes as
    ``torch.nn.functional.scaled_dot_product_attention``: q (..., Tq, D), k (..., Tk, D),
    v (..., Tk, Dv); ``causal`` masks key j > query i (top-left aligned, as SDPA's
    ``is_causal``); ``scale`` defaults to 1/sqrt(D). Eager PyTorch: a readable reference, not
    a fast kernel (chapter 09 writes that in Triton)."""
    for name, value in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, value)
    check_positive_int("block", block)
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"q, k, v must have the same number (>= 2) of dimensions, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1] or v.shape[-2] != k.shape[-2] or k.shape[-2] == 0:
        raise ValueError(f"need k (..., Tk, D) with q's D and v (..., Tk, Dv), Tk > 0, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    t_q, t_k = q.shape[-2], k.shape[-2]
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    m = torch.full((*batch, t_q), -math.inf, dtype=q.dtype)
    l = torch.zeros((*batch, t_q), dtype=q.dtype)
    o = torch.zeros((*batch, t_q, v.shape[-1]), dtype=q.dtype)
    rows = torch.arange(t_q).unsqueeze(-1)
    for start in range(0, t_k, block):
        stop = min(t_k, start + block)
        s = (q @ k[..., start:stop, :].transpose(-1, -2)) * scale   # (..., Tq, block) only
        if causal:
            s = s.masked_fill(torch.arange(start, stop) > rows, -math.inf)
        m, l, o = flash_attention_update(m, l, o, s, v[..., start:stop, :])
    return o


def attention_traffic(seq_len: int, head_dim: int, block_q: int = 128,
                      bytes_per_value: float = 4) -> dict[str, float]:
    """Main-memory bytes of one attention head's forward, T = ``seq_len``, d = ``head_dim``.

    Standard (Dao et al. 2022, Algorithm 0): read Q, K, write S = QK^T (T x T); read S, write
    P = softmax(S); read P and V, write O: (4 T d + 4 T^2) values. FlashAttention with query
    blocks of ``block_q`` rows outer (each block's O, l, m stay on chip): read Q once, K and V
    once per query block, write O once: (2 T d + 2 T d ceil(T / block_q)) values, no T x T term.
    """
    for name, value in (("seq_len", seq_len), ("head_dim", head_dim), ("block_q", block_q)):
        check_positive_int(name, value)
    if not bytes_per_value > 0:
        raise ValueError(f"bytes_per_value must be > 0, got {bytes_per_value!r}")
    t, d = seq_len, head_dim
    standard = (4 * t * d + 4 * t * t) * bytes_per_value
    flash = (2 * t * d + 2 * t * d * math.ceil(t / block_q)) * bytes_per_value
    return {"standard_bytes": float(standard), "flash_bytes": float(flash),
            "score_matrix_bytes": float(t * t * bytes_per_value),
            "ratio": standard / flash}


# --------------------------------------------------------------------------- GEMM epilogue


def gemm_epilogue_traffic(m: int, n: int, k: int, epilogue_passes: int = 1,
                          bytes_per_value: float = 4) -> dict[str, float]:
    """Bytes of C = act(A @ W + b), A (m, k), W (k, n), C (m, n), with and without epilogue fusion.

    The GEMM itself reads A and W and writes C once (the bias vector's n values counted too).
    Unfused, each of ``epilogue_passes`` element-wise operators after it reads C and writes it
    again (``x @ w + b`` then ``gelu``: 2 passes; ``addmm`` then ``gelu``: 1); fused, the bias
    and activation are applied in registers before the single write. FLOPs: 2 m n k either way
    (plus the activation's, also the same both ways)."""
    for name, value in (("m", m), ("n", n), ("k", k)):
        check_positive_int(name, value)
    if isinstance(epilogue_passes, bool) or not isinstance(epilogue_passes, int) \
            or epilogue_passes < 0:
        raise ValueError(f"epilogue_passes must be an int >= 0, got {epilogue_passes!r}")
    if not bytes_per_value > 0:
        raise ValueError(f"bytes_per_value must be > 0, got {bytes_per_value!r}")
    gemm = (m * k + k * n + n + m * n) * bytes_per_value
    epilogue = epilogue_passes * 2 * m * n * bytes_per_value
    return {"gemm_bytes": float(gemm), "epilogue_bytes": float(epilogue),
            "unfused_bytes": float(gemm + epilogue), "fused_bytes": float(gemm),
            "flops": float(2 * m * n * k), "byte_ratio": (gemm + epilogue) / gemm}


def predicted_epilogue_speedup(m: int, n: int, k: int, gemm_s: float, bandwidth: float,
                               passes_before: int, passes_after: int,
                               bytes_per_value: float = 4) -> float:
    """Predicted time(before) / time(after) when fusion removes epilogue passes:
    t = gemm_s + passes x 2 m n bytes / bandwidth, with ``gemm_s`` the measured time of the bare
    GEMM (which already writes C once) and ``bandwidth`` a measured copy bandwidth (bytes/s)."""
    if not gemm_s > 0 or not bandwidth > 0:
        raise ValueError(f"gemm_s and bandwidth must be > 0, got {gemm_s}, {bandwidth}")
    before = gemm_epilogue_traffic(m, n, k, passes_before, bytes_per_value)["epilogue_bytes"]
    after = gemm_epilogue_traffic(m, n, k, passes_after, bytes_per_value)["epilogue_bytes"]
    return (gemm_s + before / bandwidth) / (gemm_s + after / bandwidth)


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eager ``gelu(x @ w + b)``: a GEMM, then two element-wise passes over C (add, GELU)."""
    return F.gelu(x @ w + b)


def addmm_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``gelu(addmm(b, x, w))``: the bias folded into the GEMM call (BLAS starts C from the bias),
    then one GELU pass over C."""
    return F.gelu(torch.addmm(b, x, w))


# --------------------------------------------------------------------------- horizontal fusion


class FusedQKV(nn.Module):
    """Q, K and V projections as one GEMM: the three weight matrices stacked along the output
    dimension, one read of the input, one call; the output split back into q, k, v."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear):
        super().__init__()
        projs = (q_proj, k_proj, v_proj)
        if not all(isinstance(p, nn.Linear) for p in projs):
            raise TypeError("q_proj, k_proj and v_proj must be nn.Linear")
        if len({p.in_features for p in projs}) != 1:
            raise ValueError(f"q, k, v projections must share in_features, got "
                             f"{[p.in_features for p in projs]}")
        has_bias = [p.bias is not None for p in projs]
        if len(set(has_bias)) != 1:
            raise ValueError("q, k, v projections must all have a bias or all have none")
        self.sizes = [p.out_features for p in projs]
        self.qkv = nn.Linear(q_proj.in_features, sum(self.sizes), bias=has_bias[0])
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([p.weight for p in projs], 0))  # (Nq+Nk+Nv, C)
            if has_bias[0]:
                self.qkv.bias.copy_(torch.cat([p.bias for p in projs], 0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.qkv(x).split(self.sizes, dim=-1))


# --------------------------------------------------------------------------- folding


@torch.no_grad()
def fold_norm_into_linears(norm: nn.Module, linears: Sequence[nn.Linear]) -> None:
    """Fold a normalisation's elementwise affine (weight g, optional bias beta) into the linear
    layers that read its output, in place, exactly:

        W (g * n + beta) + c = (W diag(g)) n + (W beta + c)

    so W <- W * g (each column scaled), c <- c + W beta, then g <- 1, beta <- 0. Works for
    ``nn.LayerNorm``, ``nn.RMSNorm`` and transformers' ``LlamaRMSNorm`` (attribute ``weight``)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise TypeError(f"norm must have a 1-D .weight (LayerNorm/RMSNorm), "
                        f"got {type(norm).__name__}")
    if not linears or not all(isinstance(lin, nn.Linear) for lin in linears):
        raise TypeError("linears must be a non-empty sequence of nn.Linear")
    for lin in linears:
        if lin.in_features != weight.numel():
            raise ValueError(f"linear in_features {lin.in_features} != norm size {weight.numel()}")
    beta = getattr(norm, "bias", None)
    for lin in linears:
        if beta is not None:
            shift = lin.weight @ beta  # uses the unscaled W
            if lin.bias is None:
                lin.bias = nn.Parameter(shift.clone())
            else:
                lin.bias.add_(shift)
        lin.weight.mul_(weight.unsqueeze(0))  # (N, C) * (1, C)
    weight.fill_(1.0)
    if beta is not None:
        beta.zero_()


def fold_llama_norms(model: nn.Module) -> nn.Module:
    """A copy of a transformers Llama model with every decoder layer's two RMSNorm weights folded
    into q/k/v and gate/up projections. The final norm is left alone: the teacher ties lm_head to
    the embedding, so folding into lm_head would change the input embeddings too."""
    model = copy.deepcopy(model)
    layers = model.model.layers
    for layer in layers:
        att, mlp = layer.self_attn, layer.mlp
        fold_norm_into_linears(layer.input_layernorm, [att.q_proj, att.k_proj, att.v_proj])
        fold_norm_into_linears(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    return model


@torch.no_grad()
def fold_batchnorm_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv equal to bn(conv(x)) in eval mode:
    w' = w * gamma / sqrt(var + eps) (per output channel), b' = (b - mean) * gamma / sqrt(var + eps)
    + beta. Check against ``torch.nn.utils.fusion.fuse_conv_bn_eval``."""
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError("conv must be nn.Conv2d and bn nn.BatchNorm2d")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn has {bn.num_features} features, conv {conv.out_channels} outputs")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn must track running statistics to be folded")
    fused = copy.deepcopy(conv)
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    fused.weight.copy_(conv.weight * factor.reshape(-1, 1, 1, 1))
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((b - bn.running_mean) * factor + beta)
    return fused


# --------------------------------------------------------------------------- operator splitting


def _check_matmul(a, b, parts, dim_name, dim_size):
    check_tensor("a", a)
    check_tensor("b", b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a and b must be 2-D with a.shape[1] == b.shape[0], got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    check_positive_int("parts", parts)
    if parts > dim_size:
        raise ValueError(f"parts must be <= {dim_name} = {dim_size}, got {parts}")


def matmul_split_k(a: torch.Tensor, b: torch.Tensor, parts: int) -> torch.Tensor:
    """A @ B = sum_p A[:, K_p] @ B[K_p, :]: each part is an independent partial product (another
    core or device), then one reduction. Equal up to float rounding (the sum order changes)."""
    _check_matmul(a, b, parts, "K", a.shape[1] if a.dim() == 2 else 0)
    return sum(ap @ bp for ap, bp in zip(a.tensor_split(parts, 1), b.tensor_split(parts, 0)))


def matmul_split_rows(a: torch.Tensor, b: torch.Tensor, parts: int) -> torch.Tensor:
    """Row split: each part computes A[M_p, :] @ B, the results concatenated; no reduction."""
    _check_matmul(a, b, parts, "M", a.shape[0] if a.dim() == 2 else 0)
    return torch.cat([ap @ b for ap in a.tensor_split(parts, 0)], 0)


def matmul_split_cols(a: torch.Tensor, b: torch.Tensor, parts: int) -> torch.Tensor:
    """Column split: each part computes A @ B[:, N_p] (a column-parallel linear layer)."""
    _check_matmul(a, b, parts, "N", b.shape[1] if b.dim() == 2 else 0)
    return torch.cat([a @ bp for bp in b.tensor_split(parts, 1)], 1)


def matmul_split_threads(a: torch.Tensor, b: torch.Tensor, parts: int,
                         split: str = "cols") -> torch.Tensor:
    """Run the ``parts`` pieces of a row or column split on ``parts`` Python threads at once
    (torch releases the GIL inside a matmul), as tensor parallelism runs them on devices. Set
    ``torch.set_num_threads(1)`` around it to see the split alone supply the parallelism."""
    from concurrent.futures import ThreadPoolExecutor

    if split not in ("rows", "cols"):
        raise ValueError(f"split must be 'rows' or 'cols', got {split!r}")
    dim_size = (a.shape[0] if split == "rows" else b.shape[1]) if a.dim() == b.dim() == 2 else 0
    _check_matmul(a, b, parts, "M" if split == "rows" else "N", dim_size)
    pieces = a.tensor_split(parts, 0) if split == "rows" else b.tensor_split(parts, 1)
    work = (lambda p: p @ b) if split == "rows" else (lambda p: a @ p)
    with ThreadPoolExecutor(max_workers=parts) as pool:
        outs = list(pool.map(work, pieces))
    return torch.cat(outs, 0 if split == "rows" else 1)


# --------------------------------------------------------------------------- compiling the model


def compile_blocks(model: CourseLlama) -> CourseLlama:
    """A copy of ``model`` whose blocks each run ``torch.compile(block)``. The blocks share one
    class, and Dynamo passes their parameters as graph inputs, so one compilation per input shape
    serves all of them."""
    if not isinstance(model, CourseLlama):
        raise TypeError(f"model must be a CourseLlama, got {type(model).__name__}")
    compiled = copy.copy(model)
    compiled._modules = dict(model._modules)  # a shallow copy would share (and change) this dict
    compiled.blocks = nn.ModuleList([torch.compile(b, dynamic=False) for b in model.blocks])
    return compiled


@torch.inference_mode()
def greedy_generate_window(model: nn.Module, ids: torch.Tensor, new_tokens: int,
                           window: int) -> torch.Tensor:
    """Greedy generation without a KV cache over a fixed window of the last ``window`` tokens:
    every step is a full forward of the same shape, so a compiled model compiles once. (The
    KV-cache chapter removes the recomputation.)"""
    check_positive_int("new_tokens", new_tokens)
    check_positive_int("window", window)
    if ids.dim() != 2 or ids.shape[1] < window:
        raise ValueError(f"ids must be (B, T) with T >= window={window}, got {tuple(ids.shape)}")
    for _ in range(new_tokens):
        logits = model(ids[:, -window:])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# --------------------------------------------------------------------------- FX passes


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation-times-gate as one operator: silu(a) * b, computed in place on the
    silu output (one allocation fewer than the two-operator form; same value)."""
    return F.silu(a).mul_(b)



_IDENTITY_MODULES = (nn.Identity,)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _is_identity(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        mod = modules.get(node.target)
        return isinstance(mod, _IDENTITY_MODULES) or (
            isinstance(mod, _DROPOUT_MODULES) and (not mod.training or mod.p == 0))
    if node.op == "call_function":
        if node.target is F.dropout:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            return training is False or p == 0
        if node.target in (operator.mul, torch.mul) and len(node.args) == 2:
            return isinstance(node.args[0], torch.fx.Node) and node.args[1] == 1 \
                and _same_dtype_after(node, node.args[0])
        if node.target in (operator.add, torch.add, operator.sub) and len(node.args) == 2:
            return isinstance(node.args[0], torch.fx.Node) and node.args[1] == 0 \
                and _same_dtype_after(node, node.args[0])
    if node.op == "call_method" and node.args and isinstance(node.args[0], torch.fx.Node):
        src = node.args[0].meta.get("tensor_meta")
        if src is None:
            return False
        if node.target == "float" and len(node.args) == 1:
            return src.dtype == torch.float32
        if node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
            return src.dtype == node.args[1] and not node.kwargs
        if node.target == "contiguous" and len(node.args) == 1:
            return src.is_contiguous if hasattr(src, "is_contiguous") else False
    return False


def _same_dtype_after(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    # x * 1 and x + 0 are identities on floating tensors; integer tensors times a float 1.0
    # would promote, so without shape propagation we only accept them when dtypes are known equal
    a, b = node.meta.get("tensor_meta"), src.meta.get("tensor_meta")
    return a is None or b is None or a.dtype == b.dtype


def remove_dead_code(gm: torch.fx.GraphModule) -> int:
    """Delete nodes whose value nobody uses (walking the graph backwards), keeping placeholders,
    the output and impure nodes (in-place or random ops). Returns how many were removed. The
    library does the same: ``gm.graph.eliminate_dead_code()``."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users or node.is_impure():
            continue
        gm.graph.erase_node(node)
        removed += 1
    gm.graph.lint()
    gm.recompile()
    return removed


def remove_identity_ops(gm: torch.fx.GraphModule, *example_inputs) -> int:
    """Replace every identity operator by its input, then delete what became dead: dropout at
    inference (module or functional), ``nn.Identity``, ``x * 1``, ``x + 0``, and, when
    ``example_inputs`` are given (dtypes and layouts found by ``ShapeProp``), ``.float()`` or
    ``.to(dtype)`` on a tensor already of that dtype and ``.contiguous()`` on a contiguous one.
    Returns how many nodes were removed."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    if example_inputs:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*example_inputs)
    modules = dict(gm.named_modules())
    before = len(gm.graph.nodes)
    for node in list(gm.graph.nodes):
        if _is_identity(node, modules):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    remove_dead_code(gm)
    for name, mod in list(gm.named_children()):  # drop submodules no node calls any more
        if isinstance(mod, _IDENTITY_MODULES + _DROPOUT_MODULES) and not any(
                n.op == "call_module" and n.target == name for n in gm.graph.nodes):
            delattr(gm, name)
    gm.recompile()
    return before - len(gm.graph.nodes)


def fuse_silu_mul(gm: torch.fx.GraphModule) -> int:
    """Pattern rewrite, by hand: ``mul(silu(a), b)`` (either operand order) where the silu has no
    other user becomes one ``silu_mul(a, b)`` node. Returns the number of rewrites."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule, got {type(gm).__name__}")

    def is_silu(n):
        return isinstance(n, torch.fx.Node) and len(n.users) == 1 and (
            (n.op == "call_function" and n.target in (F.silu, torch.nn.functional.silu))
            or (n.op == "call_method" and n.target == "silu"))

    count = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target in (operator.mul, torch.mul)
                and len(node.args) == 2 and not node.kwargs):
            continue
        left, right = node.args
        if is_silu(left):
            silu, other = left, right
        elif is_silu(right):
            silu, other = right, left
        else:
            continue
        if not isinstance(other, torch.fx.Node):
            continue
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(silu_mul, (silu.args[0], other))
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(silu)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return count


def _rms_pattern_fp32_cast(x, weight):
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + 1e-5))


def _rms_pattern(x, weight):  # the same once an identity pass has removed the .float()
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + 1e-5))


def _rms_replacement(x, weight):
    return F.rms_norm(x.float(), (x.shape[-1],), weight, 1e-5)


def fuse_rmsnorm(gm: torch.fx.GraphModule) -> int:
    """Pattern rewrite with the library's matcher (``torch.fx.subgraph_rewriter.replace_pattern``):
    the five-operator RMSNorm (eps 1e-5, the teacher's) becomes one ``F.rms_norm`` call."""
    from torch.fx import subgraph_rewriter

    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule, got {type(gm).__name__}")
    count = 0
    for pattern in (_rms_pattern_fp32_cast, _rms_pattern):
        count += len(subgraph_rewriter.replace_pattern(gm, pattern, _rms_replacement))
    gm.recompile()
    return count


def count_ops(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Nodes by kind: how many call_function/call_method/call_module nodes a graph holds."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


# --------------------------------------------------------------------------- report


def chain_inputs(numel: int, cols: int = 1024, seed: int = 0):
    """Seeded ``(x, bias, residual)`` for the chain: x and residual (numel // cols, cols)."""
    check_positive_int("numel", numel)
    check_positive_int("cols", cols)
    g = torch.Generator().manual_seed(seed)
    rows = max(1, numel // cols)
    x = torch.randn(rows, cols, generator=g)
    return x, torch.randn(cols, generator=g), torch.randn(rows, cols, generator=g)


# 16 MiB per tensor: above the caches, below glibc's 32 MiB ceiling on its mmap threshold, so
# freed tensors are reused from the heap instead of mapped (and page-faulted) afresh every call.
BANDWIDTH_BOUND_NUMEL = 2**22


def report_rows(quick: bool = False) -> list[dict]:
    """Chapter 01's headline: each case's predicted and measured speed-up, measured in one run,
    with the achieved bandwidth (the byte model's bytes / measured time) beside the copy
    bandwidth measured in the same run. The chain runs at ``BANDWIDTH_BOUND_NUMEL`` floats per
    tensor. ``quick``: a 1 MiB chain, the small model and short timings (a smoke test)."""
    from utils.bench import compare
    from utils.bench import measure_bandwidth as measure_stream

    numel, min_run_time = (2**18, 0.05) if quick else (BANDWIDTH_BOUND_NUMEL, 0.2)

    threads = torch.get_num_threads()
    copy_gbs = measure_stream(numel * 4, "copy", min_run_time=min_run_time)["bytes_per_s"] / 1e9
    rows = []
    x, b, r = chain_inputs(numel)
    compiled = compiled_chain()
    compiled(x, b, r, 0.5)  # compile outside the timing
    res = compare({"eager": lambda: bias_gelu_scale_residual(x, b, r),
                   "tiled": lambda: bias_gelu_scale_residual_tiled(x, b, r),
                   "compiled": lambda: compiled(x, b, r, 0.5)}, min_run_time=min_run_time)
    t = chain_traffic(BIAS_GELU_SCALE_RESIDUAL, x.numel())
    pred = t["unfused_bytes"] / t["fused_bytes"]
    eager_gbs = t["unfused_bytes"] / res["eager"]["median_ms"] / 1e6
    for name in ("tiled", "compiled"):
        rows.append({"case": f"bias+gelu+scale+residual, {name} vs eager",
                     "shape": f"{tuple(x.shape)} fp32", "predicted": pred,
                     "measured": res[name]["speedup"],
                     "pred/meas": pred / res[name]["speedup"],
                     "eager GB/s": eager_gbs,
                     "fused GB/s": t["fused_bytes"] / res[name]["median_ms"] / 1e6,
                     "copy GB/s": copy_gbs, "threads": threads})
    torch.manual_seed(0)
    q, k, v = nn.Linear(384, 384, bias=False), nn.Linear(384, 128, bias=False), \
        nn.Linear(384, 128, bias=False)
    fused = FusedQKV(q, k, v)
    for tokens in (1, 256):
        h = torch.randn(1, tokens, 384)
        with torch.inference_mode():
            res = compare({"separate": lambda: (q(h), k(h), v(h)), "fused": lambda: fused(h)},
                          min_run_time=min_run_time)
        # traffic: the weights are read once either way; the input is read 3 times vs once
        wbytes, xbytes, ybytes = 384 * 640 * 4, tokens * 384 * 4, tokens * 640 * 4
        pred = (wbytes + 3 * xbytes + ybytes) / (wbytes + xbytes + ybytes)
        rows.append({"case": f"QKV one GEMM vs three, {tokens} token(s)",
                     "shape": f"(1, {tokens}, 384) fp32", "predicted": pred,
                     "measured": res["fused"]["speedup"],
                     "pred/meas": pred / res["fused"]["speedup"],
                     "eager GB/s": (wbytes + 3 * xbytes + ybytes) / res["separate"]["median_ms"]
                     / 1e6,
                     "fused GB/s": (wbytes + xbytes + ybytes) / res["fused"]["median_ms"] / 1e6,
                     "copy GB/s": copy_gbs, "threads": threads})
    row = _compiled_block_row(threads, min_run_time, "small" if quick else "teacher")
    threads_ = row.pop("threads")  # keys in the order of the other rows
    rows.append({**row, "eager GB/s": None, "fused GB/s": None, "copy GB/s": copy_gbs,
                 "threads": threads_})
    return rows


def _compiled_block_row(threads: int, min_run_time: float, name: str) -> dict:
    """One decoder block of the course model ``name``, compiled vs eager."""
    from utils.bench import compare
    from utils.models import load_course_model

    course = CourseLlama.from_llama(load_course_model(name)[0])
    block, T = course.blocks[0], 64
    x = torch.randn(1, T, block.q_proj.in_features, generator=torch.Generator().manual_seed(0))
    cos, sin = course.cos[:T], course.sin[:T]
    compiled = torch.compile(block, dynamic=False)
    with torch.inference_mode():
        compiled(x, cos, sin)
        res = compare({"eager": lambda: block(x, cos, sin),
                       "compiled": lambda: compiled(x, cos, sin)}, min_run_time=min_run_time)
    meas = res["compiled"]["speedup"]
    return {"case": f"{name} decoder block, torch.compile vs eager", "shape": f"(1, {T}) fp32",
            "predicted": None, "measured": meas, "pred/meas": None,
            "threads": threads}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``(fn(), seconds)``: wall time of one call, for one-off costs such as a compilation."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
