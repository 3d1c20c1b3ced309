"""Chapter 09: Triton kernels, checked on CPU in Triton's interpreter and timed on a CUDA GPU.

Each kernel comes as the Triton tutorials write them: the ``@triton.jit`` kernel, a Python
wrapper that allocates the output and launches a grid, and a check against a torch reference
(``check_kernels``); ``gpu_benchmarks`` times them on a GPU with ``triton.testing.do_bench``.

Where they run. Importing this module on a machine without CUDA sets ``TRITON_INTERPRET=1``
(unless the variable is already set): ``@triton.jit`` then returns an interpreted function that
runs each program of the grid in turn on CPU tensors with numpy. Results are real (that is how
the course checks every kernel in CI); interpreter timings mean nothing and are never shown as
speed. With a CUDA GPU the same kernels compile natively. Triton ships wheels for Linux x86-64
only; elsewhere (macOS, Windows) ``HAVE_TRITON`` is False and the wrappers raise with the reason.

What is here:
- the programming model: ``program_lanes`` (each program's offsets and mask), ``vector_add``;
- fused softmax, one row per program (the Triton tutorial "Fused Softmax"), the online variant
  for rows longer than a block (Milakov and Gimelshein 2018, Sec. 3), and their DRAM traffic by
  chapter 01's model (``softmax_traffic``: naive torch (8MN + 4M) values, fused 2MN);
- matmul with ``tl.dot``, grouped program ordering for L2 reuse (tutorial "Matrix
  Multiplication"; ``program_order``, ``blocks_loaded``) and a fused bias + GELU epilogue;
- LayerNorm (Ba et al. 2016, Eq. 4) and RMSNorm (Zhang and Sennrich 2019, Eq. 4) forward;
- FlashAttention forward (Dao 2023, FlashAttention-2, Algorithm 1: the output kept
  unnormalised until the last key block), causal, checked against
  ``scaled_dot_product_attention``;
- a weight-only int4 dequantize-GEMV on chapter 02's group-wise format
  (``utils.quantization.WeightOnlyGroupwiseLinear``: two 4-bit values per byte, low nibble
  first, one fp32 scale and uint8 zero point per group);
- debugging: ``copy_with_guard`` (a wrong mask caught by a guard band) and
  ``device_assert_fires`` (whether ``tl.device_assert`` is active here);
- ``predicted_gpu_times``: each kernel's time on a named GPU by the roofline of chapter 00
  (max(bytes / bandwidth, FLOPs / peak)) from the byte counts above.
"""

import math
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from utils.fusion import flash_attention_update, gemm_epilogue_traffic  # noqa: F401
from utils.quantization import (WeightOnlyGroupwiseLinear, WeightOnlyGroupwiseQuantHandler,
                                groupwise_bits_per_weight, quantize_copy)
from utils.validation import check_positive_int, check_tensor

CHAPTER = "09"  # found by utils.report; notebooks/09_*.ipynb, solutions/lab09_*.ipynb

# The interpreter is chosen before triton is imported (and read again by each @triton.jit).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

_TRITON_IMPORTED_BEFORE = "triton.language" in sys.modules

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # no wheel for this platform: the kernels are defined but cannot launch
    HAVE_TRITON = False

    class _MissingKernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            require_triton()

    triton = SimpleNamespace(jit=_MissingKernel)
    tl = SimpleNamespace(constexpr=int)


def _interpret_standard_library() -> int:
    """When triton was imported before TRITON_INTERPRET was set (torch.compile imports it), its
    standard library's ``@jit`` helpers (``tl.max``, ``tl.sum``, ``tl.cdiv``, ...) were built as
    compiled functions, which the interpreter cannot call from a kernel ("Cannot call @triton.jit'd
    outside of the scope of a kernel"): rewrap them as interpreted ones. Returns how many."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    count = 0
    for module in [m for name, m in list(sys.modules.items())
                   if name.startswith("triton.language") and m is not None]:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction):
                setattr(module, name, InterpretedFunction(obj.fn))
                count += 1
    return count


if HAVE_TRITON and _TRITON_IMPORTED_BEFORE and os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_standard_library()


def interpreting() -> bool:
    """True when kernels run in Triton's interpreter (CPU tensors, numpy, no meaningful time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mode() -> str:
    """'interpreter', 'cuda' or 'unavailable': how this process runs the kernels."""
    if not HAVE_TRITON:
        return "unavailable"
    return "interpreter" if interpreting() else ("cuda" if torch.cuda.is_available()
                                                 else "unavailable")


def kernel_device() -> torch.device:
    """Where the wrappers' tensors must live: the CPU in the interpreter, else the GPU."""
    return torch.device("cpu" if interpreting() or not torch.cuda.is_available() else "cuda")


def require_triton() -> None:
    """Raise with the reason when kernels cannot launch in this process."""
    if not HAVE_TRITON:
        raise RuntimeError("chapter 09 needs the package 'triton', which ships Linux x86-64 "
                           "wheels only: run the chapter on Linux or Colab "
                           "(`pip install -r requirements.txt`)")
    if not interpreting() and not torch.cuda.is_available():
        raise RuntimeError("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 set before "
                           "triton is imported (this module sets it when no GPU is present; "
                           "it was set to 0 here)")


