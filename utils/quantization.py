"""Chapter 02: quantization, from the affine formula to quantized models measured end to end.

What is here, each the reference the notebook and lab check against:

- Number formats (fp32, fp16, bf16, int8, int4, NF4): range, resolution, bytes (``number_formats``).
- Affine quantization with an *integer* zero point (Jacob et al., "Quantization and Training of
  Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, Sec. 2.1, eq. 1)::

      x_q = clamp(round(x / s) + z, q_min, q_max)        x ~ s (x_q - z)

  symmetric (z = 0, range [-(2^(b-1)-1), 2^(b-1)-1]) or asymmetric (range [0, 2^b - 1], the real
  range widened to contain 0 so that real 0 is exactly representable); per tensor, per output
  channel or per group of ``group_size`` input columns (``quantize_tensor``, ``fake_quantize``).
  Inside the range the rounding error is at most s/2; outside it the clipping error is unbounded.
  Common mistakes: ``round((x - z) / s)`` with a *float* z; and ``(w/q) * round(w/q)`` is not a
  quantizer at all (it is quadratic in w).
- Integer GEMM: int8 x int8 products accumulated in int32, with the zero-point cross terms of
  Jacob et al. 2018, Sec. 2.3, eq. 7, then rescaled by s_a s_b (``int8_gemm``, ``requantize``).
- Calibration of a clipping range: min-max, percentile, MSE-optimal (``calibrate_range``,
  ``mse_optimal_clip``); static (calibrated once) vs dynamic (per batch) activation ranges
  (``StaticActivationQuantizer``).
- LLM.int8() (Dettmers et al. 2022, Sec. 3.2): vector-wise int8 with the outlier feature
  dimensions (|x| >= 6.0) kept in 16/32-bit (``llm_int8_matmul``), checked against bitsandbytes.
- NF4 (Dettmers et al., "QLoRA", 2023, Sec. 3 and Appendix E): the 16 code values from normal
  quantiles (``nf4_code``), block-wise absmax, double quantization of the absmax constants.
- Packing two 4-bit values per byte (``pack_int4`` / ``unpack_int4``).
- Weight-only quantized ``nn.Linear`` replacements with gpt-fast's interface
  (``create_quantized_state_dict()`` then ``convert_for_runtime()``): ``WeightOnlyInt8Linear``
  (per-channel int8) and ``WeightOnlyGroupwiseLinear`` (2..8 bits, groups, 4-bit stored packed),
  round-to-nearest (``WeightOnlyInt8QuantHandler``, ``WeightOnlyGroupwiseQuantHandler``) or GPTQ
  (Frantar et al., "GPTQ", ICLR 2023, Algorithm 1 with lazy batch updates; ``GPTQQuantHandler``).
- torch's fused weight-only CPU kernels beside the readable path (``FusedInt8Linear``:
  ``torch._weight_int8pack_mm``; ``FusedInt4Linear``: ``torch._convert_weight_to_int4pack_for_cpu``
  and ``torch._weight_int4pack_mm_for_cpu``, as gpt-fast), and batch-1 decode timing on
  ``utils.llama`` models (``decode_speed``, ``decode_rows``).
- SmoothQuant (Xiao et al. 2023, Sec. 4: ``smoothquant_scales``, simulated W8A8 ``W8A8Linear``) and
  AWQ (Lin et al. 2024, Sec. 3: ``awq_search_scale``, ``AWQQuantHandler``), calibrated by
  ``collect_input_stats``.
- FP8 E4M3 / E5M2 (``fp8_fake_quantize``) and OCP MXFP4 (OCP MX spec v1.0, Sec. 5 and 6.3:
  ``mxfp4_quantize``), emulated; ``format_error_table`` compares them with int8, int4 and NF4.
- KV-cache quantization as ``transformers`` cache layers: per token (``QuantizedKVLayer``) and
  KIVI (Liu et al. 2024: keys per channel, values per token; ``KIVILayer``).
- PyTorch dynamic int8 for MiniLM (``quantize_dynamic_int8``; ``torch.ao.quantization`` is
  deprecated in favour of torchao but still works in torch 2.13, and torchao is not installed here).
- ``report_rows()``: the chapter's size/speed/quality table for ``python -m utils.report 02``
  (``groupwise_bits_per_weight``: what the course's group format stores per weight).

Run the table headless::

    python -m utils.report quantization
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.bench import cpu_capabilities
from utils.data import token_windows
from utils.metrics import lm_quality, reference_top1  # noqa: F401 (re-exported: chapter 02 API)
from utils.models import (cache_argument, calibration_tokens, collect_hessians,  # noqa: F401
                          collect_input_stats, find_linears, replace_module)  # (re-exported)
from utils.validation import check_int_range, check_positive_int, check_tensor

CHAPTER = "02"  # found by utils.report; notebooks/02_*.ipynb, solutions/lab02_*.ipynb

GRANULARITIES = ("tensor", "channel", "group")
CALIBRATION_METHODS = ("minmax", "percentile", "mse")
LLM_INT8_THRESHOLD = 6.0  # Dettmers et al. 2022, Sec. 3.2: outlier features have |x| >= 6
# QLoRA / bitsandbytes create_normal_map: offset = mean of 1 - 1/(2*15) and 1 - 1/(2*16)
NF4_OFFSET = 0.9677083


# --------------------------------------------------------------------------- argument checks

def check_bits(bits, low: int = 2, high: int = 8) -> int:
    """Return ``bits`` if it is an integer in [low, high], else raise a ValueError saying so."""
    return check_int_range("bits", bits, low, high)


def _check_group_size(group_size, columns: int) -> int:
    check_positive_int("group_size", group_size)
    if columns % group_size:
        raise ValueError(f"group_size={group_size} must divide the last dimension "
                         f"({columns} columns)")
    return group_size


# --------------------------------------------------------------------------- number formats

def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NormalFloat-4 values (QLoRA Sec. 3, Appendix E), derived from normal quantiles.

    An information-theoretically optimal k-bit code for N(0, 1) data puts equal probability mass
    in every bin, so its values are quantiles of the normal distribution. To keep an exact 0 and
    use all 16 codes, QLoRA takes 8 quantiles for the positive half and 7 for the negative half:
    q = Phi^-1(p) for p evenly spaced in [0.5, offset] (offset = 0.9677 avoids Phi^-1(1) = inf),
    then normalises everything to [-1, 1] by the largest value. Same as bitsandbytes'
    ``create_normal_map`` (which uses scipy; here ``torch.special.ndtri`` is Phi^-1).
    """
    if not 0.5 < offset < 1:
        raise ValueError(f"offset must lie in (0.5, 1), got {offset!r}")
    p = torch.linspace(offset, 0.5, 9, dtype=torch.float64)
    positive = torch.special.ndtri(p[:-1])  # 8 positive quantiles
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()  # (16,)


def number_formats() -> list[dict]:
    """Range, resolution near 1.0 and bytes per value of the formats the chapter uses."""
    rows = []
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        fi = torch.finfo(dtype)
        rows.append({"format": name, "bits": fi.bits, "bytes": fi.bits / 8, "min": -fi.max,
                     "max": fi.max, "smallest_normal": fi.tiny, "step_near_1": fi.eps,
                     "levels": "floating point"})
    for bits in (8, 4):
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        rows.append({"format": f"int{bits}", "bits": bits, "bytes": bits / 8, "min": float(lo),
                     "max": float(hi), "smallest_normal": 1.0, "step_near_1": 1.0,
                     "levels": str(2 ** bits)})
    code = nf4_code()
    rows.append({"format": "nf4 (x absmax)", "bits": 4, "bytes": 0.5, "min": -1.0, "max": 1.0,
                 "smallest_normal": float(code[code > 0].min()),
                 "step_near_1": float(code[-1] - code[-2]), "levels": "16"})
    return rows


# --------------------------------------------------------------------------- affine quantization

def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Integer range: symmetric [-(2^(b-1)-1), 2^(b-1)-1] (the restricted range, so that
    -q_max..q_max is symmetric around an exact 0), asymmetric [0, 2^b - 1]."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8, symmetric: bool = True):
    """Scale ``s`` (float32) and integer zero point ``z`` (int32) for the real range [lo, hi].

    Symmetric: s = max(|lo|, |hi|) / q_max, z = 0. Asymmetric: the range is first widened to
    contain 0, s = (hi - lo) / (q_max - q_min), z = q_min - round(lo / s), an integer in
    [q_min, q_max], so real 0 maps exactly to z. A zero range (all-zero input) gets s = 1: any scale
    represents 0 exactly, and dividing by 0 would not.
    """
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize(x: torch.Tensor, scale, zero_point, bits: int = 8, symmetric: bool = True):
    """x_q = clamp(round(x / s) + z, q_min, q_max): int8 when symmetric, uint8 when asymmetric.

    ``torch.round`` rounds halves to even; the error bound |x - s (x_q - z)| <= s/2 for x inside
    the range holds either way.
    """
    qmin, qmax = qrange(bits, symmetric)
    q = torch.clamp(torch.round(x.float() / scale) + zero_point, qmin, qmax)
    return q.to(torch.int8 if symmetric else torch.uint8)


