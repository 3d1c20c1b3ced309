"""Chapter 00: the arithmetic of inference cost, and this machine's peaks to set it against.

The roofline model (Williams, Waterman and Patterson, "Roofline", CACM 2009, Sec. 2): a kernel
that does F FLOPs and moves B bytes has arithmetic intensity I = F / B and can run no faster than
min(peak FLOP/s, bandwidth x I). Prefill multiplies matrices (I grows with the token count);
decode at batch 1 multiplies each weight matrix by one vector (I ~ 1 FLOP/byte in fp16), so it is
bound by memory bandwidth: tokens/s <= bandwidth / (weight bytes + KV-cache bytes read per token).

Formulas (counting a multiply-add as 2 FLOPs):
- matmul (M, K) @ (K, N): 2 M K N FLOPs; at least (M K + K N + M N) x bytes-per-value moved.
- KV cache: 2 (K and V) x layers x kv_heads x head_dim x seq_len x batch x bytes-per-value
  (Pope et al., "Efficiently Scaling Transformer Inference", 2022, Sec. 2; with grouped-query
  attention, Ainslie et al. 2023, kv_heads < attention heads).

Utilisation (what share of a roof a model reaches): MBU = achieved bytes/s / bandwidth for
decode, MFU = tokens/s x FLOPs per token (about 2 x parameters, Kaplan et al. 2020, Sec. 2.1) /
peak FLOP/s for prefill; the critical batch size B* = ridge point x bytes per weight / 2 is where
a batched decode step turns compute-bound. A CPU's theoretical peak is cores x clock x FMA units
x SIMD lanes x 2.

Measurements (the second half of this file; chapter 00's notebook and ``python -m utils.report 00``
call the same functions): peak matmul FLOP/s per dtype, memory bandwidth of a copy far larger than
the caches, prefill vs decode time per token of a causal LM, weight bytes, the KV-cache bytes held
by a real ``transformers`` cache object, and the bytes of tensors a forward pass allocates.
Timings use ``utils.bench.time_fn`` (warm-up, repeats, median)::

    python -m utils.report 00            # the headline rows on this machine
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from utils.bench import (BANDWIDTH_KINDS, measure_bandwidth, silenced_stderr,  # noqa: F401
                         time_fn)  # (the notebook calls rl.measure_bandwidth, rl.silenced_stderr)
from utils.models import (cache_argument, model_weight_bytes,  # noqa: F401 (rl.model_weight_bytes)
                          returned_cache)
from utils.validation import check_positive, check_positive_int, check_positive_ints

CHAPTER = "00"  # found by utils.report; notebooks/00_*.ipynb, solutions/lab00_*.ipynb


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of (m, k) @ (k, n): one multiply and one add per term, 2 m k n."""
    check_positive_ints(m=m, k=k, n=n)
    return 2 * m * k * n


def matmul_bytes(m: int, k: int, n: int, bytes_per_value: float = 4) -> float:
    """Minimum bytes moved by (m, k) @ (k, n): read both operands once, write the result once."""
    check_positive_ints(m=m, k=k, n=n)
    check_positive(bytes_per_value=bytes_per_value)
    return (m * k + k * n + m * n) * bytes_per_value


def arithmetic_intensity(m: int, k: int, n: int, bytes_per_value: float = 4) -> float:
    """FLOPs per byte of (m, k) @ (k, n). A decode GEMV is m = 1: about 2 / bytes_per_value."""
    return matmul_flops(m, k, n) / matmul_bytes(m, k, n, bytes_per_value)


def attainable_flops(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """Roofline bound: min(peak FLOP/s, bandwidth (bytes/s) x intensity (FLOP/byte))."""
    check_positive(intensity=intensity, peak_flops=peak_flops, bandwidth=bandwidth)
    return min(peak_flops, bandwidth * intensity)


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int,
                   batch_size: int = 1, bytes_per_value: float = 2) -> float:
    """Bytes of the KV cache: 2 x layers x kv_heads x head_dim x seq_len x batch x bytes."""
    check_positive_ints(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   seq_len=seq_len, batch_size=batch_size)
    check_positive(bytes_per_value=bytes_per_value)
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch_size * bytes_per_value


