"""Grading spec of lab 00, measuring inference (chapter 00).

Expected values come from the reference implementations in ``utils.roofline`` and ``utils.bench``
(imported inside functions, so that importing this spec stays cheap); the learner's answers must
not merely call them. Hidden cases are drawn from ``random.Random(SPEC.seed)``.
"""

from __future__ import annotations

import time

from utils.labs.spec import Case, Exercise, LabSpec, choice, dict_close, one_of

GB = 1e9  # decimal gigabytes per second, as memory bandwidth is quoted by vendors

# --------------------------------------------------------------------------- 1, 2: intensity


def _matmul_intensity(m, k, n, bytes_per_value):
    from utils.roofline import arithmetic_intensity

    return arithmetic_intensity(m, k, n, bytes_per_value)


def _gemv_intensity(d_in, d_out, bytes_per_value):
    return _matmul_intensity(1, d_in, d_out, bytes_per_value)


def _hidden_matmul(rng):
    cases = [Case((rng.choice([1, 8, 64, 512, 2048]), rng.choice([256, 768, 4096]),
                   rng.choice([256, 1024, 11008]), rng.choice([1, 2, 4])))
             for _ in range(5)]
    return cases + [Case((0, 64, 64, 2), raises="ValueError",
                         hint="a dimension of 0 is not a matrix: raise ValueError")]


def _hidden_gemv(rng):
    return [Case((rng.choice([384, 768, 4096, 8192]), rng.choice([384, 1536, 4096, 32000]),
                  rng.choice([0.5, 1, 2, 4]))) for _ in range(5)]


# --------------------------------------------------------------------------- 3: KV cache


def _kv_cache_bytes_gqa(num_layers, num_heads, num_kv_heads, hidden_size, seq_len,
                        batch_size=1, bytes_per_value=2):
    from utils.roofline import kv_cache_bytes

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    return kv_cache_bytes(num_layers, num_kv_heads, hidden_size // num_heads, seq_len,
                          batch_size, bytes_per_value)


def _hidden_kv(rng):
    shapes = [(32, 32, 8, 4096), (80, 64, 8, 8192), (6, 6, 2, 384), (28, 28, 4, 3584),
              (24, 16, 16, 2048)]
    cases = []
    for layers, heads, kv_heads, hidden in shapes:
        cases.append(Case((layers, heads, kv_heads, hidden, rng.choice([128, 2048, 32768])),
                          {"batch_size": rng.choice([1, 4, 16]),
                           "bytes_per_value": rng.choice([1, 2, 4])}))
    return cases + [Case((32, 32, 6, 4096, 128), raises="ValueError",
                         hint="32 query heads cannot share 6 KV heads evenly")]


# --------------------------------------------------------------------------- 4: decode bound


def _decode_tps(bandwidth_gb_s, num_params, bytes_per_param, kv_bytes=0):
    from utils.roofline import decode_tokens_per_second_bound

    return decode_tokens_per_second_bound(bandwidth_gb_s * GB, num_params * bytes_per_param,
                                          kv_bytes)


def _hidden_decode(rng):
    return [Case((rng.choice([50, 100, 900, 2000, 3350]),
                  rng.choice([11_000_000, 1_100_000_000, 7_000_000_000, 70_000_000_000]),
                  rng.choice([0.5, 1, 2, 4])), {"kv_bytes": rng.choice([0, 2**20, 2**30])})
            for _ in range(5)]


# --------------------------------------------------------------------------- 5: timing