def dequantize(x_q: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """x ~ s (x_q - z), in float32."""
    return scale * (x_q.to(torch.float32) - zero_point)


def _rows_view(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """``x`` as (rows, columns): one scale per row."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return x.reshape(1, -1)  # (1, N)
    if x.dim() < 2:
        raise ValueError(f"granularity={granularity!r} needs a tensor of at least 2 dimensions "
                         f"(out_features, in_features), got shape {tuple(x.shape)}")
    if granularity == "channel":
        return x.reshape(x.shape[0], -1)  # (C_out, rest)
    _check_group_size(group_size, x.shape[-1])
    return x.reshape(-1, group_size)  # (C_out * C_in / g, g)


@dataclass
class QuantizedTensor:
    """Integer values with their scales and zero points (one per row of the grouped view)."""

    q: torch.Tensor  # (rows, columns) int8 / uint8
    scale: torch.Tensor  # (rows, 1) float32
    zero_point: torch.Tensor  # (rows, 1) int32
    shape: tuple
    bits: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero_point).reshape(self.shape)

    def nbytes(self, scale_bytes: int = 2) -> float:
        """Bytes if the integers were bit-packed and scales (and zero points) stored in
        ``scale_bytes`` each: bits x n / 8 + per-row metadata."""
        per_row = scale_bytes * (1 if self.symmetric else 2)
        return self.q.numel() * self.bits / 8 + self.q.shape[0] * per_row


def quantize_tensor(x: torch.Tensor, bits: int = 8, symmetric: bool = True,
                    granularity: str = "channel", group_size: int | None = None,
                    clip_ratio: float = 1.0) -> QuantizedTensor:
    """Quantize ``x`` with one (scale, zero point) per tensor, per output channel (row) or per
    group of ``group_size`` consecutive input columns, from the min-max range times ``clip_ratio``
    (clip_ratio < 1 clips the largest values to shrink s for everything else)."""
    check_tensor("x", x, floating=True, nonempty=True)
    check_bits(bits)
    if not isinstance(clip_ratio, (int, float)) or not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must lie in (0, 1], got {clip_ratio!r}")
    rows = _rows_view(x.detach().float(), granularity, group_size)
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)  # (R, 1)
    scale, zero_point = scale_zero_point(lo * clip_ratio, hi * clip_ratio, bits, symmetric)
    q = quantize(rows, scale, zero_point, bits, symmetric)
    return QuantizedTensor(q, scale, zero_point, tuple(x.shape), bits, symmetric)


def fake_quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True,
                  granularity: str = "channel", group_size: int | None = None,
                  clip_ratio: float = 1.0) -> torch.Tensor:
    """Quantize then dequantize: the float tensor the quantized one stands for."""
    return quantize_tensor(x, bits, symmetric, granularity, group_size,
                           clip_ratio).dequantize().to(x.dtype)


def dynamically_quantize_per_channel(x: torch.Tensor, quant_min: int = -127,
                                     quant_max: int = 127):
    """gpt-fast's helper: symmetric int8 per output row -> ``(int8 values, scales, zero_points)``.

    gpt-fast uses quant_min=-128 with scale amax / 127.5; here the restricted range -127..127 with
    scale amax / 127 so that the code is symmetric (the default ``quantize_tensor`` convention).
    """
    if (quant_min, quant_max) != (-127, 127):
        raise ValueError(f"only the symmetric int8 range (-127, 127) is supported, got "
                         f"({quant_min}, {quant_max})")
    qt = quantize_tensor(x, bits=8, symmetric=True, granularity="channel")
    return qt.q.reshape(x.shape), qt.scale.squeeze(1), qt.zero_point.squeeze(1)


def quantization_error(x: torch.Tensor, **kwargs) -> dict[str, float]:
    """Error of ``fake_quantize(x, **kwargs)``: MSE, max |error|, the rounding bound max(s)/2,
    the fraction of values clipped, and the signal-to-quantization-noise ratio in dB."""
    qt = quantize_tensor(x, **kwargs)
    err = (qt.dequantize() - x.float()).flatten()
    qmin, qmax = qrange(qt.bits, qt.symmetric)
    clipped = ((qt.q.to(torch.int32) == qmin) | (qt.q.to(torch.int32) == qmax)).float()
    # a value sitting at q_min/q_max was clipped only if its rounding error exceeds s/2
    rows = _rows_view(x.detach().float(), kwargs.get("granularity", "channel"),
                      kwargs.get("group_size"))
    row_err = (qt.dequantize().reshape(rows.shape) - rows).abs()
    clipped = (clipped * (row_err > qt.scale / 2 * (1 + 1e-5))).mean().item()
    mse = err.pow(2).mean().item()
    signal = x.float().pow(2).mean().item()
    return {"mse": mse, "max_abs_error": err.abs().max().item(),
            "rounding_bound": qt.scale.max().item() / 2, "clipped_fraction": clipped,
            "sqnr_db": 10 * math.log10(signal / mse) if mse > 0 and signal > 0 else float("inf")}


def granularity_table(weights: dict[str, torch.Tensor], bits: int = 8,
                      group_size: int = 64) -> list[dict]:
    """Relative MSE (error power / signal power) of symmetric round-to-nearest per tensor, per
    channel and per group, for each named weight matrix."""
    rows = []
    for name, w in weights.items():
        signal = w.float().pow(2).mean().item()
        row = {"weight": name, "shape": "x".join(map(str, w.shape)),
               "max|w|/std": (w.abs().max() / w.float().std()).item()}
        for gran in GRANULARITIES:
            err = quantization_error(w, bits=bits, granularity=gran, group_size=group_size)
            row[f"rel_mse_{gran}"] = err["mse"] / signal
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- int4 packing

def pack_int4(q: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Two 4-bit integers per byte: element 2i in the low nibble, 2i+1 in the high nibble.

    ``q`` holds integers in [-8, 7] (signed) or [0, 15] (unsigned), last dimension even;
    returns uint8 with the last dimension halved. Two's complement: -1 -> 0b1111.
    """
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"q's last dimension must be even to pack pairs, got shape "
                         f"{tuple(q.shape)}")
    lo, hi = (-8, 7) if signed else (0, 15)
    if q.numel() and (q.min() < lo or q.max() > hi):
        raise ValueError(f"q values must lie in [{lo}, {hi}] for signed={signed}, got "
                         f"[{int(q.min())}, {int(q.max())}]")
    nibbles = q.to(torch.int16) & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 (..., n) -> int8 (..., 2n)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 tensor, got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)}")
    p = packed.to(torch.int16)
    both = torch.stack([p & 0xF, p >> 4], dim=-1)  # (..., n, 2)
    if signed:
        both = torch.where(both >= 8, both - 16, both)
    return both.flatten(-2).to(torch.int8)


# --------------------------------------------------------------------------- integer GEMM

def int8_gemm_terms(a_q: torch.Tensor, a_zp, b_q: torch.Tensor, b_zp) -> dict[str, torch.Tensor]:
    """The four int32 terms of sum_k (a_q - z_a)(b_q - z_b) for A (M, K) and B (K, N)
    (Jacob et al. 2018, eq. 7): A_q B_q - z_b rowsum(A_q) - z_a colsum(B_q) + K z_a z_b."""
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[0]:
        raise ValueError(f"a_q must be (M, K) and b_q (K, N), got {tuple(a_q.shape)} and "
                         f"{tuple(b_q.shape)}")
    for name, t in (("a_q", a_q), ("b_q", b_q)):
        if t.dtype not in (torch.int8, torch.uint8):
            raise TypeError(f"{name} must be int8 or uint8, got {t.dtype}")
    a32, b32 = a_q.to(torch.int32), b_q.to(torch.int32)
    a_zp, b_zp = torch.as_tensor(a_zp, dtype=torch.int32), torch.as_tensor(b_zp, dtype=torch.int32)
    k = a_q.shape[1]
    if a_q.dtype == torch.int8 and b_q.dtype == torch.int8 and hasattr(torch, "_int_mm") \
            and a_q.shape[0] > 16 and k % 8 == 0 and b_q.shape[1] % 8 == 0:
        products = torch._int_mm(a_q, b_q)  # int8 x int8 -> int32 kernel
    else:
        # (M, N), exact in int32 while K * max|product| < 2^31: int8 x int8 products are at most
        # 2^14 in magnitude (K < 2^17); uint8 x uint8 products reach 255^2 < 2^16 (K < 2^15)
        products = a32 @ b32
    return {"A_q B_q": products,  # (M, N); the next two broadcast to (M, N)
            "z_b rowsum(A_q)": b_zp * a32.sum(dim=1, keepdim=True, dtype=torch.int32),
            "z_a colsum(B_q)": a_zp * b32.sum(dim=0, keepdim=True, dtype=torch.int32),
            "K z_a z_b": k * a_zp * b_zp}


def int8_gemm(a_q: torch.Tensor, a_scale, a_zp, b_q: torch.Tensor, b_scale, b_zp) -> torch.Tensor:
    """A B from quantized operands: s_a s_b (A_q B_q - z_b rowsum A_q - z_a colsum B_q + K z_a z_b),
    all sums in int32, one float multiply per output; ``b_scale``, ``b_zp`` may be per column."""
    t = int8_gemm_terms(a_q, a_zp, b_q, b_zp)
    acc = t["A_q B_q"] - t["z_b rowsum(A_q)"] - t["z_a colsum(B_q)"] + t["K z_a z_b"]  # int32
    return torch.as_tensor(a_scale) * torch.as_tensor(b_scale) * acc.to(torch.float32)


def requantize(y: torch.Tensor, out_scale, out_zp, bits: int = 8, symmetric: bool = False):
    """Map a real-valued result (e.g. ``int8_gemm``'s) back to integers for the next layer:
    y_q = clamp(round(y / s_y) + z_y). In an integer-only kernel the factor s_a s_b / s_y is a
    fixed-point multiplier applied to the int32 accumulator (Jacob et al. 2018, Sec. 2.2)."""
    return quantize(y, out_scale, out_zp, bits, symmetric)


# --------------------------------------------------------------------------- calibration

def mse_optimal_clip(x: torch.Tensor, bits: int = 8, symmetric: bool = True,
                     grid: int = 100) -> tuple[float, float]:
    """The clip ratio c in {1/grid, 2/grid, ..., 1} minimising the MSE of per-tensor fake
    quantization with range c x [min, max]; returns ``(c, mse)``. Small c: large clipping error;
    c = 1: the largest rounding error (s/2 with the largest s)."""
    check_tensor("x", x, floating=True, nonempty=True)
    check_bits(bits)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    flat = x.detach().float().flatten()
    lo, hi = flat.min(), flat.max()
    ratios = torch.arange(1, grid + 1, dtype=torch.float32) / grid  # (G,)
    scale, zp = scale_zero_point(lo * ratios, hi * ratios, bits, symmetric)  # (G,)
    mse = torch.stack([  # one ratio at a time: memory O(numel), not O(grid x numel)
        (dequantize(quantize(flat, s, z, bits, symmetric), s, z) - flat).pow(2).mean()
        for s, z in zip(scale, zp)])
    best = int(torch.argmin(mse))  # first minimum: the smallest ratio among ties
    return ratios[best].item(), mse[best].item()