def decode_tokens_per_second_bound(bandwidth: float, weight_bytes: float,
                                   kv_bytes: float = 0.0) -> float:
    """Upper bound on batch-1 decode speed: every weight and the KV cache are read once per
    generated token, so tokens/s <= bandwidth / (weight bytes + KV bytes)."""
    check_positive(bandwidth=bandwidth, weight_bytes=weight_bytes)
    if kv_bytes < 0:
        raise ValueError(f"kv_bytes must be >= 0, got {kv_bytes!r}")
    return bandwidth / (weight_bytes + kv_bytes)



def theoretical_peak_flops(cores: int, clock_hz: float, simd_bits: int, fma_units: int = 2,
                           bytes_per_value: float = 4) -> float:
    """A CPU's theoretical peak: cores x clock x FMA units per core x lanes per FMA x 2 FLOPs
    (a fused multiply-add is a multiply and an add), lanes = simd_bits / (8 x bytes_per_value).
    Example: 2 cores at 2.5 GHz, 256-bit FMA units, 2 per core, fp32 (8 lanes): 160 GFLOP/s."""
    check_positive_ints(cores=cores, simd_bits=simd_bits, fma_units=fma_units)
    check_positive(clock_hz=clock_hz, bytes_per_value=bytes_per_value)
    return cores * clock_hz * fma_units * (simd_bits / (8 * bytes_per_value)) * 2


def critical_batch_size(peak_flops: float, bandwidth: float, bytes_per_weight: float) -> float:
    """Batch size at which a decode step turns compute-bound. A step at batch B does about
    2 N B FLOPs while reading the N weights once (N x bytes_per_weight bytes; KV cache and
    activations left out), so its intensity is 2 B / bytes_per_weight FLOP/byte; it reaches the
    ridge point peak / bandwidth at B* = (peak / bandwidth) x bytes_per_weight / 2."""
    check_positive(peak_flops=peak_flops, bandwidth=bandwidth, bytes_per_weight=bytes_per_weight)
    return peak_flops / bandwidth * bytes_per_weight / 2


def bandwidth_utilisation(tokens_per_s: float, bytes_per_token: float, bandwidth: float) -> float:
    """Model bandwidth utilisation (MBU) of decode: the bytes/s it achieves (tokens/s x bytes
    read per token: weights + KV cache) over the bandwidth the memory can deliver."""
    check_positive(tokens_per_s=tokens_per_s, bytes_per_token=bytes_per_token,
                   bandwidth=bandwidth)
    return tokens_per_s * bytes_per_token / bandwidth


