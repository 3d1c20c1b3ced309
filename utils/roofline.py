"""Chapter 00: the arithmetic of inference cost, and this machine's peaks to set it against.

The roofline model (Williams, Waterman and Patterson, "Roofline", CACM 2009, Sec. 2): a kernel
that does F FLOPs and moves B bytes has arithmetic intensity I = F / B and can run no faster than
min(peak FLOP/s, bandwidth x I). Prefill multiplies matrices (I grows with the token count);
decode at batch 1 multiplies each weight matrix by one vector (I ~ 1 FLOP/byte in fp16), so it is
bound by memory bandwidth: tokens/s <= bandwidth / (weight bytes + KV-cache bytes read per token).

Formulas (counting a multiply-add as 2 FLOPs):
- matmul (M, K) @ (K, N): 2 M K N FLOPs; at least (M K + K N + M N) x bytes-per-value moved.
- KV cache: 2 (K and V) x layers x kv_heads x head_dim x seq_len x batch x bytes-per-value
  (Pope et al., "Efficiently Scaling Transformer Inference", 2022, Sec. 3.1; with grouped-query
  attention, Ainslie et al. 2023, kv_heads < attention heads).
"""

from __future__ import annotations

import math


def _positive_ints(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or math.isinf(value):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of (m, k) @ (k, n): one multiply and one add per term, 2 m k n."""
    _positive_ints(m=m, k=k, n=n)
    return 2 * m * k * n


def matmul_bytes(m: int, k: int, n: int, bytes_per_value: float = 4) -> float:
    """Minimum bytes moved by (m, k) @ (k, n): read both operands once, write the result once."""
    _positive_ints(m=m, k=k, n=n)
    _positive(bytes_per_value=bytes_per_value)
    return (m * k + k * n + m * n) * bytes_per_value


def arithmetic_intensity(m: int, k: int, n: int, bytes_per_value: float = 4) -> float:
    """FLOPs per byte of (m, k) @ (k, n). A decode GEMV is m = 1: about 2 / bytes_per_value."""
    return matmul_flops(m, k, n) / matmul_bytes(m, k, n, bytes_per_value)


def attainable_flops(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """Roofline bound: min(peak FLOP/s, bandwidth (bytes/s) x intensity (FLOP/byte))."""
    _positive(intensity=intensity, peak_flops=peak_flops, bandwidth=bandwidth)
    return min(peak_flops, bandwidth * intensity)


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int,
                   batch_size: int = 1, bytes_per_value: float = 2) -> float:
    """Bytes of the KV cache: 2 x layers x kv_heads x head_dim x seq_len x batch x bytes."""
    _positive_ints(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   seq_len=seq_len, batch_size=batch_size)
    _positive(bytes_per_value=bytes_per_value)
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch_size * bytes_per_value


def decode_tokens_per_second_bound(bandwidth: float, weight_bytes: float,
                                   kv_bytes: float = 0.0) -> float:
    """Upper bound on batch-1 decode speed: every weight and the KV cache are read once per
    generated token, so tokens/s <= bandwidth / (weight bytes + KV bytes)."""
    _positive(bandwidth=bandwidth, weight_bytes=weight_bytes)
    if kv_bytes < 0:
        raise ValueError(f"kv_bytes must be >= 0, got {kv_bytes!r}")
    return bandwidth / (weight_bytes + kv_bytes)
