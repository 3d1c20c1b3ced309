"""Grading spec of lab 09, Triton kernels (chapter 09), puzzle style: each exercise is a kernel
with its wrapper, checked in one call against torch on bounded sizes. In the sandbox (no GPU)
the kernels run in Triton's interpreter; ``utils.triton_kernels`` is imported first, which sets
``TRITON_INTERPRET=1`` before triton loads.

The adapter ``launching`` turns the plain arguments into tensors on the kernels' device, counts
the Triton launches made during the call and raises when there was none: an answer must compute
in a kernel, not in torch. Expected values come from torch and ``utils.fusion``.
"""

from __future__ import annotations

import math

from utils.labs.spec import (Case, Exercise, LabSpec, _compare_raises, _show, _to_tensors,
                             array_close, tensor_arg)

ADAPTER = "utils.labs.specs.lab09:launching"
# (rtol, atol) for answers built on tl.dot: on a GPU it runs fp32 inputs in TF32 (10-bit
# mantissa, errors ~1e-3 on these sizes); a wrong mask or rescale is off by 0.1 or more
DOT_TOLERANCE = (1e-2, 1e-2)
KERNEL_REFS = ("utils.triton_kernels.add_kernel", "utils.triton_kernels.vector_add",
               "utils.triton_kernels.softmax_kernel", "utils.triton_kernels.fused_softmax",
               "utils.triton_kernels.online_softmax_kernel",
               "utils.triton_kernels.online_fused_softmax", "utils.triton_kernels.matmul",
               "utils.triton_kernels.matmul_kernel", "utils.triton_kernels.flash_attention",
               "utils.triton_kernels.flash_attention_kernel")


class NoKernelLaunched(RuntimeError):
    """The answer returned without launching a Triton kernel."""