def flops_utilisation(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation (MFU): achieved FLOP/s (tokens/s x FLOPs per token, about 2 x
    parameters) over a peak FLOP/s (say which: theoretical, or the best a matmul reached)."""
    check_positive(tokens_per_s=tokens_per_s, flops_per_token=flops_per_token,
                   peak_flops=peak_flops)
    return tokens_per_s * flops_per_token / peak_flops


def knee_batch_size(batches, step_seconds) -> float:
    """Where a measured decode sweep bends: the batch at which the flat memory-bound line (the
    step time at the smallest batch) meets the compute-bound line through the origin and the
    largest batch (step time proportional to batch). Meaningful when the largest batch is
    compute-bound (its step clearly longer than the smallest batch's)."""
    batches, step_seconds = list(batches), list(step_seconds)
    if len(batches) < 2 or len(batches) != len(step_seconds):
        raise ValueError(f"batches and step_seconds must be two equal-length lists of at least "
                         f"2 values, got {len(batches)} and {len(step_seconds)}")
    check_positive_ints(**{f"batches[{i}]": b for i, b in enumerate(batches)})
    check_positive(**{f"step_seconds[{i}]": t for i, t in enumerate(step_seconds)})
    order = sorted(range(len(batches)), key=batches.__getitem__)
    t_flat = step_seconds[order[0]]
    per_sequence = step_seconds[order[-1]] / batches[order[-1]]  # slope of the compute line
    return t_flat / per_sequence


# --------------------------------------------------------------------------- measurements

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def as_dtype(dtype) -> torch.dtype:
    """``torch.float32`` or a name (``'fp32'``, ``'bf16'``, ``'fp16'``) as a floating torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be a floating torch.dtype or one of {sorted(_DTYPES)}, "
                     f"got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model (torch.nn.Module with .config), "
                        f"got {type(model).__name__}")


def measure_matmul(m: int, k: int, n: int, dtype="fp32", device="cpu", *,
                   min_run_time: float = 0.3, seed: int = 0) -> dict:
    """Time ``(m, k) @ (k, n)`` (``torch.mm`` into a preallocated output) and report its median
    time, achieved FLOP/s, arithmetic intensity (FLOP/byte, minimum traffic) and the bytes/s that
    traffic implies. Inputs are seeded normal values in ``dtype`` on ``device``."""
    check_positive_ints(m=m, k=k, n=n)
    dtype, device = as_dtype(dtype), torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    timing = time_fn(lambda: torch.mm(a, b, out=out), label=f"mm {m}x{k}x{n} {dtype}",
                     min_run_time=min_run_time)
    seconds, bytes_per_value = timing.median_s, dtype.itemsize
    return {"m": m, "k": k, "n": n, "dtype": _dtype_name(dtype), "device": str(device),
            "threads": timing.threads, "seconds": seconds,
            "flop_per_s": matmul_flops(m, k, n) / seconds,
            "intensity": arithmetic_intensity(m, k, n, bytes_per_value),
            "bytes_per_s": matmul_bytes(m, k, n, bytes_per_value) / seconds}


def peak_matmul_flops(dtype="fp32", size: int = 1024, device="cpu", *,
                      min_run_time: float = 0.3) -> float:
    """Measured FLOP/s of a square ``size`` matmul: the compute roof of the roofline for ``dtype``
    (a lower bound on the hardware peak; it is what this library reaches on this machine)."""
    return measure_matmul(size, size, size, dtype, device, min_run_time=min_run_time)["flop_per_s"]


def _attention_shape(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def model_kv_cache_bytes(model: torch.nn.Module, seq_len: int, batch_size: int = 1) -> int:
    """The KV-cache formula (``kv_cache_bytes``) with a causal LM's own layers, KV heads, head
    dimension and parameter dtype."""
    _check_model(model)
    layers, kv_heads, head_dim = _attention_shape(model.config)
    bytes_per_value = next(model.parameters()).element_size()
    return int(kv_cache_bytes(layers, kv_heads, head_dim, seq_len, batch_size, bytes_per_value))


def cache_tensor_bytes(cache) -> int:
    """Measured bytes of a ``transformers`` cache object: the keys and values tensors it holds in
    every layer (``DynamicCache.layers[i].keys / .values``; legacy tuples of (k, v) also work)."""
    layers = getattr(cache, "layers", None)
    pairs = ([(layer.keys, layer.values) for layer in layers] if layers is not None
             else list(cache))
    total = 0
    for pair in pairs:
        for tensor in pair:
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def random_token_ids(model: torch.nn.Module, batch_size: int, seq_len: int,
                     seed: int = 0) -> torch.Tensor:
    """Seeded random token ids ``(batch_size, seq_len)`` on the model's device. Timings do not
    depend on which tokens are fed, only on how many."""
    _check_model(model)
    check_positive_ints(batch_size=batch_size, seq_len=seq_len)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=gen)
    return ids.to(next(model.parameters()).device)


@torch.inference_mode()
def measure_kv_cache(model: torch.nn.Module, seq_len: int, batch_size: int = 1,
                     seed: int = 0) -> dict:
    """Prefill ``seq_len`` tokens with ``use_cache=True`` and compare the bytes of the cache object
    that ``transformers`` returns with the formula. They agree exactly when the cache holds
    exactly (batch, kv_heads, seq_len, head_dim) keys and values per layer in the model's dtype."""
    ids = random_token_ids(model, batch_size, seq_len, seed)
    cache = returned_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    first = cache.layers[0].keys if hasattr(cache, "layers") else cache[0][0]
    return {"seq_len": seq_len, "batch_size": batch_size, "cache": type(cache).__name__,
            "layer_keys_shape": tuple(first.shape), "dtype": _dtype_name(first.dtype),
            "formula_bytes": model_kv_cache_bytes(model, seq_len, batch_size),
            "measured_bytes": cache_tensor_bytes(cache)}


@torch.inference_mode()
def prefill_decode_timing(model: torch.nn.Module, *, prompt_len: int = 128, new_tokens: int = 32,
                          batch_size: int = 1, min_run_time: float = 0.3, seed: int = 0) -> dict:
    """Time prefill and decode of a causal LM, the two phases of generation.

    - prefill: one forward pass over ``prompt_len`` tokens per sequence that fills the KV cache
      (``logits_to_keep=1``: only the last position's logits, as ``generate`` does);
    - decode: ``new_tokens`` greedy steps of one token per sequence that read and extend that
      cache; after each timed run the cache is cropped back to the prompt, so every run decodes
      the same positions.

    Returns the median times (``utils.bench.time_fn``) as ms per token and tokens/s. Decode's
    ``decode_ms_per_step`` is the latency of one new token for every sequence in the batch;
    ``decode_tokens_per_s`` counts the tokens of the whole batch.
    """
    _check_model(model)
    check_positive_ints(prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size)
    ids = random_token_ids(model, batch_size, prompt_len, seed)

    def prefill():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)

    out = prefill()
    cache, first_token = returned_cache(out), out.logits[:, -1:].argmax(-1)  # (B, 1)

    def decode():
        token = first_token
        for _ in range(new_tokens):
            logits = model(input_ids=token, **cache_argument(cache), use_cache=True).logits
            token = logits[:, -1:].argmax(-1)  # (B, 1) greedy
        cache.crop(-new_tokens)  # negative: remove that many tokens (back to the prompt)

    prefill_t = time_fn(prefill, label="prefill", min_run_time=min_run_time)
    decode_t = time_fn(decode, label="decode", min_run_time=min_run_time)
    if cache.get_seq_length() != prompt_len:
        raise RuntimeError(f"cache holds {cache.get_seq_length()} tokens after decode, expected "
                           f"{prompt_len}: transformers' Cache.crop changed meaning")
    param = next(model.parameters())
    return {"batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "dtype": _dtype_name(param.dtype), "device": str(param.device),
            "threads": prefill_t.threads,
            "prefill_ms": prefill_t.median_ms,
            "prefill_ms_per_token": prefill_t.median_ms / (batch_size * prompt_len),
            "prefill_tokens_per_s": batch_size * prompt_len / prefill_t.median_s,
            "decode_ms_per_step": decode_t.median_ms / new_tokens,
            "decode_ms_per_token": decode_t.median_ms / (batch_size * new_tokens),
            "decode_tokens_per_s": batch_size * new_tokens / decode_t.median_s}


def predicted_decode_tokens_per_second(model: torch.nn.Module, bandwidth: float,
                                       seq_len: int) -> float:
    """Batch-1 decode bound for this model: bandwidth / (weight bytes + KV-cache bytes at
    ``seq_len``). Every weight is read once per token (with tied embeddings the LM head reads the
    whole embedding matrix, so all parameters count)."""
    return decode_tokens_per_second_bound(bandwidth, model_weight_bytes(model),
                                          model_kv_cache_bytes(model, seq_len, 1))


def tensor_memory_bytes(fn: Callable[[], object], device="cpu") -> dict:
    """Exact bytes of tensors that ``fn()`` allocates: ``peak_bytes`` above what was allocated
    before, and ``retained_bytes`` still allocated after (the returned tensors).

    CUDA: the caching allocator's counters. CPU: the allocation and free events that
    ``torch.profiler`` records with ``profile_memory=True``, summed in time order. Unlike the
    process's resident set size (``utils.bench.peak_memory_bytes``), this does not depend on
    whether the C allocator has returned freed memory to the system, so it repeats exactly.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        del result
        return {"peak_bytes": peak - before, "retained_bytes": after - before}
    from torch.profiler import ProfilerActivity, profile

    with silenced_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    # kineto_results: the raw event list, each allocation (+) or free (-) with its time stamp
    # (prof.events() keeps only some of the memory events, without a usable order)
    raw = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if raw is None:
        raise RuntimeError(f"torch {torch.__version__}'s profiler has no kineto_results: "
                           "use utils.bench.peak_memory_bytes (resident memory) instead")
    events = sorted((e.start_ns(), e.nbytes()) for e in raw.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"peak_bytes": peak, "retained_bytes": live}



# --------------------------------------------------------------------------- CPU peak, flops

def _lscpu() -> dict[str, str]:
    import shutil
    import subprocess

    if not shutil.which("lscpu"):
        return {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())
            if v}


def _cpuinfo_first(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_peak_assumptions(threads: int | None = None) -> dict:
    """What the fp32 theoretical peak of this CPU rests on, read from ``lscpu`` and
    ``/proc/cpuinfo``: cores (physical, or ``threads`` if fewer), clock (``CPU max MHz`` when
    ``lscpu`` gives it, else the ``cpu MHz`` that ``/proc/cpuinfo`` reports, a current or
    nominal clock: turbo unknown), SIMD width from the ISA flags (avx512f 512 bits, avx2 + fma
    256), and FMA units per core (assumed 2, as on recent x86 server cores; AMD Zen 4, family 25
    with avx512f, executes 512-bit FMAs on 256-bit units). ``peak_flops`` is None, with the
    reason in ``note``, where a number is missing (not Linux, not x86, no FMA)."""
    import os
    import platform

    from utils.bench import cpu_model_and_flags

    info = _lscpu()
    _, flags = cpu_model_and_flags()
    result = {"cores": None, "clock_hz": None, "clock_source": None, "simd_bits": None,
              "fma_units": None, "peak_flops": None, "note": ""}
    try:
        cores = int(info["Core(s) per socket"]) * int(info.get("Socket(s)", "1"))
    except (KeyError, ValueError):
        cores = os.cpu_count() or 1
    result["cores"] = min(cores, threads) if threads else cores
    if info.get("CPU max MHz"):
        result["clock_hz"], result["clock_source"] = float(info["CPU max MHz"]) * 1e6, \
            "lscpu 'CPU max MHz' (maximum boost clock)"
    elif _cpuinfo_first("cpu MHz"):
        result["clock_hz"] = float(_cpuinfo_first("cpu MHz")) * 1e6
        result["clock_source"] = ("/proc/cpuinfo 'cpu MHz' (the current or, in a virtual "
                                  "machine, nominal clock; the boost clock is not known)")
    if platform.machine().lower() not in ("x86_64", "amd64") or "fma" not in flags:
        result["note"] = "not an x86 CPU with FMA: SIMD width and FMA units not known here"
        return result
    vendor, family = info.get("Vendor ID") or _cpuinfo_first("vendor_id"), \
        info.get("CPU family") or _cpuinfo_first("cpu family")
    zen4 = vendor == "AuthenticAMD" and family == "25" and "avx512f" in flags
    result["simd_bits"] = 256 if zen4 or "avx512f" not in flags else 512
    result["fma_units"] = 2
    result["note"] = ("assumed 2 FMA units per core"
                      + ("; AMD family 25 with AVX-512 (Zen 4): 512-bit FMAs run on 256-bit units"
                         if zen4 else "")
                      + ("; AVX-512 parts with one 512-bit FMA unit (some client and low-end "
                         "server Intel cores) reach half" if result["simd_bits"] == 512 else ""))
    if result["clock_hz"] is None:
        result["note"] += "; no clock found: peak not known"
        return result
    result["peak_flops"] = theoretical_peak_flops(result["cores"], result["clock_hz"],
                                                  result["simd_bits"], result["fma_units"], 4)
    return result


def counted_matmul_flops(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs of the matrix products ``fn()`` runs, counted by ``torch.utils.flop_counter``
    (2 m k n per (m, k) @ (k, n); attention counted by its shapes), by operator name."""
    from torch.utils.flop_counter import FlopCounterMode

    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    with FlopCounterMode(display=False) as counter:
        fn()
    counts: dict[str, int] = {}
    for op, n in counter.get_flop_counts()["Global"].items():  # aten.mm, aten.mm.default ...
        name = str(op).removeprefix("aten.").split(".")[0]
        counts[name] = counts.get(name, 0) + int(n)
    return counts


def profile_rows(prof, row_limit: int = 8) -> list[dict]:
    """A short, narrow table of a ``torch.profiler`` run: the operators with the most self CPU
    time, their calls, self ms and share of all self time (the profiler's own ``table()`` has a
    dozen wide columns that wrap in a notebook)."""
    check_positive_int("row_limit", row_limit)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"operator": e.key[:40], "calls": e.count, "self ms": e.self_cpu_time_total / 1e3,
             "share": f"{e.self_cpu_time_total / total:.0%}"} for e in events[:row_limit]]


