"""Tests of utils.fusion: the traffic model, the three chain runners, softmax variants,
FlashAttention's recurrence (against SDPA), GEMM epilogue traffic, folding, splitting and the FX
passes, each against a library or an unmodified module."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils import fusion as fu

ATOL, RTOL = 1e-5, 1e-5


# --------------------------------------------------------------------------- traffic model

def test_chain_traffic_counts_bytes_and_keeps_flops():
    t = fu.chain_traffic(fu.BIAS_GELU_SCALE_RESIDUAL, 1000, bytes_per_value=4)
    # unfused: (1+1) + (1+1) + (1+1) + (2+1) = 9 accesses per element; fused: x, residual, out
    assert t["unfused_bytes"] == 9 * 1000 * 4
    assert t["fused_bytes"] == 3 * 1000 * 4
    assert t["flops"] == (1 + 20 + 1 + 1) * 1000  # the same FLOPs: fusion does not remove arithmetic
    assert fu.predicted_speedup(fu.BIAS_GELU_SCALE_RESIDUAL, 1000) == pytest.approx(3.0)
    wa = fu.chain_traffic(fu.BIAS_GELU_SCALE_RESIDUAL, 10, write_allocate=True)
    assert wa["unfused_bytes"] == (5 + 2 * 4) * 10 * 4 and wa["fused_bytes"] == (2 + 2) * 10 * 4


def test_predicted_speedup_time_model_limits():
    ops = fu.BIAS_GELU_SCALE_RESIDUAL
    tiny = fu.predicted_speedup(ops, 1, bandwidth=1e10, overhead_s=1e-5)
    huge = fu.predicted_speedup(ops, 2**30, bandwidth=1e10, overhead_s=1e-5)
    assert tiny == pytest.approx(4.0, rel=1e-3)  # launch-bound: kernel-count ratio
    assert huge == pytest.approx(3.0, rel=1e-3)  # memory-bound: byte ratio


@pytest.mark.parametrize("kwargs, err", [
    (dict(ops=[], numel=10), ValueError),
    (dict(ops=fu.BIAS_GELU_SCALE_RESIDUAL, numel=0), ValueError),
    (dict(ops=fu.BIAS_GELU_SCALE_RESIDUAL, numel=10, bytes_per_value=0), ValueError),
])
def test_chain_traffic_rejects_bad_input(kwargs, err):
    with pytest.raises(err):
        fu.chain_traffic(**kwargs)


# --------------------------------------------------------------------------- chain runners

def test_tiled_chain_equals_eager():
    g = torch.Generator().manual_seed(0)
    x, b, r = torch.randn(37, 64, generator=g), torch.randn(64, generator=g), \
        torch.randn(37, 64, generator=g)
    ref = fu.bias_gelu_scale_residual(x, b, r, 0.25)
    for rows in (1, 5, 37, 100):
        for workers in (1, 2, 3):
            out = fu.bias_gelu_scale_residual_tiled(x, b, r, 0.25, block_rows=rows, workers=workers)
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_chain_rejects_bad_shapes():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual"):
        fu.bias_gelu_scale_residual_tiled(x, torch.randn(8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="bias"):
        fu.bias_gelu_scale_residual_tiled(x, torch.randn(9), torch.randn(4, 8))
    with pytest.raises(TypeError, match="x"):
        fu.bias_gelu_scale_residual_tiled([1.0], torch.randn(8), torch.randn(4, 8))


@pytest.mark.slow
def test_compiled_chain_equals_eager_and_shows_one_kernel():
    x, b, r = torch.randn(8, 32), torch.randn(32), torch.randn(8, 32)
    out, code = fu.inductor_code(fu.compiled_chain(), x, b, r, 0.5)
    torch.testing.assert_close(out, fu.bias_gelu_scale_residual(x, b, r, 0.5), atol=ATOL, rtol=RTOL)
    assert code.count("cpp_fused") >= 1 and "for(" in fu.kernel_source(code).replace(" ", "")


def test_tiled_chain_reuses_one_pool_and_skips_it_when_small():
    g = torch.Generator().manual_seed(0)
    cols = 1024
    rows = fu.TILED_PARALLEL_MIN_NUMEL // cols * 2
    x, b, r = torch.randn(rows, cols, generator=g), torch.randn(cols, generator=g), \
        torch.randn(rows, cols, generator=g)
    ref = fu.bias_gelu_scale_residual(x, b, r, 0.5)
    fu._POOLS.clear()
    small = fu.bias_gelu_scale_residual_tiled(x[:8], b, r[:8], 0.5, workers=2)
    assert fu._POOLS == {}  # below the threshold: no thread pool at all
    torch.testing.assert_close(small, ref[:8], atol=ATOL, rtol=RTOL)
    out1 = fu.bias_gelu_scale_residual_tiled(x, b, r, 0.5, workers=2)
    pool = fu._POOLS[1]  # two ranges: the caller takes one, one pool thread the other
    out2 = torch.empty_like(x)
    assert fu.bias_gelu_scale_residual_tiled(x, b, r, 0.5, workers=2, out=out2) is out2
    assert fu._POOLS[1] is pool and len(fu._POOLS) == 1  # created once, reused
    for out in (out1, out2):
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_chain_into_preallocated_output_equals_eager():
    g = torch.Generator().manual_seed(1)
    x, b, r = torch.randn(6, 32, generator=g), torch.randn(32, generator=g), \
        torch.randn(6, 32, generator=g)
    out = torch.full_like(x, float("nan"))
    assert fu.bias_gelu_scale_residual_into(x, b, r, 0.3, out=out) is out
    torch.testing.assert_close(out, F.gelu(x + b) * 0.3 + r, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="out"):
        fu.bias_gelu_scale_residual_into(x, b, r, out=torch.empty(6, 31))
    with pytest.raises(ValueError, match="out"):
        fu.bias_gelu_scale_residual_tiled(x, b, r, out=torch.empty(6, 32, dtype=torch.float64))


@pytest.mark.slow
def test_compiled_chain_into_writes_out():
    x, b, r = torch.randn(8, 32), torch.randn(32), torch.randn(8, 32)
    out = torch.zeros_like(x)
    fu.compiled_chain_into()(x, b, r, 0.5, out)
    torch.testing.assert_close(out, fu.bias_gelu_scale_residual(x, b, r, 0.5), atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- softmax

@pytest.mark.parametrize("shape, scale", [((3, 17), 1.0), ((2, 4, 300), 50.0), ((5, 1), 3.0)])
def test_softmax_variants_match_torch(shape, scale):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * scale
    ref = torch.softmax(x, -1)
    torch.testing.assert_close(fu.softmax_safe(x), ref)
    for block in (1, 7, 128):
        torch.testing.assert_close(fu.softmax_online(x, block=block), ref)


def test_online_softmax_extreme_inputs():
    x = torch.randn(4, 50) * 1000  # exp overflows: the naive form fails, the others do not
    assert torch.isnan(fu.softmax_naive(x)).any()
    torch.testing.assert_close(fu.softmax_online(x, block=8), torch.softmax(x, -1))
    x[0, :30] = -math.inf  # a causal-style mask
    x[1] = -math.inf       # a fully masked row: torch gives NaN, so do we
    torch.testing.assert_close(fu.softmax_online(x, block=8), torch.softmax(x, -1), equal_nan=True)
    torch.testing.assert_close(fu.softmax_online(x, dim=0, block=3), torch.softmax(x, 0),
                               equal_nan=True)


def test_online_stats_are_max_and_normaliser():
    x = torch.randn(3, 40)
    m, d = fu.online_softmax_stats(x, block=6)
    torch.testing.assert_close(m, x.amax(-1))
    torch.testing.assert_close(d, torch.exp(x - x.amax(-1, keepdim=True)).sum(-1))
    with pytest.raises(ValueError, match="block"):
        fu.online_softmax_stats(x, block=0)
    with pytest.raises(TypeError, match="x"):
        fu.softmax_online([1.0, 2.0])


# --------------------------------------------------------------------------- FlashAttention

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [1, 7, 64, 300])
def test_flash_attention_reference_matches_sdpa(causal, block):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=g) * 3 for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = fu.flash_attention_reference(q, k, v, block=block, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flash_attention_reference_other_shapes_and_scale():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 9, 8, generator=g, dtype=torch.float64)   # Tq != Tk, Dv != D
    k = torch.randn(4, 21, 8, generator=g, dtype=torch.float64)
    v = torch.randn(4, 21, 5, generator=g, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.7)
    torch.testing.assert_close(fu.flash_attention_reference(q, k, v, block=4, scale=0.7), ref)
    # independent: the textbook formula with the whole score matrix
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(fu.flash_attention_reference(q, k, v, block=5),
                               torch.softmax(s, -1) @ v)
    with pytest.raises(ValueError, match="block"):
        fu.flash_attention_reference(q, k, v, block=0)
    with pytest.raises(ValueError):
        fu.flash_attention_reference(q, k[..., :7], v)


def test_flash_attention_update_one_step_is_softmax_of_the_union():
    g = torch.Generator().manual_seed(4)
    s1, s2 = torch.randn(3, 4, generator=g) * 10, torch.randn(3, 6, generator=g) * 10
    v1, v2 = torch.randn(4, 2, generator=g), torch.randn(6, 2, generator=g)
    s2[0] = -math.inf  # row 0: the whole second block masked
    m, l, o = torch.full((3,), -math.inf), torch.zeros(3), torch.zeros(3, 2)
    m, l, o = fu.flash_attention_update(m, l, o, s1, v1)
    m, l, o = fu.flash_attention_update(m, l, o, s2, v2)
    s, v = torch.cat([s1, s2], 1), torch.cat([v1, v2], 0)
    torch.testing.assert_close(m, s.amax(-1))
    torch.testing.assert_close(l, torch.exp(s - s.amax(-1, keepdim=True)).sum(-1))
    torch.testing.assert_close(o, torch.softmax(s, -1) @ v)
    # a row masked in every block so far stays at the start state (no NaN)
    m0, l0, o0 = fu.flash_attention_update(torch.full((1,), -math.inf), torch.zeros(1),
                                           torch.zeros(1, 2), torch.full((1, 3), -math.inf), v1[:3])
    assert m0.item() == -math.inf and l0.item() == 0 and torch.all(o0 == 0)
    with pytest.raises(ValueError, match="values"):
        fu.flash_attention_update(m, l, o, s1, v2)
    with pytest.raises(ValueError, match="non-empty"):
        fu.flash_attention_update(m, l, o, s1[:, :0], v1[:0])


def test_attention_traffic_counts():
    t = fu.attention_traffic(256, 64, block_q=128, bytes_per_value=2)
    # standard: Q,K read + S written; S read + P written; P,V read + O written
    standard = (2 * 256 * 64 + 256 * 256) + (2 * 256 * 256) + (256 * 256 + 256 * 64 + 256 * 64)
    assert t["standard_bytes"] == standard * 2
    assert t["flash_bytes"] == (256 * 64 * 2 + 2 * (2 * 256 * 64)) * 2  # K, V read twice
    assert t["score_matrix_bytes"] == 256 * 256 * 2
    assert fu.attention_traffic(4096, 64)["ratio"] > fu.attention_traffic(512, 64)["ratio"] > 1
    with pytest.raises(ValueError):
        fu.attention_traffic(0, 64)


# --------------------------------------------------------------------------- GEMM epilogue

def test_gemm_epilogue_traffic_and_prediction():
    t = fu.gemm_epilogue_traffic(4, 5, 3, epilogue_passes=2, bytes_per_value=4)
    assert t["gemm_bytes"] == (4 * 3 + 3 * 5 + 5 + 4 * 5) * 4
    assert t["epilogue_bytes"] == 2 * 2 * 4 * 5 * 4  # each pass reads and writes C
    assert t["fused_bytes"] == t["gemm_bytes"] and t["flops"] == 2 * 4 * 5 * 3
    assert fu.gemm_epilogue_traffic(4, 5, 3, 0)["byte_ratio"] == 1.0
    # the prediction: bare GEMM time plus the passes at the given bandwidth
    p = fu.predicted_epilogue_speedup(1000, 1000, 8, gemm_s=1e-3, bandwidth=8e9,
                                      passes_before=2, passes_after=0)
    assert p == pytest.approx((1e-3 + 2 * 2 * 1000 * 1000 * 4 / 8e9) / 1e-3)
    assert fu.predicted_epilogue_speedup(10, 10, 10, 1.0, 1e9, 1, 1) == 1.0
    with pytest.raises(ValueError):
        fu.gemm_epilogue_traffic(4, 5, 3, epilogue_passes=-1)
    with pytest.raises(ValueError):
        fu.predicted_epilogue_speedup(4, 5, 3, 0.0, 1e9, 2, 1)


def test_linear_gelu_variants_match_torch():
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(7, 16, generator=g), torch.randn(16, 9, generator=g), \
        torch.randn(9, generator=g)
    ref = F.gelu(F.linear(x, w.t(), b))
    torch.testing.assert_close(fu.linear_gelu(x, w, b), ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fu.addmm_gelu(x, w, b), ref, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- horizontal fusion

def test_fused_qkv_equals_separate():
    torch.manual_seed(0)
    q, k, v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
    h = torch.randn(2, 5, 16)
    fq, fk, fv = fu.FusedQKV(q, k, v)(h)
    for a, b in ((fq, q(h)), (fk, k(h)), (fv, v(h))):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="in_features"):
        fu.FusedQKV(q, nn.Linear(8, 8), v)
    with pytest.raises(TypeError):
        fu.FusedQKV(q, k, nn.Conv1d(1, 1, 1))


# --------------------------------------------------------------------------- folding

@pytest.mark.parametrize("norm", [nn.LayerNorm(12), nn.RMSNorm(12)])
def test_fold_norm_into_linears_is_exact(norm):
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    lins = [nn.Linear(12, 6), nn.Linear(12, 4, bias=False)]
    x = torch.randn(3, 12)
    ref = [lin(norm(x)) for lin in lins]
    fu.fold_norm_into_linears(norm, lins)
    assert torch.all(norm.weight == 1)
    for lin, r in zip(lins, ref):
        torch.testing.assert_close(lin(norm(x)), r, atol=ATOL, rtol=RTOL)


def test_fold_norm_rejects_mismatch():
    with pytest.raises(ValueError, match="in_features"):
        fu.fold_norm_into_linears(nn.LayerNorm(12), [nn.Linear(10, 3)])
    with pytest.raises(TypeError):
        fu.fold_norm_into_linears(nn.ReLU(), [nn.Linear(12, 3)])


def test_fold_batchnorm_matches_torch_utility():
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    conv.eval(), bn.eval()
    x = torch.randn(2, 3, 9, 9)
    ours = fu.fold_batchnorm_into_conv(conv, bn)
    torch.testing.assert_close(ours(x), bn(conv(x)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours(x), fuse_conv_bn_eval(conv, bn)(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="features"):
        fu.fold_batchnorm_into_conv(conv, nn.BatchNorm2d(4))


def test_rope_tables_match_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, num_hidden_layers=1, vocab_size=32)
    cos_ref, sin_ref = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.arange(50)[None])
    cos, sin = fu.rope_tables(16, 50, base=10000.0)
    torch.testing.assert_close(cos, cos_ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, sin_ref[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="head_dim"):
        fu.rope_tables(15, 10)


# --------------------------------------------------------------------------- splitting

@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_matmul_splits_equal_full(parts):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 14, generator=g), torch.randn(14, 11, generator=g)
    ref = a @ b
    for split in (fu.matmul_split_k, fu.matmul_split_rows, fu.matmul_split_cols):
        torch.testing.assert_close(split(a, b, parts), ref, atol=ATOL, rtol=RTOL)


def test_matmul_split_rejects_bad_input():
    a, b = torch.randn(4, 5), torch.randn(5, 3)
    with pytest.raises(ValueError, match="parts"):
        fu.matmul_split_cols(a, b, 4)
    with pytest.raises(ValueError, match="parts"):
        fu.matmul_split_k(a, b, 0)
    with pytest.raises(ValueError, match="2-D"):
        fu.matmul_split_rows(a, torch.randn(4, 3), 2)


# --------------------------------------------------------------------------- block and passes

def test_course_llama_matches_transformers_and_folding_is_exact(small):
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = small(ids).logits
        torch.testing.assert_close(fu.CourseLlama.from_llama(small)(ids), ref, atol=1e-4, rtol=1e-4)
        folded = fu.fold_llama_norms(small)
        torch.testing.assert_close(folded(ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert torch.all(folded.model.layers[0].input_layernorm.weight == 1)
    assert not torch.all(small.model.layers[0].input_layernorm.weight == 1)  # the original kept


def test_fx_passes_keep_outputs(small):
    course = fu.CourseLlama.from_llama(small)
    block = course.blocks[0]
    x = torch.randn(2, 16, small.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = course.cos[:16], course.sin[:16]
    gm = torch.fx.symbolic_trace(block)
    before = fu.count_ops(gm)
    assert fu.remove_identity_ops(gm, x, cos, sin) == 3  # dropout and two .float() on fp32
    assert not any(n.op == "call_module" and "dropout" in str(n.target) for n in gm.graph.nodes)
    assert fu.fuse_rmsnorm(gm) == 2
    assert fu.fuse_silu_mul(gm) == 1
    assert sum(fu.count_ops(gm).values()) < sum(before.values())
    with torch.no_grad():
        torch.testing.assert_close(gm(x, cos, sin), block(x, cos, sin), atol=ATOL, rtol=RTOL)


def test_identity_and_dead_code_passes_on_a_toy_graph():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop, self.ident = nn.Linear(4, 4), nn.Dropout(0.1), nn.Identity()

        def forward(self, x):
            unused = torch.relu(x) * 3  # dead
            y = self.ident(self.drop(self.lin(x))) * 1
            return F.dropout(y + 0, p=0.2, training=False)

    toy = Toy().eval()
    gm = torch.fx.symbolic_trace(toy)
    x = torch.randn(3, 4)
    removed = fu.remove_identity_ops(gm)
    assert removed == 7  # relu, mul 3 (dead); dropout, identity, *1, +0, F.dropout
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    torch.testing.assert_close(gm(x), toy(x))
    with pytest.raises(TypeError, match="GraphModule"):
        fu.remove_identity_ops(toy)


def test_fuse_silu_mul_either_order():
    def f(a, b):
        return b * F.silu(a) + F.silu(b) * a

    gm = torch.fx.symbolic_trace(f)
    assert fu.fuse_silu_mul(gm) == 2
    a, b = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(gm(a, b), f(a, b))


def test_greedy_generate_window_rejects_short_prompt(small):
    course = fu.CourseLlama.from_llama(small)
    with pytest.raises(ValueError, match="window"):
        fu.greedy_generate_window(course, torch.zeros(1, 4, dtype=torch.long), 2, window=8)
    out = fu.greedy_generate_window(course, torch.zeros(1, 8, dtype=torch.long), 3, window=8)
    assert out.shape == (1, 11)


def test_matmul_split_threads_equals_full():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 10, generator=g), torch.randn(10, 8, generator=g)
    for split in ("rows", "cols"):
        torch.testing.assert_close(fu.matmul_split_threads(a, b, 2, split), a @ b)
    with pytest.raises(ValueError, match="split"):
        fu.matmul_split_threads(a, b, 2, "k")


@pytest.mark.slow
def test_compile_blocks_gives_the_same_logits_and_leaves_the_original_eager(small):
    course = fu.CourseLlama.from_llama(small)
    compiled = fu.compile_blocks(course)
    assert all(type(b) is fu.CourseDecoderBlock for b in course.blocks)
    assert all(type(b) is not fu.CourseDecoderBlock for b in compiled.blocks)
    assert compiled.embed is course.embed
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), course(ids), atol=ATOL, rtol=RTOL)
    with pytest.raises(TypeError, match="CourseLlama"):
        fu.compile_blocks(small)