class FakeClock:
    """A clock that only moves when the timed work runs: the work advances it by scripted
    durations, so any correct pattern of clock reads measures them exactly."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def call_timer(fn, *, n, warmup, percentiles, durations=None, sleep_s=None):
    """Adapter (runs in the sandbox and in ``check``): build the work and the clock from plain
    arguments and call ``fn(work, n=..., warmup=..., percentiles=..., clock=...)``."""
    if durations is not None:
        clock, script = FakeClock(), iter(durations)

        def work():
            try:
                clock.now += next(script)
            except StopIteration:
                raise RuntimeError(f"the timed function was called more than warmup + n = "
                                   f"{len(durations)} times") from None

        return fn(work, n=n, warmup=warmup, percentiles=tuple(percentiles), clock=clock)
    return fn(lambda: time.sleep(sleep_s), n=n, warmup=warmup, percentiles=tuple(percentiles),
              clock=time.perf_counter)


def _timer_expected(**kwargs):
    from utils.bench import latency_percentiles

    result = call_timer(latency_percentiles, **kwargs)
    return {f"p{p:g}": result[f"p{p:g}"] for p in kwargs["percentiles"]}


def _sleep_bounds(slack_s: float):
    def compare(expected, got):
        if not isinstance(got, dict) or set(got) != set(expected):
            return f"expected a dict with keys {sorted(expected)}, got {got!r:.80}"
        for key, low in expected.items():
            value = got[key]
            if type(value) not in (int, float) or not low <= value <= low + slack_s:
                return (f"[{key!r}] each call sleeps {low * 1e3:g} ms, so {key} must lie in "
                        f"[{low * 1e3:g}, {(low + slack_s) * 1e3:g}] ms; got {value!r:.40}")
        return None

    return compare


def _scripted(rng, n, warmup, percentiles):
    warm = [rng.choice([0.5, 0.8, 1.2]) for _ in range(warmup)]  # slow first calls
    timed = [round(rng.uniform(0.001, 0.02), 6) for _ in range(n)]
    return Case((), {"durations": warm + timed, "n": n, "warmup": warmup,
                     "percentiles": percentiles},
                label=f"fake clock, warmup={warmup}, n={n}, percentiles={percentiles}")


def _hidden_timer(rng):
    return [_scripted(rng, 20, 3, [50, 90, 99]), _scripted(rng, 7, 0, [50, 100]),
            _scripted(rng, 1, 2, [50]), _scripted(rng, 101, 5, [25, 50, 75, 95, 99]),
            Case((), {"durations": [0.01] * 5, "n": 0, "warmup": 5, "percentiles": [50]},
                 raises="ValueError", label="n=0"),
            Case((), {"durations": [0.01] * 5, "n": 5, "warmup": 0, "percentiles": [0]},
                 raises="ValueError", label="percentile 0")]


# --------------------------------------------------------------------------- 6: critical batch


def _critical_batch(peak_gflops, bandwidth_gb_s, bytes_per_weight):
    from utils.roofline import critical_batch_size

    return critical_batch_size(peak_gflops * 1e9, bandwidth_gb_s * GB, bytes_per_weight)


def _hidden_critical(rng):
    cases = [Case((rng.choice([60, 150, 2_000, 312_000, 989_000]),
                   rng.choice([20, 50, 900, 2039, 3350]), rng.choice([0.5, 1, 2, 4])))
             for _ in range(5)]
    return cases + [Case((100, 20, -2), raises="ValueError",
                         hint="bytes_per_weight must be positive: raise ValueError"),
                    Case((0, 20, 2), raises="ValueError", hint="a peak of 0 FLOP/s: raise ValueError")]


# --------------------------------------------------------------------------- 7: concept

DECODE_OPTIONS = ("a", "b", "c", "d")


def _decode_answer():
    return "b"


SPEC = LabSpec(
    lab="lab00",
    notebook="lab00_measuring_inference.ipynb",
    title="Lab 00: measuring inference",
    seed=2026_00, timeout_s=60, cell_timeout_s=10, call_timeout_s=5, memory_mb=2048,
    exercises=(
        Exercise(
            name="matmul_intensity", points=2, title="Arithmetic intensity of a matmul",
            expected=_matmul_intensity,
            public=(Case((1024, 1024, 1024, 2), label="square 1024 matmul, fp16"),
                    Case((1, 4096, 4096, 2), label="one token through a 4096x4096 layer, fp16"),
                    Case((3, 5, 7, 4), label="(3, 5) @ (5, 7), fp32"),
                    Case((64, 0, 64, 2), raises="ValueError", label="k=0 (bad input)",
                         hint="check every dimension is a positive int; raise ValueError")),
            hidden=_hidden_matmul,
            references=("utils.roofline.arithmetic_intensity", "utils.roofline.matmul_flops",
                        "utils.roofline.matmul_bytes"),
            hint="FLOPs = 2 m k n; bytes = (m k + k n + m n) x bytes_per_value"),
        Exercise(
            name="gemv_intensity", points=1, title="Arithmetic intensity of a decode GEMV",
            expected=_gemv_intensity,
            public=(Case((4096, 4096, 2), label="4096 -> 4096, fp16"),
                    Case((384, 1024, 4), label="course teacher MLP up-projection (384 -> 1024), fp32")),
            hidden=_hidden_gemv,
            references=("utils.roofline.arithmetic_intensity", "utils.roofline.matmul_flops",
                        "utils.roofline.matmul_bytes"),
            hint="decode multiplies ONE token vector (1, d_in) by the (d_in, d_out) weight"),
        Exercise(
            name="kv_cache_bytes_gqa", points=3,
            title="KV-cache bytes with grouped-query attention",
            expected=_kv_cache_bytes_gqa,
            public=(Case((32, 32, 32, 4096, 4096), label="Llama-2-7B shape, 4096 tokens, fp16"),
                    Case((32, 32, 8, 4096, 4096), label="same with 8 KV heads (GQA)"),
                    Case((6, 6, 2, 384, 512), {"batch_size": 8, "bytes_per_value": 4},
                         label="course teacher, batch 8, fp32"),
                    Case((6, 6, 4, 384, 512), raises="ValueError", label="6 heads, 4 KV heads",
                         hint="num_heads must be a multiple of num_kv_heads")),
            hidden=_hidden_kv,
            references=("utils.roofline.kv_cache_bytes",),
            hint="2 (K and V) x layers x kv_heads x head_dim x seq_len x batch x bytes; "
                 "head_dim = hidden_size / num_heads (query heads, not KV heads)"),
        Exercise(
            name="decode_tokens_per_second", points=2,
            title="Predicted decode tokens/s from bandwidth and bytes",
            expected=_decode_tps,
            public=(Case((1000, 7_000_000_000, 2), label="7B fp16 on 1000 GB/s"),
                    Case((50, 11_000_000, 4), {"kv_bytes": 2**20},
                         label="11M fp32 with 1 MiB of KV cache on 50 GB/s")),
            hidden=_hidden_decode,
            references=("utils.roofline.decode_tokens_per_second_bound",),
            hint="every weight and the KV cache are read once per token: "
                 "tokens/s = bandwidth (bytes/s) / (weight bytes + KV bytes); 1 GB/s = 1e9 B/s"),
        Exercise(
            name="measure_latency", points=3, title="Latency percentiles with warm-up",
            expected=_timer_expected, compare=dict_close(rel_tol=1e-9),
            adapter="utils.labs.specs.lab00:call_timer",
            public=(Case((), {"durations": [1.0, 0.5, 0.01, 0.02, 0.03, 0.04], "n": 4,
                              "warmup": 2, "percentiles": [50, 100]},
                         label="fake clock: 2 slow warm-up calls, then 10, 20, 30, 40 ms"),
                    Case((), {"sleep_s": 0.01, "n": 5, "warmup": 1, "percentiles": [50, 90]},
                         label="real clock, fn sleeps 10 ms",
                         expected={"p50": 0.01, "p90": 0.01}, compare=_sleep_bounds(0.5))),
            hidden=_hidden_timer,
            references=("utils.bench.latency_percentiles",),
            hint="time each call on its own (clock before and after), drop the warm-up calls, "
                 "sort, and take the nearest rank: the ceil(p/100 * n)-th smallest"),
        Exercise(
            name="decode_critical_batch", points=2,
            title="The critical batch size of decode",
            expected=_critical_batch,
            public=(Case((312_000, 2039, 2), label="312 TFLOP/s bf16, 2039 GB/s, bf16 weights"),
                    Case((150, 20, 4), label="a CPU: 150 GFLOP/s fp32, 20 GB/s, fp32 weights"),
                    Case((100, 0, 4), raises="ValueError", label="bandwidth 0 (bad input)",
                         hint="every argument must be a positive number; raise ValueError")),
            hidden=_hidden_critical,
            references=("utils.roofline.critical_batch_size",),
            hint="intensity of a batch-B decode step = 2B / bytes_per_weight; set it equal to "
                 "peak / bandwidth (both in the same units) and solve for B"),
        Exercise(
            name="ANSWER_DECODE_BOUND", points=1, kind="value",
            title="Why is batch-1 decode memory-bound?",
            expected=_decode_answer, compare=choice(),
            public=(Case(label="your answer is one of 'a', 'b', 'c', 'd' (graded on submission)",
                         compare=one_of(DECODE_OPTIONS), expected="a", graded=False),),
            hidden=lambda rng: [Case(label="the answer")],
            hint="think about FLOPs per byte of weight read"),
    ),
)
