"""Chapter 00 (utils.roofline): the roofline and memory formulas against hand-computed values, and
the measurement functions on tiny sizes (they run, return positive finite numbers, and the KV
cache that transformers builds matches the formula byte for byte)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from utils import roofline as rl
from utils.paths import MODELS_DIR, REPO_ROOT


# --------------------------------------------------------------------------- formulas

def test_matmul_flops_bytes_and_intensity_by_hand():
    # (2, 3) @ (3, 4): 2*2*3*4 = 48 FLOPs; (6 + 12 + 8) values * 4 bytes = 104 bytes
    assert rl.matmul_flops(2, 3, 4) == 48
    assert rl.matmul_bytes(2, 3, 4) == 104
    assert rl.matmul_bytes(2, 3, 4, bytes_per_value=2) == 52
    assert rl.arithmetic_intensity(2, 3, 4) == pytest.approx(48 / 104)


def test_gemv_intensity_is_about_two_over_bytes_per_value():
    # decode: (1, 4096) @ (4096, 4096) in bf16: 2*4096^2 / ((4096 + 4096^2 + 4096) * 2) ~ 1
    ai = rl.arithmetic_intensity(1, 4096, 4096, bytes_per_value=2)
    assert ai == pytest.approx(2 * 4096**2 / ((2 * 4096 + 4096**2) * 2))
    assert 0.99 < ai < 1.0
    # a square matmul of side n in fp32: 2n^3 / (3 n^2 * 4) = n / 6
    assert rl.arithmetic_intensity(600, 600, 600) == pytest.approx(100.0)


def test_attainable_flops_is_the_lower_of_the_two_roofs():
    peak, bw = 100e9, 10e9  # ridge point at 10 FLOP/byte
    assert rl.attainable_flops(1.0, peak, bw) == 10e9  # memory-bound
    assert rl.attainable_flops(10.0, peak, bw) == 100e9  # on the ridge
    assert rl.attainable_flops(50.0, peak, bw) == 100e9  # compute-bound


def test_kv_cache_bytes_teacher_and_gqa():
    # teacher: 6 layers, 2 KV heads of dim 64; 128 tokens, batch 1, fp32:
    # 2 * 6 * 2 * 64 * 128 * 1 * 4 = 786432 bytes
    assert rl.kv_cache_bytes(6, 2, 64, 128, 1, 4) == 786_432
    # grouped-query attention with 2 KV heads for 6 query heads stores 3x less than MHA
    mha = rl.kv_cache_bytes(6, 6, 64, 128, 1, 4)
    assert mha == 3 * rl.kv_cache_bytes(6, 2, 64, 128, 1, 4)
    # fp16 default, a 7B-like shape: 32 layers, 32 heads of 128, 4096 tokens = 2 GiB
    assert rl.kv_cache_bytes(32, 32, 128, 4096) == 2 * 2**30


def test_decode_bound():
    assert rl.decode_tokens_per_second_bound(100e9, 1e9) == pytest.approx(100.0)
    assert rl.decode_tokens_per_second_bound(100e9, 1e9, kv_bytes=1e9) == pytest.approx(50.0)


@pytest.mark.parametrize("call, name", [
    (lambda: rl.matmul_flops(0, 3, 4), "m"),
    (lambda: rl.matmul_flops(2, 3.0, 4), "k"),
    (lambda: rl.matmul_flops(2, 3, True), "n"),
    (lambda: rl.matmul_bytes(2, 3, 4, bytes_per_value=0), "bytes_per_value"),
    (lambda: rl.arithmetic_intensity(2, -1, 4), "k"),
    (lambda: rl.attainable_flops(0, 1e9, 1e9), "intensity"),
    (lambda: rl.attainable_flops(1, float("inf"), 1e9), "peak_flops"),
    (lambda: rl.attainable_flops(1, 1e9, -5), "bandwidth"),
    (lambda: rl.kv_cache_bytes(6, 0, 64, 128), "num_kv_heads"),
    (lambda: rl.kv_cache_bytes(6, 2, 64, 128, batch_size=0), "batch_size"),
    (lambda: rl.kv_cache_bytes(6, 2, 64, 12.5), "seq_len"),
    (lambda: rl.decode_tokens_per_second_bound(0, 1e9), "bandwidth"),
    (lambda: rl.decode_tokens_per_second_bound(1e9, 1e9, kv_bytes=-1), "kv_bytes"),
    (lambda: rl.as_dtype("int8"), "dtype"),
    (lambda: rl.as_dtype(torch.int32), "dtype"),
    (lambda: rl.measure_matmul(0, 8, 8), "m"),
    (lambda: rl.measure_bandwidth(2**20, kind="write"), "kind"),
    (lambda: rl.measure_bandwidth(0), "n_bytes"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


@pytest.mark.parametrize("call", [
    lambda: rl.model_weight_bytes("a model"),
    lambda: rl.model_kv_cache_bytes(torch.nn.Linear(2, 2), 8),
    lambda: rl.prefill_decode_timing(None),
    lambda: rl.tensor_memory_bytes(42),
])
def test_non_models_raise_type_error(call):
    with pytest.raises(TypeError, match="must be"):
        call()


# --------------------------------------------------------------------------- measurements

def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_measure_matmul_returns_positive_rates(dtype):
    r = rl.measure_matmul(16, 32, 8, dtype, min_run_time=0.01)
    assert r["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert _finite_positive(r["flop_per_s"]) and _finite_positive(r["bytes_per_s"])
    bytes_per_value = 4 if dtype == "fp32" else 2
    assert r["intensity"] == rl.arithmetic_intensity(16, 32, 8, bytes_per_value)
    assert r["flop_per_s"] * r["seconds"] == pytest.approx(8192)  # 2 m k n = 2*16*32*8
    assert _finite_positive(rl.peak_matmul_flops(dtype, size=32, min_run_time=0.01))


@pytest.mark.parametrize("kind, copies", [("copy", 2), ("read", 1), ("add", 3)])
def test_measure_bandwidth_counts_bytes_per_kind(kind, copies):
    r = rl.measure_bandwidth(2**20, kind, min_run_time=0.01)
    assert r["buffer_bytes"] == 2**20 and r["bytes_moved"] == copies * 2**20
    assert _finite_positive(r["bytes_per_s"])


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=True)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


def test_model_weight_bytes_counts_tied_embeddings_once():
    tied, untied = _tiny_llama(), _tiny_llama(tie_word_embeddings=False)
    n_tied = sum(p.numel() for p in tied.parameters())
    assert rl.model_weight_bytes(tied) == 4 * n_tied
    assert rl.model_weight_bytes(untied) == rl.model_weight_bytes(tied) + 64 * 32 * 4
    assert rl.model_weight_bytes(tied.to(torch.bfloat16)) == 2 * n_tied


def test_kv_cache_measured_equals_formula_for_teacher_shapes():
    # the teacher's architecture with random weights: no checkpoint needed for shapes
    from transformers import LlamaForCausalLM

    from utils.models import SPECS, llama_config

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(llama_config(SPECS["teacher"])).eval()
    r = rl.measure_kv_cache(teacher, seq_len=17, batch_size=3)
    assert r["layer_keys_shape"] == (3, 2, 17, 64)  # (B, kv_heads, T, head_dim)
    assert r["formula_bytes"] == 2 * 6 * 2 * 64 * 17 * 3 * 4
    assert r["measured_bytes"] == r["formula_bytes"]


def test_prefill_decode_timing_on_a_tiny_model():
    model = _tiny_llama()
    r = rl.prefill_decode_timing(model, prompt_len=8, new_tokens=3, batch_size=2,
                                 min_run_time=0.01)
    for key in ("prefill_ms_per_token", "prefill_tokens_per_s", "decode_ms_per_step",
                "decode_ms_per_token", "decode_tokens_per_s"):
        assert _finite_positive(r[key]), key
    assert r["decode_ms_per_token"] == pytest.approx(r["decode_ms_per_step"] / 2)
    assert (r["batch_size"], r["prompt_len"], r["threads"]) == (2, 8, torch.get_num_threads())


def test_predicted_decode_speed_uses_weights_and_kv():
    model = _tiny_llama()
    weights = rl.model_weight_bytes(model)
    kv = rl.model_kv_cache_bytes(model, 10)
    assert kv == 2 * 2 * 2 * 8 * 10 * 4  # layers, kv heads, head_dim 32/4, tokens, fp32
    assert rl.predicted_decode_tokens_per_second(model, 1e9, 10) == pytest.approx(
        1e9 / (weights + kv))


def test_tensor_memory_bytes_is_exact_on_cpu():
    one_mib = 2**18  # float32 values
    kept = rl.tensor_memory_bytes(lambda: torch.ones(one_mib))
    assert kept == {"peak_bytes": 2**20, "retained_bytes": 2**20}

    def temporaries():  # two 1 MiB temporaries alive at once, a 4-byte scalar kept
        x = torch.ones(one_mib)
        return (x * 2).sum()

    r = rl.tensor_memory_bytes(temporaries)
    assert r["peak_bytes"] >= 2 * 2**20
    assert r["retained_bytes"] < 2**20


def test_cache_tensor_bytes_accepts_legacy_tuples():
    k = torch.zeros(1, 2, 5, 8)
    assert rl.cache_tensor_bytes([(k, k), (k, k)]) == 4 * k.numel() * 4


# --------------------------------------------------------------------------- report

def test_quick_report_kv_cache_formula_equals_measurement_and_labels_bf16():
    from utils.bench import cpu_capabilities

    rows = rl.report_rows(quick=True)
    by_name = {r["measurement"]: r for r in rows}
    assert set(rows[0]) == {"measurement", "value", "unit", "conditions"}
    assert all(_finite_positive(r["value"]) for r in rows)
    assert by_name["KV cache, formula"]["value"] == by_name["KV cache, measured"]["value"] \
        == 2 * 4 * 2 * 48 * 32 * 4  # small: 4 layers, 2 KV heads of 48, 32 tokens, fp32
    bf16 = [r for r in rows if r["measurement"].startswith("matmul bf16")]
    assert len(bf16) == 1 and bf16[0]["unit"] == "GFLOP/s"
    assert ("emulated" in bf16[0]["measurement"]) == (not cpu_capabilities()["native_bf16"])


def test_report_cli_quick_json_for_chapter_00():
    out = subprocess.run([sys.executable, "-m", "utils.report", "00", "--quick", "--json"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["quick"] is True and result["machine"]["kernels"].startswith("aten ")
    assert "chapter 00" in out.stderr  # progress goes to stderr, JSON alone to stdout


# --------------------------------------------------------------------------- peak, MBU, MFU, batch

def test_theoretical_peak_by_hand():
    # 2 cores x 2.5 GHz x 2 FMA units x 8 fp32 lanes (256 bits) x 2 FLOPs = 160 GFLOP/s
    assert rl.theoretical_peak_flops(2, 2.5e9, 256) == pytest.approx(160e9)
    # one core at 1 GHz, one 512-bit unit, bf16 (32 lanes): 1e9 * 32 * 2 = 64 GFLOP/s
    assert rl.theoretical_peak_flops(1, 1e9, 512, fma_units=1, bytes_per_value=2) == \
        pytest.approx(64e9)


def test_cpu_peak_assumptions_are_self_consistent():
    a = rl.cpu_peak_assumptions(threads=1)
    assert a["cores"] == 1 and isinstance(a["note"], str)
    if a["peak_flops"] is not None:  # 1 core x clock x units x (bits / 32) x 2
        assert a["peak_flops"] == pytest.approx(
            a["clock_hz"] * a["fma_units"] * a["simd_bits"] / 32 * 2)


def test_critical_batch_size_by_hand_and_on_the_roofline():
    # ridge 100e9 / 10e9 = 10 FLOP/byte; fp32 weights: 10 x 4 / 2 = 20 sequences
    assert rl.critical_batch_size(100e9, 10e9, 4) == pytest.approx(20)
    assert rl.critical_batch_size(100e9, 10e9, 2) == pytest.approx(10)
    # at batch 20 a step over N fp32 weights does 2 N 20 FLOPs on 4 N bytes: 10 FLOP/byte, where
    # the memory roof (10e9 x 10) meets the compute roof (100e9)
    n = 1_000_000
    intensity = 2 * n * 20 / (4 * n)
    assert 10e9 * intensity == pytest.approx(100e9)


def test_mbu_and_mfu_by_hand():
    # 10 tokens/s reading 1 GB each = 10 GB/s of a 20 GB/s memory: 50%
    assert rl.bandwidth_utilisation(10, 1e9, 20e9) == pytest.approx(0.5)
    # 7B parameters, 2 x 7e9 FLOPs per token, 100 tokens/s on a 2.8 TFLOP/s peak: 50%
    assert rl.flops_utilisation(100, 2 * 7e9, 2.8e12) == pytest.approx(0.5)


def test_knee_batch_size_of_an_ideal_roofline_sweep():
    batches = [1, 2, 4, 8, 16, 32, 64]
    steps = [max(0.1, 0.01 * b) for b in batches]  # flat 100 ms, then 10 ms per sequence
    assert rl.knee_batch_size(batches, steps) == pytest.approx(10)
    assert rl.knee_batch_size([64, 1], [0.64, 0.1]) == pytest.approx(10)  # order does not matter


@pytest.mark.parametrize("call, name", [
    (lambda: rl.theoretical_peak_flops(0, 1e9, 256), "cores"),
    (lambda: rl.theoretical_peak_flops(1, 0, 256), "clock_hz"),
    (lambda: rl.critical_batch_size(1e9, 0, 4), "bandwidth"),
    (lambda: rl.critical_batch_size(1e9, 1e9, -2), "bytes_per_weight"),
    (lambda: rl.bandwidth_utilisation(0, 1e9, 1e9), "tokens_per_s"),
    (lambda: rl.flops_utilisation(1, 1e9, float("nan")), "peak_flops"),
    (lambda: rl.knee_batch_size([1], [0.1]), "batches"),
    (lambda: rl.knee_batch_size([1, 0], [0.1, 0.2]), "batches"),
    (lambda: rl.knee_batch_size([1, 2], [0.1, -1]), "step_seconds"),
    (lambda: rl.profile_rows(None, row_limit=0), "row_limit"),
])
def test_new_functions_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


def _tiny_course_llama():
    from utils.llama import CourseLlama, speed_model_config

    torch.manual_seed(0)
    return CourseLlama.from_config(speed_model_config(hidden_size=128, num_layers=2))


def test_counted_flops_match_2n_for_the_linear_layers():
    assert rl.counted_matmul_flops(lambda: torch.randn(3, 5) @ torch.randn(5, 7)) == {"mm": 210}
    model = _tiny_course_llama()  # hidden 128, 1 head, 1 KV head, MLP 256, vocab 32000, 2 layers
    per_layer = 4 * 128 * 128 + 3 * 128 * 256  # q, k, v, o; gate, up, down
    linear_params = 2 * per_layer + 32000 * 128  # + the tied LM head
    ids = torch.zeros(1, 10, dtype=torch.long)
    with torch.inference_mode():
        counts = rl.counted_matmul_flops(lambda: model(ids))
    matmuls = sum(v for k, v in counts.items() if k in ("mm", "addmm", "bmm"))
    assert matmuls == 2 * 10 * linear_params
    n = sum(p.numel() for p in model.parameters())  # + embedding-free norms: 2N is within 0.1%
    assert abs(2 * n * 10 / matmuls - 1) < 1e-3


def test_static_decode_step_matches_a_full_forward():
    model = _tiny_course_llama()
    step = rl.static_decode_step(model, batch_size=2, cache_len=9, seed=3)
    gen = torch.Generator().manual_seed(3)  # the same seeded ids the step was built with
    ids = torch.randint(0, 32000, (2, 9), generator=gen)
    with torch.inference_mode():
        expected = model(ids)[:, -1:].argmax(-1)
    first, again = step(), step()
    assert first.shape == (2, 1)
    assert torch.equal(first, expected) and torch.equal(again, expected)


def test_silenced_stderr_hides_file_descriptor_2(capfd):
    import os

    with rl.silenced_stderr():
        os.write(2, b"USDT noise\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_profile_rows_are_sorted_and_narrow():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    rows = rl.profile_rows(prof, row_limit=3)
    assert 1 <= len(rows) <= 3 and set(rows[0]) == {"operator", "calls", "self ms", "share"}
    assert [r["self ms"] for r in rows] == sorted((r["self ms"] for r in rows), reverse=True)
