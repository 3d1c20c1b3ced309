"""Chapter 09: every Triton kernel against its torch reference (in Triton's interpreter on a CPU,
natively where a GPU is), the grid and traffic models, the debugging helpers, and the import on a
machine without triton."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils import triton_kernels as T

pytestmark = pytest.mark.skipif(not T.HAVE_TRITON, reason="triton ships Linux x86-64 wheels only")
DEV = T.kernel_device() if T.HAVE_TRITON else torch.device("cpu")
DOT_TOL = 1e-4 if DEV.type == "cpu" else 2e-2  # tl.dot on fp32 is TF32 on a GPU


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def test_every_kernel_matches_torch_within_tolerance():
    rows = T.check_kernels(quick=True)
    assert {r["kernel"] for r in rows} >= {"vector_add", "fused_softmax", "online_fused_softmax",
                                           "matmul", "matmul + bias + GELU", "layer_norm",
                                           "rms_norm", "flash_attention",
                                           "flash_attention causal", "int4_gemv"}
    failed = [r for r in rows if not r["max_abs_error"] <= r["tolerance"]]
    assert not failed and all(r["passed"] for r in rows)


def test_the_interpreter_is_chosen_without_a_gpu():
    if not torch.cuda.is_available():
        assert T.interpreting() and T.mode() == "interpreter" and DEV.type == "cpu"


def test_program_lanes_show_the_mask_of_the_last_program():
    offsets, mask = T.program_lanes(10, 4)
    assert offsets.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert mask.tolist()[-1] == [True, True, False, False] and int(mask.sum()) == 10


@pytest.mark.parametrize("n", [1, 255, 256, 257, 3000])
def test_vector_add_any_length(n):
    x, y = rand(n), rand(n, seed=1)
    assert torch.equal(T.vector_add(x, y, block=256), x + y)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (33, 17, 65), (64, 64, 64), (5, 100, 3)])
def test_matmul_odd_shapes_strides_and_epilogue(m, k, n):
    a, b, bias = rand(m, k), rand(n, k, seed=1).t(), rand(n, seed=2)  # b not contiguous
    torch.testing.assert_close(T.matmul(a, b), a @ b, rtol=DOT_TOL, atol=DOT_TOL)
    torch.testing.assert_close(T.matmul(a, b, bias, gelu=True, group_m=2),
                               F.gelu(a @ b + bias), rtol=DOT_TOL, atol=DOT_TOL)


def test_grouped_order_visits_every_tile_once_and_loads_fewer_blocks():
    row_major, grouped = T.program_order(9, 9, 1), T.program_order(9, 9, 3)
    assert row_major[:3] == [(0, 0), (0, 1), (0, 2)] and grouped[:3] == [(0, 0), (1, 0), (2, 0)]
    assert sorted(grouped) == sorted(row_major) == [(i, j) for i in range(9) for j in range(9)]
    # the Triton matmul tutorial's example: the first 9 tiles load 90 blocks vs 54
    assert T.blocks_loaded(row_major, 9, 9) == 90 and T.blocks_loaded(grouped, 9, 9) == 54
    assert sorted(T.program_order(5, 4, 3)) == [(i, j) for i in range(5) for j in range(4)]


def test_softmax_traffic_is_the_tutorials_count():
    t = T.softmax_traffic(100, 1000, bytes_per_value=1)
    assert t["naive_bytes"] == 8 * 100 * 1000 + 4 * 100 and t["fused_bytes"] == 2 * 100 * 1000
    assert t["online_bytes"] == 3 * 100 * 1000 and 3.99 < T.softmax_traffic(10, 10**6)["ratio"] < 4.01


def test_softmax_kernels_on_masked_and_long_rows():
    x = rand(4, 700)
    x[1, ::3] = float("-inf")
    for got in (T.fused_softmax(x), T.online_fused_softmax(x, block=128)):
        torch.testing.assert_close(got, torch.softmax(x, -1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="use online_fused_softmax"):
        T.fused_softmax(torch.zeros(1, T.MAX_FUSED_COLS + 1, device=DEV))
    with pytest.raises(ValueError, match="block must be a power of 2"):
        T.online_fused_softmax(x, block=100)


def test_norms_match_torch_on_3d_input():
    x, w, b = rand(2, 3, 77), rand(77, seed=1), rand(77, seed=2)
    torch.testing.assert_close(T.layer_norm(x, w, b), F.layer_norm(x, (77,), w, b),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(T.rms_norm(x, w, 1e-5), F.rms_norm(x, (77,), w, 1e-5),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        T.layer_norm(x, w[:5], b[:5])


@pytest.mark.parametrize("t_q,t_k,d", [(17, 40, 24), (40, 40, 64), (1, 33, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_matches_sdpa(t_q, t_k, d, causal):
    q, k, v = rand(2, 2, t_q, d), rand(2, 2, t_k, d, seed=1), rand(2, 2, t_k, d, seed=2)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(T.flash_attention(q, k, v, causal=causal, block_m=16, block_n=16),
                               want, rtol=DOT_TOL, atol=DOT_TOL / 10)


def test_causal_loop_skips_the_tiles_above_the_diagonal():
    assert T.causal_tiles(1024, 64, 64) == {"computed": 136, "all": 256}
    assert T.causal_tiles(10, 16, 16) == {"computed": 1, "all": 1}


def test_int4_gemv_matches_the_chapter_02_layer():
    torch.manual_seed(0)
    layer = T.int4_linear_from(nn.Linear(96, 50, bias=True), group_size=32).to(DEV)
    for x in (rand(96), rand(3, 96)):
        torch.testing.assert_close(T.int4_gemv(x, layer, block_k=32), layer(x),
                                   rtol=1e-5, atol=1e-5)
    t = T.gemv_traffic(4096, 4096, 32)
    assert 2.9 < t["fp16_bytes"] / t["int4_bytes"] < 3.1  # 16 bits vs 4 + 40/32 = 5.25
    with pytest.raises(TypeError, match="4-bit"):
        T.int4_gemv(rand(96), nn.Linear(96, 50))


def test_guard_band_catches_an_off_by_one_mask():
    x = rand(10)
    good, touched = T.copy_with_guard(x, block=8)
    bad, bad_touched = T.copy_with_guard(x, block=8, off_by_one=True)
    assert torch.equal(good, x) and touched == 0
    assert torch.equal(bad, x) and bad_touched == 1  # the result looks right; the guard does not


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's behaviour")
def test_device_assert_is_inactive_in_the_interpreter():
    assert T.device_assert_fires() is False


def test_predicted_gpu_times_follow_the_byte_model():
    rows = {r["case"]: r for r in T.predicted_gpu_times("T4", 4096)}
    naive, fused = rows["softmax, naive torch"], rows["softmax, fused Triton"]
    assert naive["predicted_us"] / fused["predicted_us"] == pytest.approx(
        T.softmax_traffic(4096, 4096)["ratio"])
    assert rows["matmul + bias + GELU, fused"]["bound"] == "compute"
    assert rows["GEMV batch 1, int4 weights"]["predicted_us"] < \
        rows["GEMV batch 1, fp16 weights"]["predicted_us"] / 2.9
    with pytest.raises(ValueError, match="gpu must be one of"):
        T.predicted_gpu_times("V100")


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="same shape"):
        T.vector_add(rand(3), rand(4))
    with pytest.raises(ValueError, match="need a \\(M, K\\) and b \\(K, N\\)"):
        T.matmul(rand(3, 4), rand(5, 2))
    with pytest.raises(ValueError, match="block_m must be a power of 2 >= 16"):
        T.matmul(rand(3, 4), rand(4, 2), block_m=8)
    with pytest.raises(ValueError, match="n must"):
        T.program_lanes(0, 4)


def test_without_triton_the_module_imports_and_says_why(tmp_path):
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from utils import triton_kernels as T\n"
            "assert not T.HAVE_TRITON and T.mode() == 'unavailable'\n"
            "try:\n"
            "    T.vector_add(torch.ones(3), torch.ones(3))\n"
            "except RuntimeError as e:\n"
            "    assert 'Linux x86-64' in str(e), e\n"
            "    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_lab09_adapter_requires_a_kernel_launch():
    from utils.labs.spec import tensor_arg
    from utils.labs.specs.lab09 import NoKernelLaunched, launching

    x, y = tensor_arg([1.0, 2.0, 3.0]), tensor_arg([0.5, 0.5, 0.5])
    assert launching(T.vector_add, x, y).tolist() == [1.5, 2.5, 3.5]
    with pytest.raises(NoKernelLaunched, match="no Triton kernel was launched"):
        launching(lambda a, b: a + b, x, y)


def test_the_gpu_benchmark_table_builds_with_a_stand_in_timer():
    """The GPU path's code, run end to end in the interpreter with a fixed 1 ms "timer" (the
    numbers mean nothing; the launches, shapes and table do)."""
    calls = []
    rows = T.gpu_benchmarks(size=32, timer=lambda fn: (fn(), calls.append(1), 1.0)[-1],
                            compiled=False)
    assert len(rows) == len(calls) - 1 == 14  # the copy-bandwidth probe is timed too
    assert {r["case"] for r in rows} >= {"softmax", "matmul fp16", "attention, causal",
                                         "GEMV batch 1"}
    assert all(r["ms"] == 1.0 and r["GB/s"] > 0 for r in rows)
    assert T.gpu_spec("NVIDIA H200") == T.GPU_SPECS["H200-SXM"] and T.gpu_spec("cpu") is None


def test_kernels_run_when_triton_was_imported_first():
    """torch.compile imports triton before this module can set TRITON_INTERPRET: the standard
    library's @jit helpers (tl.max, tl.cdiv) must still run in the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter's case")
    code = ("import triton\nfrom utils import triton_kernels as T\n"
            "assert T.program_order(3, 3, 1)[:2] == [(0, 0), (0, 1)]\n"
            "assert all(r['passed'] for r in T.check_kernels())\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in __import__("os").environ.items()
                                           if k != "TRITON_INTERPRET"})
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
