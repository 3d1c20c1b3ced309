"""Measurement: latency with warm-up and repeats, percentiles, peak memory, tokens/s, machine.

Timing is built on ``torch.utils.benchmark.Timer``, which warms up, synchronises CUDA before
reading the clock, sets the thread count and repeats until a minimum run time; we report its
median and inter-quartile range. Compare two implementations as a ratio measured in the same run
(``compare``): an absolute time means little on a shared machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.benchmark as benchmark

from utils.validation import check_callable, check_positive_int


@dataclass(frozen=True)
class Timing:
    """Median and spread of one measured callable."""

    label: str
    median_s: float
    iqr_s: float
    runs: int
    threads: int

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    def __str__(self) -> str:
        return (f"{self.label}: median {self.median_ms:.3f} ms (IQR {self.iqr_s * 1e3:.3f} ms, "
                f"{self.runs} runs, {self.threads} threads)")


def time_fn(fn: Callable[[], object], *, label: str = "", warmup: int = 3,
            min_run_time: float = 0.3, threads: int | None = None) -> Timing:
    """Time ``fn()`` with ``torch.utils.benchmark``: ``warmup`` untimed calls, then repeated
    blocks for at least ``min_run_time`` seconds; returns the median and IQR per call."""
    check_callable("fn", fn)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if min_run_time <= 0:
        raise ValueError(f"min_run_time must be > 0 seconds, got {min_run_time}")
    threads = threads or torch.get_num_threads()
    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads,
                            label=label or getattr(fn, "__name__", "fn"))
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(label or getattr(fn, "__name__", "fn"), m.median, m.iqr, len(m.times), threads)


def compare(fns: dict[str, Callable[[], object]], **kwargs) -> dict[str, dict[str, float]]:
    """Time several callables in one run, interleaved round by round, and give each one's
    speed-up over the first (the baseline): ``{label: {"median_ms", "iqr_ms", "speedup"}}``."""
    if not fns:
        raise ValueError("fns must hold at least one callable (the first is the baseline)")
    rounds = kwargs.pop("rounds", 3)
    per_label: dict[str, list[Timing]] = {label: [] for label in fns}
    for _ in range(rounds):  # interleave so that a slow spell of the machine hits all alike
        for label, fn in fns.items():
            per_label[label].append(time_fn(fn, label=label, **kwargs))
    medians = {k: statistics.median(t.median_s for t in v) for k, v in per_label.items()}
    base = medians[next(iter(fns))]
    return {
        label: {"median_ms": medians[label] * 1e3,
                "iqr_ms": statistics.median(t.iqr_s for t in per_label[label]) * 1e3,
                "speedup": base / medians[label]}
        for label in fns
    }


def latency_percentiles(fn: Callable[[], object], *, n: int = 50, warmup: int = 5,
                        percentiles=(50, 90, 99), clock: Callable[[], float] = time.perf_counter,
                        sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Per-call latencies (seconds) of ``n`` calls after ``warmup``: ``{"p50": ..., "p90": ...,
    "mean": ..., "first": ...}``. ``first`` is the first (cold) call, kept to show warm-up.

    Percentiles use the nearest-rank method on the sorted samples. ``sync`` (for example
    ``torch.cuda.synchronize``) runs before each clock read; ``clock`` can be replaced in tests.
    """
    check_callable("fn", fn)
    if n < 1 or warmup < 0:
        raise ValueError(f"n must be >= 1 and warmup >= 0, got n={n}, warmup={warmup}")
    if any(not 0 < p <= 100 for p in percentiles):
        raise ValueError(f"percentiles must lie in (0, 100], got {percentiles}")
    sync = sync or (lambda: None)
    samples = []
    for _ in range(warmup + n):
        sync()
        t0 = clock()
        fn()
        sync()
        samples.append(clock() - t0)
    first, timed = samples[0], sorted(samples[warmup:])
    result = {f"p{p:g}": timed[max(0, -(-p * len(timed) // 100) - 1)] for p in percentiles}
    result.update(mean=statistics.fmean(timed), first=first)
    return result


class silenced_stderr:
    """Redirect file descriptor 2 to /dev/null inside a ``with`` block: C++ libraries (the
    profiler's ``USDT ... profiler_start`` lines) write there directly, below Python's
    ``sys.stderr``. Python's own warnings are silenced too while it is active."""

    def __enter__(self):
        import os
        import sys

        sys.stderr.flush()
        self._saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        return self

    def __exit__(self, *exc):
        import os
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False


def tokens_per_second(n_tokens: int, seconds: float) -> float:
    if n_tokens < 0 or seconds <= 0:
        raise ValueError(f"need n_tokens >= 0 and seconds > 0, got {n_tokens}, {seconds}")
    return n_tokens / seconds


def peak_memory_bytes(fn: Callable[[], object], device: str | torch.device = "cpu",
                      interval_s: float = 0.0005) -> int:
    """Peak memory that ``fn()`` adds on top of what was in use when it started.

    CUDA: exact, from the caching allocator's peak counter. CPU: the process's resident set
    size sampled every ``interval_s`` by a background thread (psutil), so a very short spike can be
    missed and the figure includes allocator overhead; good to a few percent for tensors of MBs.
    """
    check_callable("fn", fn)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return max(0, peak - before)


# --------------------------------------------------------------------------- memory bandwidth

BANDWIDTH_KINDS = ("copy", "read", "add")


def measure_bandwidth(n_bytes: int = 256 * 2**20, kind: str = "copy", device="cpu", *,
                      min_run_time: float = 0.3) -> dict:
    """Memory bandwidth (bytes/s) of a streaming kernel over fp32 buffers of ``n_bytes`` each,
    chosen far larger than the last-level cache so the data comes from DRAM (or GPU HBM).

    ``kind``: ``'copy'`` (dst <- src, counts n read + n written, the STREAM convention),
    ``'read'`` (a sum, counts n read) or ``'add'`` (c <- a + b, counts 2n read + n written).
    A CPU store to memory not in cache first reads the line (write-allocate), so the hardware moves
    more than the STREAM count for copy and add; that makes these figures conservative.
    """
    check_positive_int("n_bytes", n_bytes)
    if kind not in BANDWIDTH_KINDS:
        raise ValueError(f"kind must be one of {BANDWIDTH_KINDS}, got {kind!r}")
    device = torch.device(device)
    numel = max(1, n_bytes // 4)
    a = torch.empty(numel, device=device).fill_(1.0)  # fill touches every page before timing
    b = torch.empty(numel, device=device).fill_(2.0)
    if kind == "copy":
        fn, moved = (lambda: b.copy_(a)), 2 * numel * 4
    elif kind == "read":
        fn, moved = (lambda: a.sum()), numel * 4
    else:
        c = torch.empty(numel, device=device).fill_(0.0)
        fn, moved = (lambda: torch.add(a, b, out=c)), 3 * numel * 4
    timing = time_fn(fn, label=f"bandwidth {kind}", min_run_time=min_run_time)
    return {"kind": kind, "buffer_bytes": numel * 4, "bytes_moved": moved, "device": str(device),
            "threads": timing.threads, "seconds": timing.median_s,
            "bytes_per_s": moved / timing.median_s}


# --------------------------------------------------------------------------- machine report

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
          "amx_tile")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                if flags and model:
                    break
    except OSError:  # not Linux: fall back to py-cpuinfo when present
        try:
            import cpuinfo

            info = cpuinfo.get_cpu_info()
            model, flags = info.get("brand_raw", model), set(info.get("flags", []))
        except ImportError:
            pass
    return model, flags


# What each dispatch control forces down, and the ISA names that keep a feature available.
_FBGEMM_VNNI = {"AVX512_E1", "AVX512_E1_256"}  # FBGEMM_ENABLE_INSTRUCTIONS values that keep VNNI
_ONEDNN_BF16 = {"AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT"}
DISPATCH_CONTROLS = {
    "ATEN_CPU_CAPABILITY": "ATen's own vectorised kernels (element-wise, reductions): "
                           "avx512, avx2 or default",
    "ONEDNN_MAX_CPU_ISA": "oneDNN (fp32/bf16 matmul and convolution through mkldnn): e.g. AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "FBGEMM (torch.ao int8 Linear): AVX2, AVX512, AVX512_E1 (VNNI)",
}


def forced_isa() -> dict[str, str]:
    """The dispatch controls set in this process's environment (``DISPATCH_CONTROLS``)."""
    return {k: os.environ[k] for k in DISPATCH_CONTROLS if os.environ.get(k)}


def cpu_capabilities() -> dict[str, object]:
    """What torch's CPU kernels can use here: the CPU's flags, lowered where a dispatch control
    forces a back-end down (how CI proves outputs hold on an AVX2-only laptop).

    - ``aten``: the capability ATen dispatches to (``torch.backends.cpu.get_cpu_capability``).
    - ``int8_vnni``: FBGEMM's int8 GEMM has VNNI (``vpdpbusd``: u8 x s8 products summed straight
      into int32). Without it FBGEMM uses ``vpmaddubsw``, whose int16 pair sums saturate, which is
      why torch's dynamic int8 Linear keeps activations to 7 bits (``reduce_range``).
    - ``native_bf16``: bf16 dot products in hardware (``avx512_bf16`` or AMX, or arm64 ``bf16``);
      elsewhere bf16 matmul is emulated and usually slower than fp32.
    """
    forced = forced_isa()
    _, flags = cpu_model_and_flags()
    arm = platform.machine().lower() in ("arm64", "aarch64")
    fbgemm = forced.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
    onednn = forced.get("ONEDNN_MAX_CPU_ISA", "").upper()
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags) and (not fbgemm
                                                                      or fbgemm in _FBGEMM_VNNI)
    bf16 = (bool({"avx512_bf16", "amx_bf16"} & flags) and (not onednn or onednn in _ONEDNN_BF16)) \
        or (arm and "bf16" in flags)
    return {"aten": torch.backends.cpu.get_cpu_capability(), "int8_vnni": vnni,
            "native_bf16": bf16, "forced": forced}


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads: ``n``, else ``$COURSE_THREADS``, else torch's default (one
    per physical core). Returns the count; every timing records it (``Timing.threads``).

    Why it matters: OpenMP threads spin-wait for each other, so more threads than free cores
    (two processes of two threads on two cores, a test run with parallel workers) makes small
    operators tens of times slower; chapter 00 measures it."""
    if n is None:
        env = os.environ.get("COURSE_THREADS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise ValueError(f"COURSE_THREADS must be a positive integer, got {env!r}")
            n = int(env)
    if n is not None:
        torch.set_num_threads(check_positive_int("n", n))
    return torch.get_num_threads()


def machine_info() -> dict[str, object]:
    """What a reader needs to interpret a timing: CPU, cores, vector/matrix ISA flags and what
    the kernels can use of them, GPU, threads and library versions."""
    import importlib.metadata as md

    model, flags = cpu_model_and_flags()
    caps = cpu_capabilities()
    info: dict[str, object] = {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": " ".join(f for f in _FLAGS if f in flags) or "none of " + ",".join(_FLAGS),
        "kernels": (f"aten {caps['aten']}, int8 {'VNNI' if caps['int8_vnni'] else 'no VNNI'}, "
                    f"bf16 {'native' if caps['native_bf16'] else 'emulated'}"),
        "forced_isa": " ".join(f"{k}={v}" for k, v in caps["forced"].items()) or "none",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
    }
    for package in ("torch", "transformers", "onnxruntime", "triton", "bitsandbytes", "numpy"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = "not installed"
    return info


def format_machine_info(info: dict[str, object] | None = None) -> str:
    info = info or machine_info()
    return "\n".join(f"{key:>14}: {value}" for key, value in info.items())
