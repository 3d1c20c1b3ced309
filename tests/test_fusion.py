"""Tests of utils.fusion: the traffic model, the three chain runners, softmax variants, folding,
splitting and the FX passes, each against a library or an unmodified module."""

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