# --------------------------------------------------------------------------- static-cache decode

def static_decode_step(model, batch_size: int = 1, cache_len: int = 128, *, run=None,
                       seed: int = 0) -> Callable[[], torch.Tensor]:
    """One decode step of a ``utils.llama.CourseLlama`` over a ``StaticKVCache``, as a callable
    to time. The cache (``cache_len`` positions, batch ``batch_size``) is filled by a prefill of
    ``cache_len - 1`` seeded tokens; each call feeds one token per sequence at the last position
    and returns the greedy next tokens (B, 1). Every call has the same shapes and writes the same
    cache slot (attention always spans the whole static cache, masked), so repeated calls time
    one decode step at a context of ``cache_len``. ``run``: the module to call instead of
    ``model`` (its ``torch.compile`` d version), sharing the same cache."""
    from utils.llama import StaticKVCache

    check_positive_int("batch_size", batch_size)
    check_positive_int("cache_len", cache_len)
    if cache_len < 2:
        raise ValueError(f"cache_len must be >= 2 (a prompt and the decoded token), got {cache_len}")
    base = getattr(model, "_orig_mod", model)
    param = next(base.parameters())
    cache = StaticKVCache(base.config, batch_size, cache_len, dtype=param.dtype,
                          device=param.device)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, base.config.vocab_size, (batch_size, cache_len), generator=gen)
    ids = ids.to(param.device)
    run = model if run is None else run
    with torch.inference_mode():
        base(ids[:, :-1], cache, torch.arange(cache_len - 1, device=param.device))
    token, position = ids[:, -1:], torch.tensor([cache_len - 1], device=param.device)

    @torch.inference_mode()
    def step():
        return run(token, cache, position)[:, -1:].argmax(-1)

    return step