def _check_inputs(**tensors) -> torch.device:
    require_triton()
    device = kernel_device()
    for name, t in tensors.items():
        check_tensor(name, t)
        if t.device.type != device.type:
            raise ValueError(f"{name} must be on {device.type} ({mode()} mode), got {t.device}")
    return device


def _default_block(interpreter: int, gpu: int) -> int:
    return interpreter if interpreting() else gpu


# --------------------------------------------------------------------------- 1. programming model

@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(axis=0)                 # which program of the 1-D grid this is
    offsets = pid * BLOCK + tl.arange(0, BLOCK)  # the BLOCK elements this program owns
    mask = offsets < n                          # the last program may run past the end
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def vector_add(x: torch.Tensor, y: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x + y by ``add_kernel``: one program per ``block`` elements, ceil(n / block) programs."""
    _check_inputs(x=x, y=y)
    check_positive_int("block", block)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if block & (block - 1):
        raise ValueError(f"block must be a power of 2 (tl.arange needs one), got {block}")
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    add_kernel[(triton.cdiv(n, block),)](x, y, out, n, BLOCK=block)
    return out


@triton.jit
def lanes_kernel(offsets_ptr, mask_ptr, n, BLOCK: tl.constexpr):
    """Writes each lane's offset and mask into row ``pid`` of two (programs, BLOCK) tables."""
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offsets = pid * BLOCK + lane
    tl.store(offsets_ptr + pid * BLOCK + lane, offsets)
    tl.store(mask_ptr + pid * BLOCK + lane, (offsets < n).to(tl.int8))


def program_lanes(n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets, mask), each (programs, block): what every program of ``vector_add``'s grid
    addresses and which of its lanes may touch memory, computed by a kernel."""
    check_positive_int("n", n)
    check_positive_int("block", block)
    require_triton()
    programs = triton.cdiv(n, block)
    offsets = torch.empty(programs, block, dtype=torch.int32, device=kernel_device())
    mask = torch.empty(programs, block, dtype=torch.int8, device=kernel_device())
    lanes_kernel[(programs,)](offsets, mask, n, BLOCK=block)
    return offsets, mask.bool()


# --------------------------------------------------------------------------- 2. softmax

@triton.jit
def softmax_kernel(out_ptr, in_ptr, in_row_stride, out_row_stride, n_cols,
                   BLOCK: tl.constexpr):
    """One row per program, the whole row in one block: read once, write once."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(in_ptr + row * in_row_stride + cols, mask=mask, other=-float("inf"))
    x = x.to(tl.float32)                  # fp16/bf16 inputs: the arithmetic in fp32
    z = x - tl.max(x, axis=0)             # padding lanes hold -inf: exp gives 0
    num = tl.exp(z)
    tl.store(out_ptr + row * out_row_stride + cols, num / tl.sum(num, axis=0), mask=mask)


MAX_FUSED_COLS = 2**16  # the tutorial's bound on one block (registers / shared memory on a GPU)


def _rows(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if x.dim() < 1 or x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).contiguous()


def fused_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension by ``softmax_kernel`` (rows up to 65,536 columns)."""
    _check_inputs(x=x)
    rows = _rows(x)
    n_cols = rows.shape[1]
    if n_cols > MAX_FUSED_COLS:
        raise ValueError(f"rows of {n_cols} columns do not fit one block (at most "
                         f"{MAX_FUSED_COLS}): use online_fused_softmax")
    out = torch.empty_like(rows)
    softmax_kernel[(rows.shape[0],)](out, rows, rows.stride(0), out.stride(0), n_cols,
                                     BLOCK=triton.next_power_of_2(n_cols))
    return out.reshape(x.shape)


@triton.jit
def online_softmax_kernel(out_ptr, in_ptr, in_row_stride, out_row_stride, n_cols,
                          BLOCK: tl.constexpr):
    """Rows longer than a block: pass 1 carries the running max m and the sum d of exp(x - m)
    (d is rescaled by exp(m_old - m_new) when the max moves); pass 2 writes exp(x - m) / d."""
    row = tl.program_id(0)
    base = in_ptr + row * in_row_stride
    m = -float("inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=-float("inf")).to(tl.float32)
        tl.store(out_ptr + row * out_row_stride + cols, tl.exp(x - m) / d, mask=mask)


def online_fused_softmax(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Softmax over the last dimension of any length, ``block`` columns at a time."""
    _check_inputs(x=x)
    check_positive_int("block", block)
    if block & (block - 1):
        raise ValueError(f"block must be a power of 2, got {block}")
    rows = _rows(x)
    out = torch.empty_like(rows)
    online_softmax_kernel[(rows.shape[0],)](out, rows, rows.stride(0), out.stride(0),
                                            rows.shape[1], BLOCK=block)
    return out.reshape(x.shape)


# Eager torch softmax written as the tutorial's naive_softmax, one kernel per line; each op's
# values read and written, in units of (M*N, M) for an (M, N) input.
NAIVE_SOFTMAX_OPS = (
    ("x_max = x.max(dim=1)", (1, 0), (0, 1)),
    ("z = x - x_max[:, None]", (1, 1), (1, 0)),
    ("num = torch.exp(z)", (1, 0), (1, 0)),
    ("den = num.sum(dim=1)", (1, 0), (0, 1)),
    ("out = num / den[:, None]", (1, 1), (1, 0)),
)


def softmax_traffic(m: int, n: int, bytes_per_value: float = 4) -> dict[str, float]:
    """DRAM bytes of softmax over an (m, n) matrix: naive (sum of ``NAIVE_SOFTMAX_OPS``: reads
    5mn + 2m, writes 3mn + 2m values), fused (read mn, write mn) and online (two reads, one
    write: 3mn). The ratio naive / fused tends to 4 for long rows."""
    check_positive_int("m", m)
    check_positive_int("n", n)
    if not bytes_per_value > 0:
        raise ValueError(f"bytes_per_value must be > 0, got {bytes_per_value!r}")
    reads = sum(r[0] * m * n + r[1] * m for _, r, _ in NAIVE_SOFTMAX_OPS)
    writes = sum(w[0] * m * n + w[1] * m for _, _, w in NAIVE_SOFTMAX_OPS)
    naive, fused, online = reads + writes, 2 * m * n, 3 * m * n
    return {"naive_bytes": float(naive * bytes_per_value),
            "fused_bytes": float(fused * bytes_per_value),
            "online_bytes": float(online * bytes_per_value),
            "naive_kernels": len(NAIVE_SOFTMAX_OPS), "ratio": naive / fused}


# --------------------------------------------------------------------------- 3. matmul

@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """Program ``pid`` -> its output tile (pid_m, pid_n), GROUP_M tile rows at a time, column by
    column within the group, so that neighbouring programs share A's and B's blocks in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)  # the last group may be shorter
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """C = act(A @ B + bias): one (BLOCK_M, BLOCK_N) tile of C per program, K in BLOCK_K steps
    accumulated in fp32; the epilogue (bias, GELU) runs on the tile before its single store."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if GELU:  # exact GELU, x * Phi(x) (Hendrycks and Gimpel 2016), as F.gelu
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, c,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
           gelu: bool = False, block_m: int | None = None, block_n: int | None = None,
           block_k: int | None = None, group_m: int = 8) -> torch.Tensor:
    """act(a @ b + bias) for 2-D a (M, K), b (K, N), by ``matmul_kernel`` (any shapes: tiles
    are masked at the edges). Blocks default to 32 in the interpreter, 128/128/32 on a GPU."""
    _check_inputs(a=a, b=b, **({} if bias is None else {"bias": bias}))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"need a (M, K) and b (K, N), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(f"bias must have shape ({b.shape[1]},), got {tuple(bias.shape)}")
    check_positive_int("group_m", group_m)
    bm = block_m or _default_block(32, 128)
    bn = block_n or _default_block(32, 128)
    bk = block_k or 32
    for name, value in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of 2 >= 16 (tl.dot's minimum), got {value}")
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    matmul_kernel[grid](a, b, c, bias if bias is not None else c, m, n, k,
                        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                        c.stride(0), c.stride(1), HAS_BIAS=bias is not None, GELU=gelu,
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
                        num_warps=8, num_stages=3)  # the tutorial's 128 x 128 tile settings
    return c


@triton.jit
def _order_kernel(pid_m_ptr, pid_n_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tl.store(pid_m_ptr + pid, pid_m)
    tl.store(pid_n_ptr + pid, pid_n)


def program_order(tiles_m: int, tiles_n: int, group_m: int) -> list[tuple[int, int]]:
    """The output tile (pid_m, pid_n) of each program in launch order, by the same
    ``grouped_tile`` that ``matmul_kernel`` calls (group_m = 1: row-major order)."""
    for name, value in (("tiles_m", tiles_m), ("tiles_n", tiles_n), ("group_m", group_m)):
        check_positive_int(name, value)
    require_triton()
    count = tiles_m * tiles_n
    pm = torch.empty(count, dtype=torch.int32, device=kernel_device())
    pn = torch.empty(count, dtype=torch.int32, device=kernel_device())
    _order_kernel[(count,)](pm, pn, tiles_m * 16, tiles_n * 16, BLOCK_M=16, BLOCK_N=16,
                            GROUP_M=group_m)
    return list(zip(pm.tolist(), pn.tolist()))


def blocks_loaded(order: list[tuple[int, int]], programs: int, k_tiles: int) -> int:
    """Blocks of A and B that the first ``programs`` programs of ``order`` read, if each row
    strip of A and column strip of B (``k_tiles`` blocks each) is loaded once and then stays
    in cache: (distinct tile rows + distinct tile columns) x k_tiles."""
    check_positive_int("programs", programs)
    check_positive_int("k_tiles", k_tiles)
    first = order[:programs]
    return (len({m for m, _ in first}) + len({n for _, n in first})) * k_tiles


# --------------------------------------------------------------------------- 4. normalisation

@triton.jit
def layer_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, row_stride, n_cols, eps,
                      BLOCK: tl.constexpr):
    """y = (x - mean) / sqrt(var + eps) * w + b over one row per program (biased variance)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    diff = tl.where(mask, x - mean, 0.0)          # padding lanes must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * row_stride + cols, diff * rstd * w + b, mask=mask)


@triton.jit
def rms_norm_kernel(x_ptr, y_ptr, w_ptr, row_stride, n_cols, eps, BLOCK: tl.constexpr):
    """y = x / sqrt(mean(x^2) + eps) * w over one row per program."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * row_stride + cols, x * rstd * w, mask=mask)


def _norm_rows(x, weight, bias=None):
    _check_inputs(x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    rows = _rows(x)
    if weight.shape != (rows.shape[1],) or (bias is not None and bias.shape != weight.shape):
        raise ValueError(f"weight (and bias) must have shape ({rows.shape[1]},), got "
                         f"{tuple(weight.shape)}")
    if rows.shape[1] > MAX_FUSED_COLS:
        raise ValueError(f"rows of {rows.shape[1]} columns exceed one block ({MAX_FUSED_COLS})")
    return rows, torch.empty_like(rows), triton.next_power_of_2(rows.shape[1])


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension by ``layer_norm_kernel`` (as ``F.layer_norm``)."""
    rows, out, block = _norm_rows(x, weight, bias)
    layer_norm_kernel[(rows.shape[0],)](rows, out, weight, bias, rows.stride(0), rows.shape[1],
                                        float(eps), BLOCK=block)
    return out.reshape(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension by ``rms_norm_kernel`` (as ``F.rms_norm``)."""
    rows, out, block = _norm_rows(x, weight)
    rms_norm_kernel[(rows.shape[0],)](rows, out, weight, rows.stride(0), rows.shape[1],
                                      float(eps), BLOCK=block)
    return out.reshape(x.shape)


# --------------------------------------------------------------------------- 5. FlashAttention

@triton.jit
def flash_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, stride_qh, stride_kh, t_q, t_k, scale,
                           CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of BLOCK_M queries of one head per program; keys and values in blocks of
    BLOCK_N. FlashAttention-2's loop: running max m, running sum l, unnormalised output acc,
    each rescaled by exp(m_old - m_new); one division by l at the end."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    rm = start_m + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    d_mask = rd < HEAD_DIM
    q_base, kv_base = head * stride_qh, head * stride_kh   # rows are contiguous: time stride D
    q = tl.load(q_ptr + q_base + rm[:, None] * HEAD_DIM + rd[None, :],
                mask=(rm[:, None] < t_q) & d_mask[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = t_k
    if CAUSAL:  # key blocks wholly above the diagonal (j > i for every query here) are skipped
        hi = tl.minimum(t_k, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        rn = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (rn[:, None] < t_k) & d_mask[None, :]
        kv_offsets = kv_base + rn[:, None] * HEAD_DIM + rd[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        keep = rn[None, :] < t_k
        if CAUSAL:
            keep = keep & (rn[None, :] <= rm[:, None])
        s = tl.where(keep, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)               # 0 on the first block (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_base + rm[:, None] * HEAD_DIM + rd[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rm[:, None] < t_q) & d_mask[None, :])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, block_m: int | None = None,
                    block_n: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v by ``flash_attention_kernel``: q (..., Tq, D), k and v
    (..., Tk, D) with the same leading (batch, head) dimensions; ``causal`` masks key j > query
    i (top-left aligned, as SDPA's ``is_causal``); scale defaults to 1/sqrt(D)."""
    _check_inputs(q=q, k=k, v=v)
    if q.dim() < 2 or k.shape != v.shape or k.dim() != q.dim() or q.shape[:-2] != k.shape[:-2] \
            or q.shape[-1] != k.shape[-1] or k.shape[-2] == 0 or q.shape[-2] == 0:
        raise ValueError(f"need q (..., Tq, D) and k, v (..., Tk, D), Tq, Tk > 0, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    d, t_q, t_k = q.shape[-1], q.shape[-2], k.shape[-2]
    qs, ks, vs = (t.reshape(-1, t.shape[-2], d).contiguous() for t in (q, k, v))
    out = torch.empty_like(qs)
    bm = block_m or _default_block(16, 64)
    bn = block_n or _default_block(16, 64)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    grid = (triton.cdiv(t_q, bm), qs.shape[0])
    flash_attention_kernel[grid](qs, ks, vs, out, qs.stride(0), ks.stride(0), t_q, t_k, scale,
                                 CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d,
                                 BLOCK_D=max(16, triton.next_power_of_2(d)))
    return out.reshape(q.shape)


def causal_tiles(t: int, block_m: int, block_n: int) -> dict[str, int]:
    """(query block, key block) tiles that ``flash_attention_kernel`` computes for a causal T x T
    attention, against all of them: the loop stops at the diagonal."""
    for name, value in (("t", t), ("block_m", block_m), ("block_n", block_n)):
        check_positive_int(name, value)
    computed = sum(math.ceil(min(t, start + block_m) / block_n)
                   for start in range(0, t, block_m))
    return {"computed": computed, "all": math.ceil(t / block_m) * math.ceil(t / block_n)}


# --------------------------------------------------------------------------- 6. int4 GEMV

@triton.jit
def int4_gemv_kernel(x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, y_ptr, N, K,
                     stride_xm, stride_wn, stride_sn, stride_ym, GROUP: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = sum_k s[n, k // G] (q[n, k] - z[n, k // G]) x[m, k] for BLOCK_N outputs of one
    row m per program. Each byte of w holds q[n, 2j] (low nibble) and q[n, 2j + 1] (high): the
    kernel reads 4 bits per weight and dequantizes in registers, never writing a float weight."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    half = K // 2
    for j0 in range(0, half, BLOCK_K // 2):
        j = j0 + tl.arange(0, BLOCK_K // 2)             # packed column (byte) index
        mask = n_mask[:, None] & (j[None, :] < half)
        packed = tl.load(w_ptr + rn[:, None] * stride_wn + j[None, :], mask=mask, other=0)
        packed = packed.to(tl.int32)
        for nibble in tl.static_range(2):             # low nibble: column 2j; high: 2j + 1
            col = 2 * j + nibble
            q = ((packed >> (4 * nibble)) & 0xF).to(tl.float32)
            group = col // GROUP
            s = tl.load(scales_ptr + rn[:, None] * stride_sn + group[None, :], mask=mask,
                        other=0.0)
            z = tl.load(zeros_ptr + rn[:, None] * stride_sn + group[None, :], mask=mask,
                        other=0).to(tl.float32)
            x = tl.load(x_ptr + row * stride_xm + col, mask=col < K, other=0.0).to(tl.float32)
            acc += tl.sum(s * (q - z) * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0)
    tl.store(y_ptr + row * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def int4_linear_from(linear: nn.Linear, group_size: int = 32) -> WeightOnlyGroupwiseLinear:
    """Chapter 02's round-to-nearest group-wise int4 copy of one ``nn.Linear``."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    return quantize_copy(nn.Sequential(linear), WeightOnlyGroupwiseQuantHandler, bits=4,
                         group_size=group_size, skip=())[0]


def int4_gemv(x: torch.Tensor, layer: WeightOnlyGroupwiseLinear, block_n: int | None = None,
              block_k: int | None = None) -> torch.Tensor:
    """``layer(x)`` for a 4-bit ``WeightOnlyGroupwiseLinear`` by ``int4_gemv_kernel``: x is
    (K,) or (M, K) with small M (decode); the packed weight is read once per row of x."""
    if not isinstance(layer, WeightOnlyGroupwiseLinear) or layer.bits != 4:
        raise TypeError("layer must be a 4-bit utils.quantization.WeightOnlyGroupwiseLinear")
    _check_inputs(x=x, weight=layer.weight)
    k, n = layer.in_features, layer.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension must be in_features={k}, got {tuple(x.shape)}")
    rows = x.reshape(-1, k).contiguous()
    # the interpreter's cost is per operation, not per value: large blocks, few programs
    bn = block_n or _default_block(128, 64)
    bk = block_k or _default_block(256, 128)
    if bk < 2 or bk & (bk - 1):
        raise ValueError(f"block_k must be an even power of 2, got {bk}")
    y = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    bias = layer.bias
    int4_gemv_kernel[(triton.cdiv(n, bn), rows.shape[0])](
        rows, layer.weight, layer.scales, layer.zeros, bias if bias is not None else y, y, n, k,
        rows.stride(0), layer.weight.stride(0), layer.scales.stride(0), y.stride(0),
        GROUP=layer.group_size, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk)
    return y.reshape(*x.shape[:-1], n)


def gemv_traffic(n: int, k: int, group_size: int = 32, rows: int = 1) -> dict[str, float]:
    """DRAM bytes of y = W x for ``rows`` input rows, W (n, k): fp32 and fp16 weights against
    the int4 format (4 bits + an fp32 scale and a uint8 zero point per group), plus x and y
    (fp32 here; they are small beside W at decode)."""
    for name, value in (("n", n), ("k", k), ("group_size", group_size), ("rows", rows)):
        check_positive_int(name, value)
    io = 4 * rows * (n + k)
    int4 = n * k * groupwise_bits_per_weight(4, group_size) / 8
    return {"fp32_bytes": float(4 * n * k + io), "fp16_bytes": float(2 * n * k + io),
            "int4_bytes": float(int4 + io), "flops": float(2 * rows * n * k)}


# --------------------------------------------------------------------------- 7. debugging

@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr, OFF_BY_ONE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if OFF_BY_ONE:
        mask = offsets <= n     # the bug: lane n is past the end
    else:
        mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask), mask=mask)


def copy_with_guard(x: torch.Tensor, block: int = 8, off_by_one: bool = False,
                    guard: int = 16) -> tuple[torch.Tensor, int]:
    """Copy 1-D ``x`` with ``_copy_kernel`` into a buffer with ``guard`` NaN cells after its end
    (the source is padded the same way, so even a wrong mask stays inside allocated memory).
    Returns (the copy, how many guard cells the kernel wrote): nonzero means the mask is wrong.
    Without the padding an out-of-bounds store corrupts the heap silently in the interpreter,
    or faults (or silently corrupts) on a GPU."""
    _check_inputs(x=x)
    check_positive_int("block", block)
    check_positive_int("guard", guard)
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D, got shape {tuple(x.shape)}")
    n = x.numel()
    src = torch.full((n + guard,), -1.0, dtype=x.dtype, device=x.device)
    src[:n] = x
    dst = torch.full((n + guard,), float("nan"), dtype=x.dtype, device=x.device)
    _copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block, OFF_BY_ONE=off_by_one)
    return dst[:n].clone(), int((~torch.isnan(dst[n:])).sum())


@triton.jit
def _assert_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.device_assert(offsets < n, "lane past the end")
    tl.load(x_ptr + offsets, mask=offsets < n)


def device_assert_fires() -> bool:
    """Whether a failing ``tl.device_assert`` raises in this process. In the interpreter it is
    tried (Triton 3.9's ignores asserts: its options have debug=False). On a GPU asserts are
    compiled only with TRITON_DEBUG=1, and a failing one aborts the CUDA context (every later
    CUDA call fails), so it is not launched: the answer is whether TRITON_DEBUG is set. Test
    masks with a guard band (``copy_with_guard``) instead."""
    require_triton()
    if not interpreting():
        return os.environ.get("TRITON_DEBUG", "0") not in ("", "0")
    x = torch.zeros(8, device=kernel_device())
    try:
        _assert_kernel[(1,)](x, 4, BLOCK=8)
    except AssertionError:
        return True
    return False


# --------------------------------------------------------------------------- 8. checks, GPUs

# max |error| vs torch accepted on fp32 inputs (reductions reorder sums). On a GPU, tl.dot on
# fp32 runs in TF32 (10-bit mantissa) by default, so kernels with a dot get a looser bound there.
TOLERANCE = {"fp32": 1e-4, "tf32 dot": 2e-2}


def check_kernels(quick: bool = True, seed: int = 0) -> list[dict]:
    """Every kernel against its torch reference on odd shapes (not multiples of the blocks):
    one row each with the max |error|, the tolerance and whether it passed. Sizes fit the
    interpreter on 2 cores (a few seconds in all); ``quick=False`` doubles them."""
    require_triton()
    g = torch.Generator().manual_seed(seed)
    dev = kernel_device()
    s = 1 if quick else 2
    r = lambda *shape: torch.randn(*shape, generator=g).to(dev)  # noqa: E731
    rows = []

    def add(kernel, shape, got, want, dot=False):
        err = float((got.float() - want.float()).abs().max())
        tol = TOLERANCE["tf32 dot" if dot and not interpreting() else "fp32"]
        rows.append({"kernel": kernel, "shape": shape, "max_abs_error": err,
                     "tolerance": tol, "passed": err <= tol})

    x, y = r(1000 * s), r(1000 * s)
    add("vector_add", f"({1000 * s},)", vector_add(x, y, block=256), x + y)
    x = r(37 * s, 200)
    add("fused_softmax", f"({37 * s}, 200)", fused_softmax(x), torch.softmax(x, -1))
    x = r(5, 3000 * s)
    add("online_fused_softmax", f"(5, {3000 * s})", online_fused_softmax(x, block=512),
        torch.softmax(x, -1))
    a, b, bias = r(70 * s, 90), r(90, 50 * s), r(50 * s)
    add("matmul", f"({70 * s}, 90) @ (90, {50 * s})", matmul(a, b), a @ b, dot=True)
    add("matmul + bias + GELU", f"({70 * s}, 90) @ (90, {50 * s})",
        matmul(a, b, bias, gelu=True), F.gelu(a @ b + bias), dot=True)
    x, w, bb = r(19 * s, 300), r(300), r(300)
    add("layer_norm", f"({19 * s}, 300)", layer_norm(x, w, bb), F.layer_norm(x, (300,), w, bb))
    add("rms_norm", f"({19 * s}, 300)", rms_norm(x, w), F.rms_norm(x, (300,), w, 1e-6))
    q, k, v = r(1, 2, 50 * s, 32), r(1, 2, 50 * s, 32), r(1, 2, 50 * s, 32)
    for causal in (False, True):
        add(f"flash_attention{' causal' if causal else ''}", f"(1, 2, {50 * s}, 32)",
            flash_attention(q, k, v, causal=causal),
            F.scaled_dot_product_attention(q, k, v, is_causal=causal), dot=True)
    torch.manual_seed(seed)
    layer = int4_linear_from(nn.Linear(128, 40 * s)).to(dev)
    x = r(2, 128)
    add("int4_gemv", f"(2, 128) x int4 ({40 * s}, 128), g=32", int4_gemv(x, layer), layer(x))
    return rows


# Published peaks (NVIDIA datasheets; dense tensor-core fp16/bf16, no sparsity): DRAM bytes/s
# and FLOP/s. Colab's free GPU is the T4.
GPU_SPECS = {
    "T4": {"bandwidth": 320e9, "fp16_flops": 65e12},
    "A100-SXM4-80GB": {"bandwidth": 2039e9, "fp16_flops": 312e12},
    "H100-SXM5": {"bandwidth": 3350e9, "fp16_flops": 989e12},
    "H200-SXM": {"bandwidth": 4800e9, "fp16_flops": 989e12},
}


def roofline_time_s(bytes_moved: float, flops: float, bandwidth: float,
                    peak_flops: float) -> float:
    """The roofline's lower bound on a kernel's time (Williams et al. 2009): it cannot move its
    bytes faster than the bandwidth nor do its FLOPs faster than the peak."""
    if not bandwidth > 0 or not peak_flops > 0:
        raise ValueError(f"bandwidth and peak_flops must be > 0, got {bandwidth}, {peak_flops}")
    return max(bytes_moved / bandwidth, flops / peak_flops)


def gpu_workloads(size: int = 4096) -> list[dict]:
    """The benchmarked cases at fp16 on ``size`` x ``size`` tensors, each a list of the kernels
    it launches as (bytes, FLOPs): softmax naive (5 kernels) vs fused, layer norm (read x, w, b;
    write y), a square matmul with its bias + GELU epilogue as two extra passes or fused, and a
    batch-1 GEMV with fp16 against int4 weights."""
    check_positive_int("size", size)
    n = size
    soft = softmax_traffic(n, n, 2)
    gemm = gemm_epilogue_traffic(n, n, n, 2, 2)
    gemv = gemv_traffic(n, n, 32)
    return [
        {"case": "softmax, naive torch", "kernels": [(soft["naive_bytes"] / 5, 0.0)] * 5},
        {"case": "softmax, fused Triton", "kernels": [(soft["fused_bytes"], 0.0)]},
        {"case": "layer norm, fused", "kernels": [(2.0 * (2 * n * n + 2 * n), 0.0)]},
        {"case": "matmul + bias + GELU, unfused",
         "kernels": [(gemm["gemm_bytes"], gemm["flops"]), (gemm["epilogue_bytes"] / 2, 0.0),
                     (gemm["epilogue_bytes"] / 2, 0.0)]},
        {"case": "matmul + bias + GELU, fused", "kernels": [(gemm["fused_bytes"], gemm["flops"])]},
        {"case": "GEMV batch 1, fp16 weights", "kernels": [(gemv["fp16_bytes"], gemv["flops"])]},
        {"case": "GEMV batch 1, int4 weights", "kernels": [(gemv["int4_bytes"], gemv["flops"])]},
    ]


def predicted_gpu_times(gpu: str = "T4", size: int = 4096) -> list[dict]:
    """``gpu_workloads`` on a GPU of ``GPU_SPECS``: the sum of ``roofline_time_s`` over each
    case's kernels (launch overhead ignored). A prediction, not a measurement: real kernels
    reach a fraction of both peaks."""
    if gpu not in GPU_SPECS:
        raise ValueError(f"gpu must be one of {sorted(GPU_SPECS)}, got {gpu!r}")
    spec = GPU_SPECS[gpu]
    rows = []
    for w in gpu_workloads(size):
        t = sum(roofline_time_s(b, f, spec["bandwidth"], spec["fp16_flops"])
                for b, f in w["kernels"])
        memory_s = sum(b for b, _ in w["kernels"]) / spec["bandwidth"]
        rows.append({"gpu": gpu, "case": w["case"], "kernels": len(w["kernels"]),
                     "MB": sum(b for b, _ in w["kernels"]) / 1e6, "predicted_us": t * 1e6,
                     "bound": "memory" if memory_s >= 0.5 * t else "compute"})
    return rows


def gpu_spec(device_name: str) -> dict | None:
    """The ``GPU_SPECS`` entry whose model name (T4, A100, H100, H200) appears in
    ``torch.cuda.get_device_name()``, or None."""
    for key, spec in GPU_SPECS.items():
        if key.split("-")[0] in device_name:
            return spec
    return None


def gpu_benchmarks(size: int = 4096, warmup: int = 25, rep: int = 100, timer=None,
                   compiled: bool = True) -> list[dict]:
    """Measured on this process's CUDA GPU with ``triton.testing.do_bench`` (median ms): each
    Triton kernel beside torch eager (and ``torch.compile``) at fp16, in GB/s of the useful
    traffic with its fraction of a measured device-to-device copy, and TFLOP/s for matmul (against
    cuBLAS) and attention (against SDPA) with the fraction of the datasheet peak. Raises without a
    GPU unless ``timer`` (fn -> ms) is given: the tests run the whole table that way on a CPU."""
    if timer is None and mode() != "cuda":
        raise RuntimeError(f"gpu_benchmarks needs a CUDA GPU and native Triton, mode is {mode()}")
    check_positive_int("size", size)
    if timer is None:
        from triton.testing import do_bench

        timer = lambda fn: do_bench(fn, warmup=warmup, rep=rep, return_mode="median")  # noqa
    torch.manual_seed(0)
    n, dev, h = size, kernel_device(), torch.float16
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)"
    peak = (gpu_spec(name) or {}).get("fp16_flops")
    src = torch.empty(64 * n * n // 1024 + 1, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / (timer(lambda: dst.copy_(src)) * 1e-3)
    x = torch.randn(n, n, device=dev, dtype=h)
    w, b = torch.randn(n, device=dev, dtype=h), torch.randn(n, device=dev, dtype=h)
    softmax_fn, ln_fn = (lambda t: torch.softmax(t, -1)), (lambda t: F.layer_norm(t, (n,), w, b))
    rows = []

    def add(case, impl, fn, nbytes, flops=0.0):
        t_ms = timer(fn)
        gbs = nbytes / (t_ms * 1e-3) / 1e9
        tflops = flops / (t_ms * 1e-3) / 1e12 if flops else None
        rows.append({"device": name, "case": case, "implementation": impl, "ms": t_ms,
                     "GB/s": gbs, "of_copy_bw": gbs * 1e9 / copy_bw, "TFLOP/s": tflops,
                     "of_peak_flops": tflops * 1e12 / peak if tflops and peak else None})

    vec = torch.randn(n * n, device=dev, dtype=h)
    add("vector add", "Triton", lambda: vector_add(vec, vec), 3 * 2 * n * n)
    add("vector add", "torch eager", lambda: vec + vec, 3 * 2 * n * n)
    sm_bytes = 2 * 2 * n * n  # the useful traffic: read and write once
    add("softmax", "Triton fused", lambda: fused_softmax(x), sm_bytes)
    add("softmax", "torch eager", lambda: softmax_fn(x), sm_bytes)
    ln_bytes = 2 * (2 * n * n + 2 * n)
    add("layer norm", "Triton", lambda: layer_norm(x, w, b), ln_bytes)
    add("layer norm", "torch eager", lambda: ln_fn(x), ln_bytes)
    if compiled:
        compiled_softmax, compiled_ln = torch.compile(softmax_fn), torch.compile(ln_fn)
        add("softmax", "torch.compile", lambda: compiled_softmax(x), sm_bytes)
        add("layer norm", "torch.compile", lambda: compiled_ln(x), ln_bytes)
    a, bm = torch.randn(n, n, device=dev, dtype=h), torch.randn(n, n, device=dev, dtype=h)
    mm_bytes, mm_flops = 2 * 3 * n * n, 2.0 * n ** 3
    add("matmul fp16", "Triton", lambda: matmul(a, bm), mm_bytes, mm_flops)
    add("matmul fp16", "cuBLAS (torch.matmul)", lambda: a @ bm, mm_bytes, mm_flops)
    add("matmul + bias + GELU", "Triton fused", lambda: matmul(a, bm, w, gelu=True),
        mm_bytes, mm_flops)
    add("matmul + bias + GELU", "torch eager", lambda: F.gelu(a @ bm + w), mm_bytes, mm_flops)
    t = max(16, n // 4)  # attention: batch 4, 16 heads of 64, T = size / 4, causal
    q, k, v = (torch.randn(4, 16, t, 64, device=dev, dtype=h) for _ in range(3))
    att_flops, att_bytes = 4 * 4 * 16 * t * t * 64 / 2, 4 * 2 * 4 * 16 * t * 64
    add("attention, causal", "Triton FlashAttention", lambda: flash_attention(q, k, v, True),
        att_bytes, att_flops)
    add("attention, causal", "torch SDPA",
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), att_bytes, att_flops)
    layer = int4_linear_from(nn.Linear(n, n)).to(dev)
    dense = nn.Linear(n, n, bias=False).to(dev, h)
    row = torch.randn(1, n, device=dev)
    add("GEMV batch 1", "Triton int4", lambda: int4_gemv(row, layer),
        gemv_traffic(n, n, 32)["int4_bytes"])
    add("GEMV batch 1", "torch fp16", lambda: dense(row.to(h)), gemv_traffic(n, n)["fp16_bytes"])
    return rows


def report_rows(quick: bool = False) -> list[dict]:
    """Chapter 09's figures (``python -m utils.report 09``): each kernel's max |error| against
    torch (in the interpreter on CPU, natively on a GPU), then the measured GPU table where a
    GPU is present."""
    rows = [{"measurement": f"{r['kernel']} {r['shape']}: max |error|",
             "value": r["max_abs_error"], "unit": "", "conditions":
             f"{mode()}, fp32, tolerance {r['tolerance']:g}: {'pass' if r['passed'] else 'FAIL'}"}
            for r in check_kernels(quick=quick)]
    if mode() == "cuda":
        name = torch.cuda.get_device_name()
        for r in gpu_benchmarks(size=2048 if quick else 4096):
            rows.append({"measurement": f"{r['case']}, {r['implementation']}",
                         "value": r["GB/s"], "unit": "GB/s",
                         "conditions": f"{name}, fp16, {r['ms']:.3f} ms, "
                                       f"{r['of_copy_bw']:.2f} of copy bandwidth"})
    return rows