def calibrate_range(x: torch.Tensor, method: str = "minmax", bits: int = 8,
                    symmetric: bool = True, percentile: float = 99.99) -> tuple[float, float]:
    """Real range [lo, hi] to quantize ``x`` with: ``minmax`` (every value representable),
    ``percentile`` (the ``percentile``-th and (100 - percentile)-th percentiles, clipping rare
    outliers) or ``mse`` (the clip of ``mse_optimal_clip``)."""
    check_tensor("x", x, floating=True, nonempty=True)
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    flat = x.detach().float().flatten()
    if method == "minmax":
        return flat.min().item(), flat.max().item()
    if method == "percentile":
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must lie in (50, 100], got {percentile!r}")
        n = flat.numel()
        k_hi = min(n, max(1, math.ceil(percentile / 100 * n)))
        k_lo = max(1, n + 1 - k_hi)
        return flat.kthvalue(k_lo).values.item(), flat.kthvalue(k_hi).values.item()
    ratio, _ = mse_optimal_clip(x, bits, symmetric)
    return flat.min().item() * ratio, flat.max().item() * ratio


class StaticActivationQuantizer:
    """Static quantization of an activation: ``observe`` calibration batches, ``freeze`` one range
    (by ``calibrate_range``), then ``__call__`` fake-quantizes every later batch with that fixed
    range. ``dynamic=True`` instead takes each batch's own min-max range (dynamic quantization:
    no calibration, a min/max reduction per batch at run time)."""

    def __init__(self, bits: int = 8, symmetric: bool = False, dynamic: bool = False,
                 max_samples: int = 500_000):
        self.bits, self.symmetric, self.dynamic = check_bits(bits), symmetric, dynamic
        self.max_samples, self.samples, self.range = max_samples, [], None

    def observe(self, x: torch.Tensor) -> None:
        self.samples.append(x.detach().float().flatten())

    def freeze(self, method: str = "minmax", **kwargs) -> tuple[float, float]:
        """Fix the range from everything observed: min-max over all of it; percentile and MSE on
        an evenly strided subsample of at most ``max_samples`` values (plus the extremes)."""
        if not self.samples:
            raise ValueError("observe at least one calibration batch before freeze()")
        values = torch.cat(self.samples)
        if method != "minmax" and values.numel() > self.max_samples:
            step = -(-values.numel() // self.max_samples)
            values = torch.cat([values[::step], values.min()[None], values.max()[None]])
        self.range = calibrate_range(values, method, self.bits, self.symmetric, **kwargs)
        return self.range

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            lo, hi = x.min(), x.max()
        elif self.range is None:
            raise ValueError("call freeze() after observing calibration data (or use dynamic=True)")
        else:
            lo, hi = self.range
        scale, zp = scale_zero_point(lo, hi, self.bits, self.symmetric)
        return dequantize(quantize(x, scale, zp, self.bits, self.symmetric), scale, zp).to(x.dtype)


# --------------------------------------------------------------------------- LLM.int8()

def llm_int8_matmul(x: torch.Tensor, weight: torch.Tensor,
                    threshold: float = LLM_INT8_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() (Dettmers et al. 2022, Sec. 3): x (T, K) @ weight (N, K)^T.

    Feature columns of x holding any |value| >= threshold (the outliers) are multiplied in float;
    the rest with vector-wise int8: one absmax scale per row of x and per output row of the weight,
    int32 accumulation, rescaled by the outer product of the scales. ``threshold=0`` disables the
    decomposition (plain vector-wise int8). Returns ``(output, outlier column indices)``.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    x2 = x.reshape(-1, x.shape[-1]).float()  # (T, K)
    outliers = (x2.abs() >= threshold).any(0) if threshold > 0 else torch.zeros(
        x2.shape[1], dtype=torch.bool)
    regular = ~outliers
    out = torch.zeros(x2.shape[0], weight.shape[0])
    if regular.any():
        xq = quantize_tensor(x2[:, regular], 8, True, "channel")  # per row of x (token)
        wq = quantize_tensor(weight[:, regular].float(), 8, True, "channel")  # per output row
        out += int8_gemm(xq.q, xq.scale, 0, wq.q.T.contiguous(), wq.scale.T, 0)
    if outliers.any():
        out += x2[:, outliers] @ weight[:, outliers].float().T
    return out.reshape(*x.shape[:-1], weight.shape[0]), outliers.nonzero().flatten()


def bnb_linear8bit(linear: nn.Linear, threshold: float = LLM_INT8_THRESHOLD):
    """A bitsandbytes ``Linear8bitLt`` holding ``linear``'s weights, with the LLM.int8() outlier
    threshold passed explicitly (without it bitsandbytes does no outlier decomposition)."""
    from utils.device import require_package

    bnb = require_package("bitsandbytes", "LLM.int8() with bitsandbytes")
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features,
                                bias=linear.bias is not None, has_fp16_weights=False,
                                threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return layer.to(linear.weight.device)  # the move is what quantizes the weight to int8


def bnb_nf4_roundtrip(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False):
    """bitsandbytes' NF4 quantize + dequantize of ``weight`` (runs on CPU in bitsandbytes 0.50)."""
    from utils.device import require_package

    require_package("bitsandbytes", "NF4 with bitsandbytes")
    import bitsandbytes.functional as bnbF

    packed, state = bnbF.quantize_4bit(weight.float(), blocksize=block_size, quant_type="nf4",
                                       compress_statistics=double_quant)
    return bnbF.dequantize_4bit(packed, state).reshape(weight.shape)


# --------------------------------------------------------------------------- NF4

def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` for each element of ``x``."""
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x, midpoints).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax NF4: each block of ``block_size`` consecutive values is divided by its
    absmax (into [-1, 1]) and mapped to the nearest of the 16 NF4 values. Returns
    ``(4-bit indices packed two per byte, absmax per block in float32)``."""
    check_tensor("w", w, floating=True, nonempty=True)
    blocks = w.detach().float().reshape(-1)
    _check_group_size(block_size, blocks.numel())
    blocks = blocks.reshape(-1, block_size)  # (nblocks, block)
    absmax = blocks.abs().amax(1, keepdim=True)  # (nblocks, 1)
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    idx = _nearest_code(normed, nf4_code())
    if idx.shape[1] % 2:
        raise ValueError(f"block_size must be even to pack 4-bit pairs, got {block_size}")
    return pack_int4(idx, signed=False), absmax.squeeze(1)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape) -> torch.Tensor:
    idx = unpack_int4(packed, signed=False).long()  # (nblocks, block)
    return (nf4_code()[idx] * absmax[:, None]).reshape(shape)


def double_quantize(absmax: torch.Tensor, block_size: int = 256):
    """QLoRA's double quantization (Sec. 3): the float32 absmax constants, minus their mean, are
    themselves quantized to 8 bits with one float32 scale per ``block_size`` of them. Returns
    ``(int8 values, float32 scales, mean)``. (bitsandbytes uses an 8-bit dynamic float map for
    this second level; symmetric int8 here, same bit budget.)"""
    check_tensor("absmax", absmax, floating=True, nonempty=True)
    mean = absmax.float().mean()
    centred = absmax.float() - mean
    pad = (-centred.numel()) % block_size
    centred = F.pad(centred, (0, pad)).reshape(-1, block_size)
    qt = quantize_tensor(centred, 8, True, "channel")
    return qt.q, qt.scale.squeeze(1), mean


def double_dequantize(q: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor, n: int):
    return (q.float() * scales[:, None]).flatten()[:n] + mean


def nf4_bits_per_parameter(block_size: int = 64, double_quant: bool = False,
                           dq_block_size: int = 256) -> float:
    """4 bits + the absmax overhead: 32 / block_size bits, or with double quantization
    8 / block_size + 32 / (block_size x dq_block_size) (QLoRA Sec. 3: 4.5 and 4.127 at 64, 256)."""
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * dq_block_size)
    return 4 + 32 / block_size


def reconstruction_error_nf4_vs_int4(w: torch.Tensor, block_size: int = 64) -> dict[str, float]:
    """Relative MSE of NF4 (block absmax), NF4 with double-quantized absmax, and symmetric int4
    (-7..7, same blocks) on the same weights."""
    signal = w.float().pow(2).mean().item()
    packed, absmax = quantize_nf4(w, block_size)
    nf4 = dequantize_nf4(packed, absmax, w.shape)
    dq = double_dequantize(*double_quantize(absmax), absmax.numel())
    nf4_dq = dequantize_nf4(packed, dq, w.shape)
    flat = w.reshape(-1, block_size)
    int4 = fake_quantize(flat, 4, True, "channel").reshape(w.shape)
    asym4 = fake_quantize(flat, 4, False, "channel").reshape(w.shape)
    rel = lambda approx: (approx - w.float()).pow(2).mean().item() / signal  # noqa: E731
    return {"nf4": rel(nf4), "nf4_double_quant": rel(nf4_dq), "int4_symmetric": rel(int4),
            "int4_asymmetric": rel(asym4)}


# --------------------------------------------------------------------------- weight-only Linear

class WeightOnlyInt8Linear(nn.Module):
    """gpt-fast's weight-only int8 Linear: int8 weight (out, in) and one float scale per output
    channel; the forward dequantizes and multiplies in the activation dtype:
    y = (x W_q^T) * s (+ b). Saves 4x weight bytes; speed needs a fused kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 per-channel, bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class WeightOnlyGroupwiseLinear(nn.Module):
    """Weight-only b-bit Linear (2 <= b <= 8), asymmetric, one (scale, integer zero point) per
    group of ``group_size`` input columns of each output row (``None``: per output row). 4-bit
    values are stored packed two per byte; other widths one per byte (a real kernel would pack
    3 bits too: ``weight_bytes`` counts both). Forward: dequantize, then ``F.linear``."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4,
                 group_size: int | None = 128, bias: bool = False):
        super().__init__()
        self.bits = check_bits(bits)
        self.group_size = group_size or in_features
        _check_group_size(self.group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        groups = in_features // self.group_size
        stored = in_features // 2 if bits == 4 else in_features
        self.register_buffer("weight", torch.zeros(out_features, stored, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")

    def int_weight(self) -> torch.Tensor:
        if self.bits == 4:
            return unpack_int4(self.weight, signed=False).to(torch.uint8)
        return self.weight

    def dequantized_weight(self) -> torch.Tensor:
        q = self.int_weight().reshape(self.out_features, -1, self.group_size)  # (N, G, g)
        w = self.scales[..., None] * (q.float() - self.zeros[..., None].float())
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))


def _groupwise_buffers(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                       out_features: int):
    """State-dict entries of a ``WeightOnlyGroupwiseLinear`` from (N, in) integers and (N, G)
    scales and zero points."""
    q = q.reshape(out_features, -1).to(torch.uint8)
    weight = pack_int4(q, signed=False) if bits == 4 else q
    return {"weight": weight, "scales": scale.reshape(out_features, -1).float(),
            "zeros": zero.reshape(out_features, -1).to(torch.uint8)}


class QuantHandler:
    """gpt-fast's interface: ``create_quantized_state_dict()`` computes the quantized tensors from
    the float model; ``convert_for_runtime()`` swaps the Linear modules for quantized ones (empty);
    ``quantize()`` does both and loads the state dict. The model is changed in place."""

    def __init__(self, model: nn.Module, skip=("lm_head",)):
        self.model, self.skip = model, skip

    def create_quantized_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _new_linear(self, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def convert_for_runtime(self) -> nn.Module:
        for name, linear in find_linears(self.model, self.skip).items():
            replace_module(self.model, name, self._new_linear(linear))
        return self.model

    def quantize(self) -> nn.Module:
        state = self.create_quantized_state_dict()
        model = self.convert_for_runtime()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"quantized state dict has keys the model lacks: {unexpected[:5]}")
        return model.eval()


class WeightOnlyInt8QuantHandler(QuantHandler):
    """Per-channel symmetric int8 weights (gpt-fast ``WeightOnlyInt8QuantHandler``)."""

    @torch.no_grad()
    def create_quantized_state_dict(self):
        state = dict(self.model.state_dict())
        for name, linear in find_linears(self.model, self.skip).items():
            q, scales, _ = dynamically_quantize_per_channel(linear.weight.float())
            state[f"{name}.weight"], state[f"{name}.scales"] = q, scales
        return state

    def _new_linear(self, linear):
        return WeightOnlyInt8Linear(linear.in_features, linear.out_features,
                                    bias=linear.bias is not None)


class WeightOnlyGroupwiseQuantHandler(QuantHandler):
    """Round-to-nearest (RTN) b-bit asymmetric weights with groups of ``group_size`` columns."""

    def __init__(self, model, bits: int = 4, group_size: int | None = 128, skip=("lm_head",)):
        super().__init__(model, skip)
        self.bits, self.group_size = check_bits(bits), group_size

    @torch.no_grad()
    def create_quantized_state_dict(self):
        state = dict(self.model.state_dict())
        for name, linear in find_linears(self.model, self.skip).items():
            g = self.group_size or linear.in_features
            qt = quantize_tensor(linear.weight.float(), self.bits, False, "group", g)
            for key, value in _groupwise_buffers(qt.q, qt.scale, qt.zero_point, self.bits,
                                                 linear.out_features).items():
                state[f"{name}.{key}"] = value
        return state

    def _new_linear(self, linear):
        return WeightOnlyGroupwiseLinear(linear.in_features, linear.out_features, self.bits,
                                         self.group_size, bias=linear.bias is not None)


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4,
                         group_size: int | None = 128, block_size: int = 128,
                         percdamp: float = 0.01):
    """GPTQ (Frantar et al. 2023, Algorithm 1): quantize W (N, K) column by column, each time
    spreading the error of column j over the not-yet-quantized columns with the inverse Hessian
    (optimal brain surgeon update), in blocks of ``block_size`` columns (lazy batch updates);
    H^-1 enters through its upper Cholesky factor. Group (scale, zero point) of ``group_size``
    columns are fixed from the *updated* weights when the first column of the group is reached.
    Returns ``(q (N, K) uint8, scales (N, G), zeros (N, G))``, asymmetric, same layout as RTN."""
    check_bits(bits)
    W = weight.detach().float().clone()  # (N, K)
    n_out, k = W.shape
    group_size = group_size or k
    _check_group_size(group_size, k)
    H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs that are always 0: any weight does, set it to 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(k)  # dampening, Sec. 4 "Cholesky"
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    qmin, qmax = qrange(bits, symmetric=False)
    Q = torch.zeros(n_out, k, dtype=torch.uint8)
    scales = torch.zeros(n_out, k // group_size)
    zeros = torch.zeros(n_out, k // group_size, dtype=torch.int32)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # new group: its range from the current (updated) weights
                g = col // group_size
                block = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                s, z = scale_zero_point(block.min(1).values, block.max(1).values, bits, False)
                scales[:, g], zeros[:, g] = s, z
            s, z = scales[:, col // group_size], zeros[:, col // group_size]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
            Q[:, col] = q.to(torch.uint8)
            err = (w - s * (q - z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update of the later columns
    return Q, scales, zeros


class GPTQQuantHandler(WeightOnlyGroupwiseQuantHandler):
    """Weight-only b-bit quantization by GPTQ, stored exactly like RTN (same runtime modules)."""

    def __init__(self, model, calibration_ids: torch.Tensor | None = None, bits: int = 4,
                 group_size: int | None = 128, block_size: int = 128, percdamp: float = 0.01,
                 skip=("lm_head",), hessians: dict[str, torch.Tensor] | None = None):
        super().__init__(model, bits, group_size, skip)
        if calibration_ids is None and hessians is None:
            raise ValueError("GPTQ needs calibration_ids (sequences, tokens) or precomputed "
                             "hessians from collect_hessians()")
        self.calibration_ids, self.block_size, self.percdamp = calibration_ids, block_size, percdamp
        self.hessians = hessians

    @torch.no_grad()
    def create_quantized_state_dict(self):
        hessians = self.hessians or collect_hessians(self.model, self.calibration_ids, self.skip)
        state = dict(self.model.state_dict())
        for name, linear in find_linears(self.model, self.skip).items():
            q, s, z = gptq_quantize_weight(linear.weight, hessians[name], self.bits,
                                           self.group_size, self.block_size, self.percdamp)
            for key, value in _groupwise_buffers(q, s, z, self.bits,
                                                 linear.out_features).items():
                state[f"{name}.{key}"] = value
        return state


def quantize_copy(model: nn.Module, handler_cls, *args, **kwargs) -> nn.Module:
    """A quantized deep copy of ``model`` (the original is left as it is)."""
    return handler_cls(copy.deepcopy(model), *args, **kwargs).quantize()


def linear_weight_bytes(model: nn.Module, bit_packed: bool = False, skip=()) -> int:
    """Bytes of the weights of all Linear layers (float, weight-only or dynamic-quantized),
    including scales and zero points, except layers whose name ends with an entry of ``skip``;
    ``bit_packed`` counts b-bit values as b/8 bytes."""
    total = 0
    for name, module in model.named_modules():
        if skip and name.endswith(tuple(skip)):
            continue
        if isinstance(module, nn.Linear):
            total += module.weight.nbytes
        elif isinstance(module, WeightOnlyInt8Linear):
            total += module.weight.nbytes + module.scales.nbytes
        elif isinstance(module, WeightOnlyGroupwiseLinear):
            values = module.weight.nbytes
            if bit_packed and module.bits != 4:
                values = math.ceil(module.in_features * module.out_features * module.bits / 8)
            total += values + module.scales.nbytes + module.zeros.nbytes
            if isinstance(module, AWQLinear):
                total += module.input_scale.nbytes
        elif isinstance(module, FusedInt8Linear):
            total += module.weight.nbytes + module.scales.nbytes
        elif isinstance(module, FusedInt4Linear):  # packed values + fp32 scale and offset
            total += module.packed.nbytes + module.scales_and_zeros.nbytes
        elif isinstance(module, EmulatedFormatLinear):
            total += math.ceil(module.weight.numel() * module.bits_per_weight / 8)
        elif isinstance(module, W8A8Linear):  # int8 values, fp32 scale per row, smoothing
            total += module.weight.numel() + 4 * module.out_features + module.smooth.nbytes
        elif hasattr(module, "_packed_params") and callable(getattr(module, "weight", None)):
            w = module.weight()  # a quantized tensor: 1 byte per value, plus its scales
            total += w.numel() * w.element_size()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += w.q_per_channel_scales().nbytes + w.q_per_channel_zero_points().nbytes
            else:
                total += 8 + 8  # one float64 scale, one int64 zero point
    return total


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``, the PyTorch tutorial's "model size"."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


# --------------------------------------------------------------------------- bits per weight

def groupwise_bits_per_weight(bits: int, group_size: int, scale_bits: int = 32,
                              zero_bits: int = 8) -> float:
    """Stored bits per weight of the course's group-wise format: ``bits`` per value plus one
    ``scale_bits`` scale and one ``zero_bits`` zero point per group of ``group_size`` values
    (fp32 scale and uint8 zero point: 4 + 40/32 = 5.25 bits at 4 bits, g = 32)."""
    check_bits(bits)
    check_positive_int("group_size", group_size)
    return bits + (scale_bits + zero_bits) / group_size


# --------------------------------------------------------------------------- fused CPU kernels

class FusedInt8Linear(nn.Module):
    """Weight-only int8 with torch's fused CPU kernel ``torch._weight_int8pack_mm(x, w, s)``
    (x (M, K) float, w (N, K) int8, s (N,) in x's dtype: y = x (w s)^T without materialising a
    float weight), as gpt-fast uses it on CPU. Same buffers as ``WeightOnlyInt8Linear``.
    ``compute_dtype``: the activations are cast to it for the kernel (gpt-fast runs bf16; in
    torch 2.13 the fp32 variant of these CPU kernels is a slow path), the output cast back."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias=None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.compute_dtype = compute_dtype
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.to(compute_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.float())

    @classmethod
    def from_readable(cls, module: "WeightOnlyInt8Linear",
                      compute_dtype: torch.dtype = torch.bfloat16) -> "FusedInt8Linear":
        return cls(module.weight, module.scales, module.bias, compute_dtype)  # shares buffers

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        q, scales, _ = dynamically_quantize_per_channel(linear.weight.detach().float())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scales, bias, compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"compute_dtype={self.compute_dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class FusedInt4Linear(nn.Module):
    """Weight-only int4 with groups, with torch's fused CPU kernels (as gpt-fast on CPU):
    ``torch._convert_weight_to_int4pack_for_cpu(q, 1)`` packs q (N, K) int32 in [0, 15] into
    (N, K/2) uint8, and ``torch._weight_int4pack_mm_for_cpu(x, packed, g, scales_and_zeros)``
    computes x W^T with W[n, k] = (q - 8) * scale + zero per group, scales_and_zeros (K/g, N, 2).
    Our asymmetric format is W = s (q - z) with an integer z, i.e. scale = s, zero = s (8 - z)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias=None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.out_features, self.in_features = q.shape
        self.group_size = _check_group_size(group_size, self.in_features)
        if self.out_features % 16:
            raise ValueError(f"out_features must be a multiple of 16 for torch's int4 CPU "
                             f"packing, got {self.out_features}")
        s = scales.float()  # (N, G)
        offset = s * (8 - zeros.float())
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 1))
        self.register_buffer("scales_and_zeros",  # stored in compute_dtype (bf16: 2 x 16 bits
                             torch.stack([s, offset], -1).transpose(0, 1)  # per group)
                             .to(compute_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.float())

    @classmethod
    def from_readable(cls, module: "WeightOnlyGroupwiseLinear",
                      compute_dtype: torch.dtype = torch.bfloat16) -> "FusedInt4Linear":
        if module.bits != 4:
            raise ValueError(f"module.bits must be 4 for the int4 kernel, got {module.bits}")
        q = module.int_weight().reshape(module.out_features, module.in_features)
        return cls(q, module.scales, module.zeros, module.group_size, module.bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32,
                    compute_dtype: torch.dtype = torch.bfloat16):
        qt = quantize_tensor(linear.weight.detach().float(), 4, False, "group", group_size)
        n = linear.out_features
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(qt.q.reshape(n, -1), qt.scale.reshape(n, -1), qt.zero_point.reshape(n, -1),
                   group_size, bias, compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, compute_dtype={self.compute_dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                              self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


def fused_weight_only_copy(model: nn.Module, bits: int = 8, group_size: int = 32, skip=(),
                           compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of ``model`` (sharing its other parameters) whose Linear layers (all but those
    ending with ``skip``: by default the output head too) are ``FusedInt8Linear`` (``bits=8``,
    per channel) or ``FusedInt4Linear`` (``bits=4``, groups of ``group_size``), built straight
    from the float weights: for the decode benchmark on a large model."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 for torch's fused CPU kernels, got {bits!r}")
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    out = copy.deepcopy(model, memo)
    for name, linear in find_linears(out, skip).items():
        new = FusedInt8Linear.from_linear(linear, compute_dtype) if bits == 8 else \
            FusedInt4Linear.from_linear(linear, group_size, compute_dtype)
        replace_module(out, name, new)
    return out.eval()


def fused_copy(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of a weight-only quantized ``model`` whose ``WeightOnlyInt8Linear`` and 4-bit
    ``WeightOnlyGroupwiseLinear`` modules run torch's fused CPU kernels (``FusedInt8Linear``,
    ``FusedInt4Linear``). Parameters and int8 buffers are shared with ``model``, not copied."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    fused = copy.deepcopy(model, memo)
    for name, module in list(fused.named_modules()):
        if isinstance(module, WeightOnlyInt8Linear):
            replace_module(fused, name, FusedInt8Linear.from_readable(module, compute_dtype))
        elif isinstance(module, WeightOnlyGroupwiseLinear) and module.bits == 4 \
                and not isinstance(module, AWQLinear):
            replace_module(fused, name, FusedInt4Linear.from_readable(module, compute_dtype))
    return fused


def shared_quantize_copy(model: nn.Module, handler_cls, *args, **kwargs) -> nn.Module:
    """``quantize_copy`` without duplicating the float weights first: the copy shares every
    parameter of ``model`` until its handler swaps the Linear layers (for models of 1 GB+)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return handler_cls(copy.deepcopy(model, memo), *args, **kwargs).quantize()


def decode_speed(models: dict, prompt_len: int = 32, min_run_time: float = 0.5,
                 weight_bytes: dict | None = None, batch_size: int = 1) -> dict[str, dict]:
    """Decode of ``utils.llama.CourseLlama`` variants, timed side by side in one
    ``utils.bench.compare`` run: each call is one decode step (one token per sequence of
    ``batch_size`` against a static KV cache holding ``prompt_len`` tokens). Returns ``{label:
    {"median_ms", "speedup", "tokens_per_s", "weight_bytes_per_s"}}`` (tokens of the whole
    batch; the last when ``weight_bytes[label]``, the bytes of weights one step reads, is
    given)."""
    from utils.bench import compare
    from utils.llama import StaticKVCache

    check_positive_int("prompt_len", prompt_len)
    check_positive_int("batch_size", batch_size)
    steps = {}
    with torch.inference_mode():
        for label, m in models.items():
            cache = StaticKVCache(m.config, batch_size, prompt_len + 1)
            ids = torch.randint(0, m.config.vocab_size, (batch_size, prompt_len),
                                generator=torch.Generator().manual_seed(0))
            m(ids, cache, torch.arange(prompt_len))  # prefill
            tok, pos = ids[:, -1:], torch.tensor([prompt_len])
            steps[label] = (lambda m=m, c=cache, t=tok, p=pos: m(t, c, p))
        timings = compare(steps, min_run_time=min_run_time, warmup=1)
    out = {}
    for label, t in timings.items():
        row = {"median_ms": t["median_ms"], "speedup": t["speedup"],
               "tokens_per_s": batch_size * 1e3 / t["median_ms"]}
        if weight_bytes and label in weight_bytes:
            row["weight_bytes_per_s"] = weight_bytes[label] / (t["median_ms"] / 1e3)
        out[label] = row
    return out


# --------------------------------------------------------------------------- calibration statistics

# --------------------------------------------------------------------------- SmoothQuant (W8A8)

def smoothquant_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5,
                       eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant (Xiao et al. 2023, Sec. 4, eq. 4): s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
    for every input channel j, max|W_j| over the output rows of the PyTorch weight (out, in).
    Y = (X diag(s)^-1)(diag(s) W^T): activations are divided by s, weight columns multiplied."""
    check_tensor("act_absmax", act_absmax, floating=True, nonempty=True)
    check_tensor("weight", weight, floating=True, nonempty=True)
    if weight.dim() != 2 or act_absmax.shape != (weight.shape[1],):
        raise ValueError(f"act_absmax must be ({weight.shape[-1]},) for weight (out, in), got "
                         f"{tuple(act_absmax.shape)} and {tuple(weight.shape)}")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    w_absmax = weight.detach().float().abs().amax(0).clamp(min=eps)  # (in,)
    s = act_absmax.float().clamp(min=eps).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=eps)


class W8A8Linear(nn.Module):
    """Simulated W8A8 (int8 weights and int8 activations, as SmoothQuant runs them): weights
    symmetric int8 per output channel, activations symmetric int8 per tensor, scale from each
    batch (dynamic), both dequantized before an fp32 matmul, which equals the integer GEMM up to
    fp32 rounding. With ``smooth`` (in,), x is divided by it and the weight's columns multiplied
    by it before quantization (in a deployment the division folds into the previous norm)."""

    def __init__(self, linear: nn.Linear, smooth: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        smooth = torch.ones(w.shape[1]) if smooth is None else smooth.float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("smooth", smooth)
        self.register_buffer("weight", fake_quantize(w * smooth, 8, True, "channel"))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.float() / self.smooth
        scale = xs.abs().amax().clamp(min=1e-8) / 127
        xq = torch.clamp(torch.round(xs / scale), -127, 127) * scale
        return F.linear(xq, self.weight, self.bias).to(x.dtype)


def smoothquant_copy(model: nn.Module, stats: dict | None = None, alpha: float | None = 0.5,
                     skip=("lm_head",)) -> nn.Module:
    """A copy of ``model`` with every target Linear replaced by ``W8A8Linear``; smoothed with
    ``smoothquant_scales(stats[name]["absmax"], weight, alpha)`` unless ``alpha`` is None."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    out = copy.deepcopy(model, memo)
    for name, linear in find_linears(out, skip).items():
        smooth = None if alpha is None else smoothquant_scales(stats[name]["absmax"],
                                                               linear.weight, alpha)
        replace_module(out, name, W8A8Linear(linear, smooth))
    return out.eval()


# --------------------------------------------------------------------------- AWQ (W4A16)

def awq_search_scale(weight: torch.Tensor, act_absmean: torch.Tensor, hessian: torch.Tensor,
                     bits: int = 4, group_size: int = 128, grid: int = 20):
    """AWQ (Lin et al. 2024, Sec. 3.2-3.3): per-input-channel scales s = s_X^alpha, s_X the mean
    |x_j| of the calibration activations, alpha searched on {0, 1/grid, ..., 1} to minimise the
    layer-output error ||Q(W diag(s)) diag(s)^-1 X - W X||^2, evaluated exactly from H = 2 X^T X
    / n as tr(dW H dW^T) (dW = the weight error). Q is group-wise asymmetric round-to-nearest.
    s is normalised by sqrt(max(s) min(s)) as in the authors' code. Returns
    ``(s (in,), best alpha, losses per alpha)``; alpha = 0 is plain RTN."""
    check_bits(bits)
    w = weight.detach().float()
    h = hessian.float()
    sx = act_absmean.float().clamp(min=1e-6)
    losses, best = [], (None, None, float("inf"))
    for i in range(grid + 1):
        alpha = i / grid
        s = sx.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        w_hat = fake_quantize(w * s, bits, False, "group", group_size) / s
        dw = w_hat - w
        loss = torch.einsum("ij,jk,ik->", dw, h, dw).item() / w.shape[0]
        losses.append(loss)
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], losses


class AWQLinear(WeightOnlyGroupwiseLinear):
    """A ``WeightOnlyGroupwiseLinear`` holding Q(W diag(s)) and dividing its input by s (in a
    deployment s folds into the previous operator, so the runtime cost is that of RTN)."""

    def __init__(self, in_features, out_features, bits=4, group_size=128, bias=False):
        super().__init__(in_features, out_features, bits, group_size, bias)
        self.register_buffer("input_scale", torch.ones(in_features))

    def dequantized_weight(self) -> torch.Tensor:
        return super().dequantized_weight() / self.input_scale  # W ~ Q(W s) / s


class AWQQuantHandler(WeightOnlyGroupwiseQuantHandler):
    """AWQ: ``awq_search_scale`` per layer from ``stats`` (``collect_input_stats``) and
    ``hessians`` (``collect_hessians``), then round-to-nearest of W diag(s)."""

    def __init__(self, model, bits=4, group_size=128, stats=None, hessians=None, grid=20,
                 skip=("lm_head",)):
        super().__init__(model, bits, group_size, skip)
        if stats is None or hessians is None:
            raise ValueError("AWQ needs stats (collect_input_stats) and hessians "
                             "(collect_hessians)")
        self.stats, self.hessians, self.grid, self.alphas = stats, hessians, grid, {}

    @torch.no_grad()
    def create_quantized_state_dict(self):
        state = dict(self.model.state_dict())
        for name, linear in find_linears(self.model, self.skip).items():
            g = self.group_size or linear.in_features
            s, alpha, _ = awq_search_scale(linear.weight, self.stats[name]["absmean"],
                                           self.hessians[name], self.bits, g, self.grid)
            self.alphas[name] = alpha
            qt = quantize_tensor(linear.weight.float() * s, self.bits, False, "group", g)
            for key, value in _groupwise_buffers(qt.q, qt.scale, qt.zero_point, self.bits,
                                                 linear.out_features).items():
                state[f"{name}.{key}"] = value
            state[f"{name}.input_scale"] = s
        return state

    def _new_linear(self, linear):
        return AWQLinear(linear.in_features, linear.out_features, self.bits, self.group_size,
                         bias=linear.bias is not None)


# --------------------------------------------------------------------------- FP8 and MXFP4

FP8_FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # OCP MX v1.0 Sec. 5.3.3
MX_BLOCK = 32  # OCP MX v1.0 Sec. 5, Table 1: k = 32 for MXFP4
FP4_E2M1_EMAX = 2  # largest exponent of E2M1: 6 = 1.5 x 2^2


def fp8_fake_quantize(w: torch.Tensor, fmt: str = "e4m3", granularity: str = "channel"):
    """FP8 emulated on CPU: scale so that max|w| maps to the format's largest finite value
    (448 for E4M3, 57344 for E5M2), one fp32 scale per output row (``channel``) or per tensor,
    cast with torch's ``float8_e4m3fn`` / ``float8_e5m2`` (round to nearest even), cast back."""
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FP8_FORMATS)}, got {fmt!r}")
    check_tensor("w", w, floating=True, nonempty=True)
    dtype, fmax = FP8_FORMATS[fmt]
    rows = _rows_view(w.detach().float(), granularity, None)
    scale = rows.abs().amax(1, keepdim=True) / fmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (rows / scale).clamp(-fmax, fmax).to(dtype)
    return (q.float() * scale).reshape(w.shape)


def mxfp4_quantize(x: torch.Tensor) -> torch.Tensor:
    """OCP microscaling MXFP4 (OCP MX spec v1.0, Sec. 5 and 6.3), emulated: the last dimension in
    blocks of 32; each block shares one power-of-two scale X = 2^(floor(log2 max|V|) - 2) (E8M0,
    exponent clamped to [-127, 127]; 2 = E2M1's largest exponent), and each V_i / X is rounded to
    the nearest FP4 E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6, and negatives; ties to the even
    mantissa), values beyond 6 saturating to 6. Returns the dequantized tensor (float32)."""
    check_tensor("x", x, floating=True, nonempty=True)
    if x.shape[-1] % MX_BLOCK:
        raise ValueError(f"x's last dimension must be a multiple of {MX_BLOCK}, got "
                         f"{tuple(x.shape)}")
    blocks = x.detach().float().reshape(-1, MX_BLOCK)
    amax = blocks.abs().amax(1, keepdim=True)
    exp = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax))))
    shared = torch.clamp(exp - FP4_E2M1_EMAX, -127, 127)
    scale = torch.where(amax > 0, torch.exp2(shared), torch.ones_like(amax))
    v = (blocks / scale).abs()
    grid = torch.tensor(FP4_E2M1_VALUES)
    mid = (grid[1:] + grid[:-1]) / 2
    idx = torch.bucketize(v, mid)  # v == mid[i] -> i (the lower value)
    tie = (idx < len(mid)) & (v == mid[idx.clamp(max=len(mid) - 1)]) & (idx % 2 == 1)
    idx = torch.where(tie, idx + 1, idx)  # ties to the even mantissa: even index in the grid
    q = grid[idx] * torch.sign(blocks)
    return (q * scale).reshape(x.shape)


def mxfp4_bits_per_weight(block: int = MX_BLOCK) -> float:
    """4 bits per element + one 8-bit E8M0 scale per block: 4.25 at 32."""
    return 4 + 8 / block


def format_error_table(weights: dict[str, torch.Tensor], block_size: int = 64) -> list[dict]:
    """Relative MSE (error power / signal power) on the same weights of: int8 per channel, FP8
    E4M3 and E5M2 per channel, int4 asymmetric groups of ``block_size`` (RTN), NF4 blocks of
    ``block_size``, and MXFP4 (blocks of 32, E8M0 scales), with each format's bits per weight."""
    rows = []
    for name, w in weights.items():
        w = w.detach().float()
        signal = w.pow(2).mean().item()
        rel = lambda a: (a - w).pow(2).mean().item() / signal  # noqa: E731
        packed, absmax = quantize_nf4(w, block_size)
        rows.append({
            "weight": name,
            "int8": rel(fake_quantize(w, 8, True, "channel")),
            "fp8_e4m3": rel(fp8_fake_quantize(w, "e4m3")),
            "fp8_e5m2": rel(fp8_fake_quantize(w, "e5m2")),
            f"int4_g{block_size}": rel(fake_quantize(w, 4, False, "group", block_size)),
            f"nf4_b{block_size}": rel(dequantize_nf4(packed, absmax, w.shape)),
            "mxfp4": rel(mxfp4_quantize(w))})
    return rows


def format_bits_per_weight(in_features: int, block_size: int = 64) -> dict[str, float]:
    """Bits per weight of the formats of ``format_error_table`` (fp32 scales per channel of
    ``in_features`` values; uint8 zero points for int4)."""
    return {"int8": 8 + 32 / in_features, "fp8_e4m3": 8 + 32 / in_features,
            "fp8_e5m2": 8 + 32 / in_features,
            f"int4_g{block_size}": groupwise_bits_per_weight(4, block_size),
            f"nf4_b{block_size}": nf4_bits_per_parameter(block_size),
            "mxfp4": mxfp4_bits_per_weight()}


class EmulatedFormatLinear(nn.Module):
    """A Linear whose weight is stored in an emulated number format (``fp8_e4m3``, ``fp8_e5m2``
    per output channel, ``mxfp4``, ``nf4`` blocks of 64): the dequantized weight is kept in fp32
    for the matmul; ``bits_per_weight`` is what the format stores (for the size column)."""

    FORMATS = ("fp8_e4m3", "fp8_e5m2", "mxfp4", "nf4")

    def __init__(self, linear: nn.Linear, fmt: str):
        super().__init__()
        if fmt not in self.FORMATS:
            raise ValueError(f"fmt must be one of {self.FORMATS}, got {fmt!r}")
        w = linear.weight.detach().float()
        self.fmt, self.in_features, self.out_features = fmt, linear.in_features, linear.out_features
        if fmt.startswith("fp8"):
            deq, bpw = fp8_fake_quantize(w, fmt[4:]), 8 + 32 / w.shape[1]
        elif fmt == "mxfp4":
            deq, bpw = mxfp4_quantize(w), mxfp4_bits_per_weight()
        else:
            deq, bpw = dequantize_nf4(*quantize_nf4(w, 64), w.shape), nf4_bits_per_parameter(64)
        self.bits_per_weight = bpw
        self.register_buffer("weight", deq)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else
                        self.bias.to(x.dtype))


def emulated_format_copy(model: nn.Module, fmt: str, skip=("lm_head",)) -> nn.Module:
    """A copy of ``model`` with every target Linear in ``EmulatedFormatLinear(fmt)``."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    out = copy.deepcopy(model, memo)
    for name, linear in find_linears(out, skip).items():
        replace_module(out, name, EmulatedFormatLinear(linear, fmt))
    return out.eval()


# --------------------------------------------------------------------------- dynamic int8 (MiniLM)

def cpu_has_vnni() -> bool:
    """Whether FBGEMM's int8 GEMM runs with VNNI here (avx512_vnni, avx_vnni or AMX, and not
    forced down): int8 dot products accumulate straight into int32 (``vpdpbusd``) instead of
    through saturating int16 pairs (``vpmaddubsw``). See ``utils.bench.cpu_capabilities``."""
    return bool(cpu_capabilities()["int8_vnni"])


_DYNAMIC_LINEAR_CLASS = []


def _dynamic_int8_linear_class():
    """PyTorch's dynamic int8 Linear, with ``reduce_range`` as an attribute instead of the
    ``reduce_range=True`` its forward hard-codes. Reduced range quantizes activations to 7 bits
    (0..127) so that the int16 pair sums of ``vpmaddubsw`` cannot saturate on pre-VNNI x86; with
    VNNI the full 8 bits are safe and halve the activation rounding step."""
    if not _DYNAMIC_LINEAR_CLASS:
        import torch.ao.nn.quantized.dynamic as nnqd

        class DynamicInt8Linear(nnqd.Linear):
            reduce_range = True

            def forward(self, x):
                y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                                       reduce_range=self.reduce_range)
                return y.to(x.dtype)

        _DYNAMIC_LINEAR_CLASS.append(DynamicInt8Linear)
    return _DYNAMIC_LINEAR_CLASS[0]


def quantize_dynamic_int8(model: nn.Module, per_channel: bool = True,
                          reduce_range: bool | None = None, skip=()) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by PyTorch's dynamic int8 Linear:
    int8 weights (symmetric, per output channel or per tensor), activations quantized per batch at
    run time from their min-max (asymmetric uint8), int8 GEMM in fbgemm/oneDNN with int32
    accumulation, float output.

    ``reduce_range=None`` picks 8-bit activations on CPUs with VNNI and 7-bit ones otherwise
    (see ``_dynamic_int8_linear_class``). ``torch.ao.quantization.quantize_dynamic`` is deprecated
    (its replacement is torchao's ``Int8DynamicActivationInt8WeightConfig``) but still works in
    torch 2.13; torchao is not installed in this course's environment, so we use it and silence
    its deprecation warning. ``skip``: Linear layers whose name ends with one of these stay float
    (``("lm_head",)`` makes the course model's rows like-for-like with the weight-only ones).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import (default_dynamic_qconfig, per_channel_dynamic_qconfig,
                                           quantize_dynamic)

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        linear_cls = _dynamic_int8_linear_class()
        spec = {nn.Linear: qconfig} if not skip else {
            name: qconfig for name in find_linears(model, skip)}  # by name: ``skip`` stays float
        qmodel = quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8,
                                  mapping={nn.Linear: linear_cls})
    reduce = (not cpu_has_vnni()) if reduce_range is None else bool(reduce_range)
    for module in qmodel.modules():
        if isinstance(module, linear_cls):
            module.reduce_range = reduce
    return qmodel


# --------------------------------------------------------------------------- KV-cache quantization

def _kv_base_layer():
    from transformers.cache_utils import BaseQuantizedLayer

    return BaseQuantizedLayer


KV_METHODS = ("per-token", "kivi")


def make_quantized_kv_cache(num_layers: int, bits: int = 8, method: str = "per-token",
                            group: int = 32):
    """A ``transformers`` Cache whose layers store K and V as b-bit integers: ``per-token``
    (``QuantizedKVLayer``: keys and values per token) or ``kivi`` (``KIVILayer``: keys per
    channel over groups of ``group`` tokens, values per token). Pass it with
    ``**utils.models.cache_argument(cache)`` and ``use_cache=True``."""
    from transformers.cache_utils import Cache

    check_bits(bits)
    if method not in KV_METHODS:
        raise ValueError(f"method must be one of {KV_METHODS}, got {method!r}")
    if method == "kivi":
        return Cache(layers=[_kivi_layer_class()(bits, group) for _ in range(num_layers)])
    layer_cls = _quantized_kv_layer_class()
    return Cache(layers=[layer_cls(bits) for _ in range(num_layers)])


class _QuantizedKVLayerImpl:
    """Per-token asymmetric b-bit K and V (one fp16 scale and uint8 zero point per token and head
    over head_dim), appended as tokens arrive; attention reads the dequantized values, so the
    quality cost shows in a single forward pass too. 4-bit values are stored packed."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = check_bits(bits)
        self._quantized_keys, self._quantized_values = [], []

    def _quantize(self, tensor):
        rows = tensor.detach().float().reshape(-1, tensor.shape[-1])  # (B*H*T, head_dim)
        scale, zp = scale_zero_point(rows.amin(1, keepdim=True), rows.amax(1, keepdim=True),
                                     self.bits, symmetric=False)
        scale = scale.half().float()  # stored in fp16: quantize with the scale we keep
        zp = (0 - torch.round(rows.amin(1, keepdim=True).clamp(max=0) / scale)).clamp(
            0, 2 ** self.bits - 1).to(torch.int32)
        q = quantize(rows, scale, zp, self.bits, symmetric=False)
        if self.bits == 4 and q.shape[1] % 2 == 0:
            q = pack_int4(q, signed=False)
        return q, scale.half(), zp.to(torch.uint8), tuple(tensor.shape), tensor.dtype

    def _dequantize(self, stored):
        q, scale, zp, shape, dtype = stored  # its own dtype (newer transformers keep no self.dtype)
        if self.bits == 4 and q.shape[1] * 2 == shape[-1]:
            q = unpack_int4(q, signed=False).to(torch.uint8)
        return dequantize(q, scale.float(), zp.to(torch.int32)).reshape(shape).to(dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._quantized_keys, self._quantized_values = [], []
        self.cumulative_length += key_states.shape[-2]
        self._quantized_keys.append(self._quantize(key_states))
        self._quantized_values.append(self._quantize(value_states))
        keys = torch.cat([self._dequantize(s) for s in self._quantized_keys], dim=-2)
        values = torch.cat([self._dequantize(s) for s in self._quantized_values], dim=-2)
        return keys, values

    def stored_bytes(self) -> int:
        return sum(t.nbytes for s in self._quantized_keys + self._quantized_values for t in s[:3])


_KV_LAYER_CLASS = []


def _quantized_kv_layer_class():
    """``QuantizedKVLayer``: the implementation above on transformers' ``BaseQuantizedLayer``,
    built on first use so that importing this module does not import transformers."""
    if not _KV_LAYER_CLASS:
        _KV_LAYER_CLASS.append(type("QuantizedKVLayer", (_QuantizedKVLayerImpl, _kv_base_layer()),
                                    {"__doc__": _QuantizedKVLayerImpl.__doc__,
                                     "__module__": __name__}))
    return _KV_LAYER_CLASS[0]


class _KIVILayerImpl(_QuantizedKVLayerImpl):
    """KIVI (Liu et al. 2024, Sec. 3-4): keys quantized **per channel** (one scale and zero point
    per head_dim channel over a group of ``group`` consecutive tokens), values **per token** (over
    head_dim), both asymmetric b-bit with fp16 scales and uint8 zero points. Tokens that do not
    fill a group yet stay in full precision (KIVI's residual), so a cache holds at most
    ``group - 1`` float tokens per layer; once a group is full it is quantized."""

    def __init__(self, bits: int = 4, group: int = 32):
        super().__init__(bits)
        self.group = check_positive_int("group", group)
        self._res_k = self._res_v = None

    def _quantize_keys(self, k):  # (B, H, G, D): per channel over the G tokens
        kt = k.transpose(-1, -2).contiguous()  # (B, H, D, G): rows are channels
        return self._quantize(kt)

    def _dequantize_keys(self, stored):
        return self._dequantize(stored).transpose(-1, -2)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._quantized_keys, self._quantized_values = [], []
            self._res_k = key_states[..., :0, :]
            self._res_v = value_states[..., :0, :]
        self.cumulative_length += key_states.shape[-2]
        self._res_k = torch.cat([self._res_k, key_states], dim=-2)
        self._res_v = torch.cat([self._res_v, value_states], dim=-2)
        full = self._res_k.shape[-2] // self.group * self.group
        for t0 in range(0, full, self.group):
            chunk = self._res_k[..., t0:t0 + self.group, :]
            self._quantized_keys.append(self._quantize_keys(chunk))
            self._quantized_values.append(self._quantize(self._res_v[..., t0:t0 + self.group, :]))
        self._res_k, self._res_v = self._res_k[..., full:, :], self._res_v[..., full:, :]
        keys = torch.cat([self._dequantize_keys(s) for s in self._quantized_keys] + [self._res_k],
                         dim=-2)
        values = torch.cat([self._dequantize(s) for s in self._quantized_values] + [self._res_v],
                           dim=-2)
        return keys, values

    def stored_bytes(self) -> int:
        residual = 0 if self._res_k is None else self._res_k.nbytes + self._res_v.nbytes
        return super().stored_bytes() + residual


_KIVI_LAYER_CLASS = []


def _kivi_layer_class():
    if not _KIVI_LAYER_CLASS:
        _KIVI_LAYER_CLASS.append(type("KIVILayer", (_KIVILayerImpl, _kv_base_layer()),
                                      {"__doc__": _KIVILayerImpl.__doc__,
                                       "__module__": __name__}))
    return _KIVI_LAYER_CLASS[0]


def kivi_fake_quantize(k: torch.Tensor, v: torch.Tensor, bits: int = 4, group: int = 32):
    """KIVI on whole tensors (B, H, T, D), for tests and plots: keys per channel over groups of
    ``group`` tokens, values per token; the last T mod group tokens stay float."""
    layer = _KIVILayerImpl.__new__(_KIVILayerImpl)
    _KIVILayerImpl.__init__(layer, bits, group)
    layer.dtype = k.dtype
    full = k.shape[-2] // group * group
    ks = [layer._dequantize_keys(layer._quantize_keys(k[..., t:t + group, :]))
          for t in range(0, full, group)]
    vs = [layer._dequantize(layer._quantize(v[..., t:t + group, :])) for t in range(0, full, group)]
    return torch.cat(ks + [k[..., full:, :]], -2), torch.cat(vs + [v[..., full:, :]], -2)


def __getattr__(name):  # ``from utils.quantization import QuantizedKVLayer`` works too
    if name == "QuantizedKVLayer":
        return _quantized_kv_layer_class()
    if name == "KIVILayer":
        return _kivi_layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kv_cache_stored_bytes(cache) -> int:
    """Bytes a cache holds: integer values, scales and zero points for ``QuantizedKVLayer``,
    K and V tensors for a float ``DynamicCache``."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "stored_bytes"):
            total += layer.stored_bytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.nbytes + layer.values.nbytes
    return total


class WithQuantizedKVCache(nn.Module):
    """Wraps a causal LM so that every forward runs with a fresh quantized KV cache (for
    ``utils.metrics.perplexity`` and ``compare_next_token``)."""

    def __init__(self, model: nn.Module, bits: int = 8, method: str = "per-token",
                 group: int = 32):
        super().__init__()
        self.model, self.bits, self.method, self.group = model, check_bits(bits), method, group

    def forward(self, input_ids, **kwargs):
        cache = make_quantized_kv_cache(self.model.config.num_hidden_layers, self.bits,
                                        self.method, self.group)
        return self.model(input_ids=input_ids, **cache_argument(cache), use_cache=True, **kwargs)


# --------------------------------------------------------------------------- the chapter's table

def table_row(model: str, method: str, bits, weight_bytes: float, fp32_bytes: float,
              speedup: float | None = None, perplexity: float | None = None,
              agreement: float | None = None, cosine: float | None = None) -> dict:
    """One row of the chapter's table (same keys in every row; '' where a column does not apply)."""
    blank = lambda v: "" if v is None else v  # noqa: E731
    return {"model": model, "method": method, "bits": bits,
            "weight_MB": weight_bytes / 1e6, "compression": fp32_bytes / weight_bytes,
            "speedup_vs_fp32": blank(speedup), "perplexity": blank(perplexity),
            "top1_agreement": blank(agreement), "cosine": blank(cosine)}


def minilm_dynamic_int8_rows(batch_size: int = 8, seq_len: int = 128,
                             min_run_time: float = 1.0) -> list[dict]:
    """MiniLM fp32 vs dynamic int8: Linear weight bytes, latency ratio (same run, interleaved,
    batch ``batch_size`` x ``seq_len`` tokens) and cosine similarity of sentence embeddings."""
    from utils.bench import compare
    from utils.data import sample_sentences
    from utils.metrics import cosine_similarity
    from utils.models import embed_sentences, load_minilm

    model, tok = load_minilm()
    qmodel = quantize_dynamic_int8(model)
    sentences = sample_sentences(64)
    cos = cosine_similarity(embed_sentences(model, tok, sentences),
                            embed_sentences(qmodel, tok, sentences))
    batch = tok(sentences[:batch_size], padding="max_length", truncation=True, max_length=seq_len,
                return_tensors="pt")
    with torch.inference_mode():
        timings = compare({"fp32": lambda: model(**batch), "int8": lambda: qmodel(**batch)},
                          min_run_time=min_run_time)
    fp32_bytes = linear_weight_bytes(model)
    return [table_row("MiniLM", "fp32", 32, fp32_bytes, fp32_bytes, 1.0, cosine=1.0),
            table_row("MiniLM", "dynamic int8 (torch.ao)", 8, linear_weight_bytes(qmodel),
                      fp32_bytes, timings["int8"]["speedup"], cosine=cos.mean().item())]


def teacher_variants(model, tokenizer, gptq_sequences: int = 16) -> dict[str, tuple]:
    """The weight-only and W8A8 variants of the chapter's table: ``{label: (bits, quantized
    copy)}``: int8 per channel, int4 round-to-nearest (RTN) with groups of 32 and 128, GPTQ and
    AWQ int4 g=128, 3-bit RTN vs GPTQ g=128, FP8 E4M3 and MXFP4 (emulated), and W8A8 with and
    without SmoothQuant (alpha 0.5). GPTQ, AWQ and SmoothQuant calibrate on one set of
    ``gptq_sequences`` x 256 training tokens. The output head stays fp32 (tied) in every row."""
    calib = calibration_tokens(tokenizer, gptq_sequences)
    hessians = collect_hessians(model, calib)
    stats = collect_input_stats(model, calib)
    widths = [m.in_features for m in find_linears(model).values()]
    g = 128 if all(w % 128 == 0 for w in widths) else 64  # the small model has 192 columns
    rtn, gptq = WeightOnlyGroupwiseQuantHandler, GPTQQuantHandler
    return {
        "weight-only int8 per-channel": (8, quantize_copy(model, WeightOnlyInt8QuantHandler)),
        "weight-only FP8 E4M3 per-channel (emulated)": (8, emulated_format_copy(model, "fp8_e4m3")),
        "weight-only int4 RTN g=32": (4, quantize_copy(model, rtn, 4, 32)),
        f"weight-only int4 RTN g={g}": (4, quantize_copy(model, rtn, 4, g)),
        f"weight-only int4 GPTQ g={g}": (4, quantize_copy(model, gptq, None, 4, g,
                                                          hessians=hessians)),
        f"weight-only int4 AWQ g={g}": (4, quantize_copy(model, AWQQuantHandler, 4, g,
                                                         stats=stats, hessians=hessians)),
        "weight-only MXFP4 (emulated)": (4, emulated_format_copy(model, "mxfp4")),
        f"weight-only int3 RTN g={g}": (3, quantize_copy(model, rtn, 3, g)),
        f"weight-only int3 GPTQ g={g}": (3, quantize_copy(model, gptq, None, 3, g,
                                                          hessians=hessians)),
        "W8A8 per-tensor activations": (8, smoothquant_copy(model, stats, None)),
        "W8A8 SmoothQuant alpha=0.5": (8, smoothquant_copy(model, stats, 0.5)),
    }


def teacher_rows(name: str = "teacher", max_tokens: int = 8192, latency: bool = True,
                 min_run_time: float = 0.2) -> list[dict]:
    """The course model in fp32, dynamic int8, its ``teacher_variants``, and KV caches (int8 and
    int4 per token, int4 KIVI): Linear weight bytes of the decoder (the tied output head is fp32
    in every row and left out of every count), prefill latency ratio of a (1, 256) forward
    against fp32 in the same run (dynamic int8, weight-only int8 and int4 g=32), held-out
    perplexity and next-token agreement on ``max_tokens`` tokens."""
    from utils.bench import compare
    from utils.models import encode_split, load_course_model

    model, tok = load_course_model(name)
    val_ids = encode_split("validation", tok)
    variants = {"dynamic int8 (torch.ao)": (8, quantize_dynamic_int8(model, skip=("lm_head",)))}
    variants.update(teacher_variants(model, tok))
    fp32_bytes = linear_weight_bytes(model, skip=("lm_head",))  # tied to the embedding: fp32
    speed = {}
    if latency:
        x = val_ids[:256][None]  # (1, T)
        fns = {"fp32": lambda: model(input_ids=x)}
        fns.update({label: (lambda m=m: m(input_ids=x)) for label, (_, m) in variants.items()
                    if label in ("dynamic int8 (torch.ao)", "weight-only int8 per-channel",
                                 "weight-only int4 RTN g=32")})
        with torch.inference_mode():
            speed = {k: v["speedup"] for k, v in compare(fns, min_run_time=min_run_time,
                                                         warmup=1).items()}
    ref = reference_top1(model, val_ids, max_tokens)
    base = lm_quality(ref, model, val_ids, max_tokens)
    rows = [table_row(name, "fp32", 32, fp32_bytes, fp32_bytes, speed.get("fp32"),
                      base["perplexity"], base["top1_agreement"])]
    for label, (bits, qmodel) in variants.items():
        quality = lm_quality(ref, qmodel, val_ids, max_tokens)
        rows.append(table_row(name, label, bits,
                              linear_weight_bytes(qmodel, True, ("lm_head",)), fp32_bytes,
                              speed.get(label), quality["perplexity"],
                              quality["top1_agreement"]))
    for bits, method in ((8, "per-token"), (4, "per-token"), (4, "kivi")):
        quality = lm_quality(ref, WithQuantizedKVCache(model, bits, method), val_ids, max_tokens)
        label = f"KV cache int{bits} {'KIVI' if method == 'kivi' else 'per-token'} (weights fp32)"
        rows.append(table_row(name, label, 32, fp32_bytes, fp32_bytes, None,
                              quality["perplexity"], quality["top1_agreement"]))
    return rows


def decode_rows(quick: bool = False, min_run_time: float = 0.5) -> list[dict]:
    """Batch-1 decode on the course architecture at speed size (``utils.llama.
    speed_model_config()``, random weights; ``quick``: a 2-layer, 512-wide one): fp32 against
    weight-only int8 and int4 (g=32) with torch's fused CPU kernels, every Linear including the
    output head quantized; ``speedup_vs_fp32`` is the decode tokens/s ratio in one run."""
    from utils.llama import CourseLlama, speed_model_config

    torch.manual_seed(0)
    cfg = speed_model_config(512, 2) if quick else speed_model_config()
    model = CourseLlama.from_config(cfg)
    label = "speed-model (random weights)"
    models = {"fp32": model, "int8 fused": fused_weight_only_copy(model, 8),
              "int4 fused g=32": fused_weight_only_copy(model, 4, 32)}
    wbytes = {k: linear_weight_bytes(m) for k, m in models.items()}
    speed = decode_speed(models, min_run_time=min_run_time)
    bits = {"fp32": 32, "int8 fused": 8, "int4 fused g=32": 4}
    return [table_row(label, f"decode batch 1, weight-only {k}" if k != "fp32" else
                      "decode batch 1, fp32", bits[k], wbytes[k], wbytes["fp32"],
                      speed[k]["speedup"]) for k in models]


def report_rows(quick: bool = False) -> list[dict]:
    """The chapter's size/speed/quality table (``python -m utils.report 02``). ``quick``: the
    small model, 1,024 tokens and short timings (a smoke test)."""
    if quick:
        return minilm_dynamic_int8_rows(batch_size=2, seq_len=32, min_run_time=0.05) + \
            teacher_rows("small", max_tokens=1024, min_run_time=0.05) + \
            decode_rows(quick=True, min_run_time=0.05)
    return minilm_dynamic_int8_rows() + teacher_rows("teacher") + decode_rows()