# --------------------------------------------------------------------------- report

def report_rows(quick: bool = False) -> list[dict]:
    """Chapter 00's headline measurements (``python -m utils.report 00``), about 10-20 s on 2
    CPU cores: matmul GFLOP/s in fp32 and bf16 (labelled emulated where the CPU has no bf16 dot
    products), copy bandwidth, the course model's prefill and decode time per token, the
    predicted vs measured batch-1 decode speed, the KV cache by formula vs measured, and the
    speed model's rows (``speed_model_rows``: decode MBU, critical batch size, prefill MFU; about
    10 s more). ``quick``: the small model, a small speed model and short timings (a smoke test
    of the code path)."""
    from utils.bench import cpu_capabilities
    from utils.device import pick_device
    from utils.models import load_course_model

    model_name, prompt_len, new_tokens = ("small", 32, 8) if quick else ("teacher", 128, 32)
    min_run_time = 0.05 if quick else 0.3
    device = pick_device()
    threads = torch.get_num_threads()
    where = f"{device.type}, {threads} threads"
    rows = []

    def add(measurement, value, unit, conditions):
        rows.append({"measurement": measurement, "value": float(value), "unit": unit,
                     "conditions": conditions})

    native_bf16 = device.type != "cpu" or cpu_capabilities()["native_bf16"]
    for dtype in ("fp32", "bf16"):
        emulated = dtype == "bf16" and not native_bf16
        size = 256 if quick or emulated else 1024  # emulated bf16 runs ~100x slower: keep it short
        flops = peak_matmul_flops(dtype, size, device, min_run_time=min_run_time)
        add(f"matmul {dtype}{' (emulated: no bf16 dot products)' if emulated else ''}, "
            "achieved by torch.matmul", flops / 1e9, "GFLOP/s", f"{size}x{size}x{size}, {where}")
    mib = 16 if quick else 256
    bw = measure_bandwidth(mib * 2**20, "copy", device, min_run_time=min_run_time)
    add("memory bandwidth (copy)", bw["bytes_per_s"] / 1e9, "GB/s",
        f"2 x {mib} MiB fp32 buffers, {where}")

    model, _ = load_course_model(model_name, device=device)
    cond = f"{model_name} fp32, batch 1, prompt {prompt_len}, {where}"
    t = prefill_decode_timing(model, prompt_len=prompt_len, new_tokens=new_tokens,
                              min_run_time=min_run_time)
    add(f"{model_name} prefill", t["prefill_ms_per_token"], "ms/token", cond)
    add(f"{model_name} decode", t["decode_ms_per_token"], "ms/token",
        f"{cond}, {new_tokens} new tokens")
    mean_len = prompt_len + new_tokens // 2
    predicted = predicted_decode_tokens_per_second(model, bw["bytes_per_s"], mean_len)
    add(f"{model_name} decode, bound bandwidth/bytes", predicted, "tokens/s",
        f"{model_weight_bytes(model) / 1e6:.1f} MB weights + KV at {mean_len} tokens")
    add(f"{model_name} decode, measured", t["decode_tokens_per_s"], "tokens/s", cond)
    kv = measure_kv_cache(model, prompt_len)
    add("KV cache, formula", kv["formula_bytes"], "bytes", f"{model_name} fp32, batch 1, "
        f"{prompt_len} tokens")
    add("KV cache, measured", kv["measured_bytes"], "bytes",
        f"{kv['cache']} tensors, {kv['layer_keys_shape']} per layer for K and for V")
    rows.extend(speed_model_rows(bw["bytes_per_s"], quick=quick))
    return rows