def launching(fn, *args, **kwargs):
    """Adapter (runs in the sandbox and in ``check``): ``fn`` called with tensors on the
    kernels' device; its result comes back on the CPU. Raises ``NoKernelLaunched`` when no
    ``kernel[grid](...)`` ran during the call."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from utils.triton_kernels import kernel_device

    device = kernel_device()
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    launches, originals = [], {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    def counted(original):
        def run(self, *a, **k):
            launches.append(1)
            return original(self, *a, **k)
        return run

    for cls, original in originals.items():
        cls.run = counted(original)
    try:
        result = fn(*[move(a) for a in _to_tensors(list(args))],
                    **{k: move(v) for k, v in _to_tensors(kwargs).items()})
    finally:
        for cls, original in originals.items():
            cls.run = original
    if not launches:
        raise NoKernelLaunched("no Triton kernel was launched: compute the answer in your "
                               "@triton.jit kernel, launched as kernel[grid](...)")
    if isinstance(result, tuple):
        return tuple(r.cpu() if isinstance(r, torch.Tensor) else r for r in result)
    return result.cpu() if isinstance(result, torch.Tensor) else result


def _plain(t):
    return {"__array__": t.tolist(), "shape": list(t.shape)}


def _values(rng, *shape, scale=1.0):
    if len(shape) == 1:
        return [round(rng.gauss(0, scale), 4) for _ in range(shape[0])]
    return [_values(rng, *shape[1:], scale=scale) for _ in range(shape[0])]


# --------------------------------------------------------------------------- 1: masked add

def _add_expected(x, y):
    import torch

    return _plain(torch.tensor(x["__tensor__"]) + torch.tensor(y["__tensor__"]))


def _add_case(rng, n, label=""):
    return Case((tensor_arg(_values(rng, n)), tensor_arg(_values(rng, n))),
                label=label or f"n = {n}")


# --------------------------------------------------------------------------- 2: row sums

def _row_sums_expected(x):
    import torch

    return _plain(torch.tensor(x["__tensor__"]).sum(-1))


def _matrix_case(rng, m, n, label="", scale=1.0):
    return Case((tensor_arg(_values(rng, m, n, scale=scale)),), label=label or f"({m}, {n})")


# --------------------------------------------------------------------------- 3: softmax

def _softmax_expected(x):
    import torch

    return _plain(torch.softmax(torch.tensor(x["__tensor__"]), -1))


# --------------------------------------------------------------------------- 4: matmul

def _matmul_expected(a, b):
    import torch

    return _plain(torch.tensor(a["__tensor__"]) @ torch.tensor(b["__tensor__"]))


def _matmul_case(rng, m, k, n, label=""):
    return Case((tensor_arg(_values(rng, m, k)), tensor_arg(_values(rng, k, n))),
                label=label or f"({m}, {k}) @ ({k}, {n})")


# --------------------------------------------------------------------------- 5: FlashAttention

TILE = 16


def _tile_expected(m, l, o, q, k, v, scale):
    import torch

    from utils.fusion import flash_attention_update

    t = lambda x: torch.tensor(x["__tensor__"])  # noqa: E731
    qt, kt = t(q), t(k)
    m2, l2, o2 = flash_attention_update(t(m), t(l), t(o), (qt @ kt.T) * scale, t(v))
    return [_plain(m2), _plain(l2), _plain(o2)]


def _tile_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    if not (isinstance(got, list) and len(got) == 3):
        return f"expected a tuple (m, l, o) of three tensors, got {_show(got)}"
    for name, e, g in zip("mlo", expected, got):
        reason = array_close(*DOT_TOLERANCE)(e, g)
        if reason:
            return f"{name}: {reason}"
    return None


def _first_tile_state():
    return ([-math.inf] * TILE, [0.0] * TILE, [[0.0] * TILE for _ in range(TILE)])


def _tile_case(rng, first: bool, label: str, scale=0.25):
    if first:
        m, l, o = _first_tile_state()
    else:
        m = _values(rng, TILE)
        l = [round(rng.uniform(0.5, 8.0), 4) for _ in range(TILE)]
        o = _values(rng, TILE, TILE)
    q, k, v = (_values(rng, TILE, TILE) for _ in range(3))
    return Case((tensor_arg(m), tensor_arg(l), tensor_arg(o), tensor_arg(q), tensor_arg(k),
                 tensor_arg(v), scale), label=label)


def _public(builder, *specs):
    import random

    rng = random.Random(909)
    return tuple(builder(rng, *s) for s in specs)


SPEC = LabSpec(
    lab="lab09",
    notebook="lab09_triton_kernels.ipynb",
    title="Lab 09: Triton puzzles — masked add, row sums, fused softmax, a tiled matmul, "
          "a FlashAttention tile",
    seed=9900, timeout_s=150, cell_timeout_s=40, call_timeout_s=15, memory_mb=4096,
    preimport=("torch", "numpy", "utils.triton_kernels", "triton", "triton.language",
               "triton.runtime.interpreter"),
    exercises=(
        Exercise(
            name="masked_add", points=2, title="Vector add with a masked last block",
            expected=_add_expected, compare=array_close(1e-6, 1e-6), adapter=ADAPTER,
            public=_public(_add_case, (128, "exactly one block of 128"),
                           (300, "300 elements: the last program masks 84 lanes"),
                           (5, "fewer elements than one block")),
            hidden=lambda rng: [_add_case(rng, n) for n in (1, 127, 129, 1000, 2049)],
            references=KERNEL_REFS,
            hint="offsets = pid * BLOCK + tl.arange(0, BLOCK); mask = offsets < n on the "
                 "load and the store; grid = (triton.cdiv(n, BLOCK),)"),
        Exercise(
            name="row_sums", points=2, title="Row sums, rows longer than one block",
            expected=_row_sums_expected, compare=array_close(1e-5, 1e-4), adapter=ADAPTER,
            public=_public(_matrix_case, (3, 64, "(3, 64): one block per row"),
                           (2, 150, "(2, 150): three blocks, the last one masked")),
            hidden=lambda rng: [_matrix_case(rng, m, n) for m, n in
                                ((1, 1), (4, 63), (5, 65), (3, 300), (7, 129))],
            references=KERNEL_REFS,
            hint="one program per row; loop start over range(0, n_cols, BLOCK), load with "
                 "mask cols < n_cols and other=0, acc += tl.sum(x, axis=0)"),
        Exercise(
            name="softmax_rows", points=2, title="Fused softmax, one row per program",
            expected=_softmax_expected, compare=array_close(1e-5, 1e-6), adapter=ADAPTER,
            public=_public(_matrix_case, (2, 8, "(2, 8)"),
                           (3, 100, "(3, 100): the block is padded to 128"),
                           (2, 10, "(2, 10), values of magnitude ~100 (naive exp overflows)",
                            100.0)),
            hidden=lambda rng: [_matrix_case(rng, m, n, scale=s) for m, n, s in
                                ((1, 1, 1.0), (4, 33, 1.0), (3, 257, 1.0), (2, 50, 60.0),
                                 (6, 1000, 1.0))],
            references=KERNEL_REFS,
            hint="BLOCK = triton.next_power_of_2(n_cols); load padding lanes as -inf; "
                 "subtract tl.max, exponentiate, divide by tl.sum; store with the mask"),
        Exercise(
            name="matmul_blocks", points=2, title="A tiled matmul with tl.dot, any shape",
            expected=_matmul_expected, compare=array_close(*DOT_TOLERANCE), adapter=ADAPTER,
            public=_public(_matmul_case, (16, 16, 16, "one 16 x 16 tile"),
                           (20, 33, 17, "(20, 33) @ (33, 17): every edge masked")),
            hidden=lambda rng: [_matmul_case(rng, m, k, n) for m, k, n in
                                ((1, 1, 1), (32, 48, 16), (7, 70, 41), (50, 5, 3))],
            references=KERNEL_REFS,
            hint="2-D grid (cdiv(M, 16), cdiv(N, 16)); loop over K in blocks of 16 with "
                 "masks on both loads (other=0); acc = tl.dot(a, b, acc); masked store"),
        Exercise(
            name="flash_tile_update", points=2,
            title="One FlashAttention tile update of (m, l, O)",
            expected=_tile_expected, compare=_tile_compare, adapter=ADAPTER,
            public=_public(_tile_case, (True, "the first tile: m = -inf, l = 0, O = 0"),
                           (False, "a later tile: the running max may move")),
            hidden=lambda rng: [_tile_case(rng, first, label, scale) for first, label, scale in
                                ((True, "first tile, scale 1", 1.0),
                                 (False, "later tile, scale 0.25", 0.25),
                                 (False, "later tile, scale 2 (the max moves)", 2.0),
                                 (True, "first tile, scale 0.125", 0.125))],
            references=KERNEL_REFS + ("utils.fusion.flash_attention_update",
                                      "utils.fusion.flash_attention_reference"),
            hint="s = tl.dot(q, tl.trans(k)) * scale; m_new = max(m, rowmax s); "
                 "p = exp(s - m_new); alpha = exp(m - m_new); l_new = alpha l + rowsum p; "
                 "O_new = (alpha l O + p V) / l_new"),
    ),
)