def speed_model_rows(bandwidth: float, quick: bool = False) -> list[dict]:
    """The size-realistic speed model (``utils.llama.speed_model_config()``, random weights,
    fp32): batch-1 static-cache decode tokens/s and its MBU against ``bandwidth``, the critical
    batch size predicted from the best fp32 matmul rate, and the MFU of a prefill. ``quick``: a
    small configuration (hidden 512, 4 layers) with short timings."""
    from utils.llama import CourseLlama, speed_model_config

    config = speed_model_config(hidden_size=512, num_layers=4) if quick else speed_model_config()
    min_run_time, cache_len, prompt = (0.05, 16, 16) if quick else (0.3, 64, 64)
    torch.manual_seed(0)
    model = CourseLlama.from_config(config)
    threads = torch.get_num_threads()
    n_params = sum(p.numel() for p in model.parameters())
    weights = model_weight_bytes(model)
    name = f"speed model {n_params / 1e6:.0f}M"
    cond = f"{name} fp32, static cache {cache_len}, cpu, {threads} threads"
    step = time_fn(static_decode_step(model, 1, cache_len), label="decode step",
                   min_run_time=min_run_time)
    kv = kv_cache_bytes(config.num_layers, config.num_kv_heads, config.head_dim, cache_len, 1, 4)
    tps = 1 / step.median_s
    peak = peak_matmul_flops("fp32", 256 if quick else 1024, "cpu", min_run_time=min_run_time)
    ids = torch.randint(0, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        prefill = time_fn(lambda: model(ids), label="prefill", min_run_time=min_run_time)
    rows = []

    def add(measurement, value, unit, conditions):
        rows.append({"measurement": measurement, "value": float(value), "unit": unit,
                     "conditions": conditions})

    add(f"{name} decode, batch 1", tps, "tokens/s", cond)
    add(f"{name} decode MBU", bandwidth_utilisation(tps, weights + kv, bandwidth), "fraction",
        f"{(weights + kv) / 1e6:.0f} MB per token / copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    add("critical batch size, predicted", critical_batch_size(peak, bandwidth, 4), "sequences",
        f"fp32 ridge {peak / bandwidth:.1f} FLOP/B x 4 bytes / 2")
    add(f"{name} prefill MFU", flops_utilisation(prompt / prefill.median_s, 2 * n_params, peak),
        "fraction", f"2N FLOPs/token, prompt {prompt}, vs best fp32 matmul {peak / 1e9:.0f} GFLOP/s")
    return rows
