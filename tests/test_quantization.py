"""Unit tests of utils.quantization: formulas against hand computations, error bounds, the
integer GEMM against float, NF4 against bitsandbytes, packing, GPTQ vs round-to-nearest, the
weight-only modules, the KV cache, and clear errors for bad arguments."""

import math

import pytest
import torch
import torch.nn as nn

from utils import quantization as Q
from utils.device import has_package
from utils.models import cache_argument


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- affine formulas

def test_qrange_symmetric_and_asymmetric():
    assert Q.qrange(8, True) == (-127, 127)
    assert Q.qrange(8, False) == (0, 255)
    assert Q.qrange(4, True) == (-7, 7)
    assert Q.qrange(2, False) == (0, 3)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, "8", True, None])
def test_bad_bits_raise_value_error(bits):
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        Q.quantize_tensor(torch.randn(4, 8), bits=bits)


def test_seed_example_by_hand_symmetric_and_integer_zero_point():
    # seed 001 Sec. 4.1.1: x = 0.75, s = 0.25 -> 3
    assert Q.quantize(torch.tensor(0.75), 0.25, 0, 8, True).item() == 3
    # asymmetric, integer zero point: range [-1, 2] on 2 bits: s = 3/3 = 1, z = 0 - round(-1) = 1
    s, z = Q.scale_zero_point(torch.tensor(-1.0), torch.tensor(2.0), bits=2, symmetric=False)
    assert s.item() == pytest.approx(1.0) and z.item() == 1 and z.dtype == torch.int32
    q = Q.quantize(torch.tensor([-1.0, 0.0, 2.0, 5.0]), s, z, 2, False)
    assert q.tolist() == [0, 1, 3, 3]  # 5.0 is clipped to q_max
    assert Q.dequantize(q, s, z).tolist() == [-1.0, 0.0, 2.0, 2.0]


def test_real_zero_is_exact_in_asymmetric_quantization():
    x = torch.rand(50, 30) * 3 + 0.5  # all positive: the range is widened to contain 0
    x[0, 0] = 0.0
    qt = Q.quantize_tensor(x, bits=8, symmetric=False, granularity="tensor")
    assert qt.dequantize()[0, 0].item() == 0.0
    x = torch.randn(50, 30)
    x[3, 3] = 0.0
    for gran in Q.GRANULARITIES:
        assert Q.fake_quantize(x, 4, False, gran, 10)[3, 3].item() == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", Q.GRANULARITIES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rounding_error_is_at_most_half_a_step(symmetric, granularity, bits):
    x = torch.randn(12, 48) * torch.rand(12, 1) * 5
    qt = Q.quantize_tensor(x, bits, symmetric, granularity, group_size=16)
    rows = Q._rows_view(x, granularity, 16)
    err = (qt.dequantize().reshape(rows.shape) - rows).abs()
    assert (err <= qt.scale / 2 * (1 + 1e-5) + 1e-7).all()
    qmin, qmax = Q.qrange(bits, symmetric)
    assert int(qt.q.min()) >= qmin and int(qt.q.max()) <= qmax


def test_clipping_error_exceeds_rounding_bound():
    x = torch.linspace(-1, 1, 101)
    e = Q.quantization_error(x, bits=8, granularity="tensor", clip_ratio=0.5)
    assert e["clipped_fraction"] == pytest.approx(48 / 101, abs=0.02)
    assert e["max_abs_error"] == pytest.approx(0.5, abs=1e-6)  # 1.0 clipped to 0.5
    assert e["max_abs_error"] > e["rounding_bound"]


@pytest.mark.parametrize("x", [torch.zeros(6, 8), torch.full((6, 8), 3.5),
                               torch.full((6, 8), -2.0)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_and_constant_tensors(x, symmetric):
    for gran in Q.GRANULARITIES:
        out = Q.fake_quantize(x, 8, symmetric, gran, 4)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, x, atol=1e-6)


def test_more_bits_and_finer_granularity_reduce_error():
    w = torch.randn(64, 128)
    w[5, 7] = 40.0  # one outlier ruins the per-tensor scale
    err = {g: Q.quantization_error(w, bits=4, granularity=g, group_size=32)["mse"]
           for g in Q.GRANULARITIES}
    assert err["group"] < err["channel"] < err["tensor"]
    mse = [Q.quantization_error(w, bits=b, granularity="channel")["mse"] for b in (2, 4, 6, 8)]
    assert mse == sorted(mse, reverse=True)


def test_group_size_must_divide_and_granularity_must_be_known():
    with pytest.raises(ValueError, match="group_size=5 must divide"):
        Q.quantize_tensor(torch.randn(4, 12), granularity="group", group_size=5)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        Q.quantize_tensor(torch.randn(4, 12), granularity="group", group_size=None)
    with pytest.raises(ValueError, match="granularity must be one of"):
        Q.quantize_tensor(torch.randn(4, 12), granularity="row")
    with pytest.raises(ValueError, match="clip_ratio"):
        Q.quantize_tensor(torch.randn(4, 12), clip_ratio=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        Q.quantize_tensor(torch.ones(4, 4, dtype=torch.int64))


def test_odd_group_size_works():
    x = torch.randn(3, 21)
    out = Q.fake_quantize(x, 8, False, "group", 7)
    assert out.shape == x.shape and (out - x).abs().max() < 0.05


def test_dynamically_quantize_per_channel_matches_gpt_fast_contract():
    w = torch.randn(16, 32)
    q, scales, zeros = Q.dynamically_quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (16,)
    assert (zeros == 0).all()
    assert torch.allclose(scales, w.abs().amax(1) / 127)
    assert (q.float() * scales[:, None] - w).abs().max() <= scales.max() / 2 + 1e-6


# --------------------------------------------------------------------------- integer GEMM

def test_int8_gemm_cross_terms_equal_the_float_product_of_dequantized_operands():
    a = torch.randn(20, 64) * 2 + 1.5  # activations with an offset: asymmetric
    b = torch.randn(64, 24)
    aq = Q.quantize_tensor(a, 8, False, "tensor")
    bq = Q.quantize_tensor(b.T.contiguous(), 8, False, "channel")  # per output column
    a_q, b_q = aq.q.reshape(a.shape), bq.q.reshape(24, 64).T
    y = Q.int8_gemm(a_q, aq.scale, aq.zero_point, b_q, bq.scale.T, bq.zero_point.T)
    reference = aq.dequantize() @ bq.dequantize().T
    assert torch.allclose(y, reference, rtol=1e-5, atol=1e-4)
    assert (y - a @ b).abs().max() < 0.05 * (a @ b).abs().max()
    terms = Q.int8_gemm_terms(a_q, aq.zero_point, b_q, bq.zero_point.T)
    assert all(t.dtype == torch.int32 for t in terms.values())
    # leaving out a cross term is badly wrong: the zero points matter
    wrong = aq.scale * bq.scale.T * (terms["A_q B_q"] + terms["K z_a z_b"]).float()
    assert (wrong - reference).abs().max() > 10 * (y - reference).abs().max() + 1


def test_int8_gemm_symmetric_uses_int_mm_and_is_exact():
    a = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 16), dtype=torch.int8)
    y = Q.int8_gemm(a, 1.0, 0, b, 1.0, 0)
    assert torch.equal(y, (a.long() @ b.long()).float())


def test_int8_gemm_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="a_q must be"):
        Q.int8_gemm_terms(torch.zeros(3, 4, dtype=torch.int8), 0,
                          torch.zeros(5, 2, dtype=torch.int8), 0)
    with pytest.raises(TypeError, match="int8 or uint8"):
        Q.int8_gemm_terms(torch.zeros(3, 4), 0, torch.zeros(4, 2, dtype=torch.int8), 0)


def test_requantize_roundtrip():
    y = torch.linspace(-3, 5, 33)
    s, z = Q.scale_zero_point(y.min(), y.max(), 8, False)
    assert (Q.dequantize(Q.requantize(y, s, z), s, z) - y).abs().max() <= s / 2 + 1e-6


# --------------------------------------------------------------------------- calibration

def test_mse_optimal_clip_clips_a_heavy_tail_and_beats_minmax():
    x = torch.randn(20000)
    x[:5] = torch.tensor([40.0, -35.0, 30.0, 25.0, -28.0])
    ratio, mse = Q.mse_optimal_clip(x, bits=4)
    assert ratio < 0.5
    minmax_mse = Q.quantization_error(x, bits=4, granularity="tensor")["mse"]
    assert mse < minmax_mse
    # a uniform tensor has nothing to clip at 8 bits
    ratio, _ = Q.mse_optimal_clip(torch.linspace(-1, 1, 1001), bits=8)
    assert ratio == pytest.approx(1.0)


def test_calibrate_range_methods():
    x = torch.randn(10000)
    x[0] = 100.0
    lo, hi = Q.calibrate_range(x, "minmax")
    assert hi == 100.0 and lo == x.min().item()
    lo_p, hi_p = Q.calibrate_range(x, "percentile", percentile=99.9)
    assert hi_p < 10 and lo_p > -10
    assert Q.calibrate_range(x, "mse", bits=8)[1] < 100.0
    with pytest.raises(ValueError, match="method must be one of"):
        Q.calibrate_range(x, "entropy")
    with pytest.raises(ValueError, match="percentile must lie"):
        Q.calibrate_range(x, "percentile", percentile=20)


def test_static_vs_dynamic_activation_quantizer():
    static = Q.StaticActivationQuantizer(bits=8)
    with pytest.raises(ValueError, match="freeze"):
        static(torch.randn(4))
    for _ in range(3):
        static.observe(torch.randn(256))
    lo, hi = static.freeze("minmax")
    big = torch.randn(256) * 10  # out of the calibrated range: clipped by the static range
    step = (hi - lo) / 255  # the grid's top may sit up to one step above hi (integer zero point)
    assert static(big).max().item() <= hi + step
    assert static(big).min().item() >= lo - step
    dynamic = Q.StaticActivationQuantizer(bits=8, dynamic=True)
    assert (dynamic(big) - big).abs().max() < (static(big) - big).abs().max()


# --------------------------------------------------------------------------- int4 packing

@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_int4_roundtrip(signed):
    lo, hi = (-8, 7) if signed else (0, 15)
    q = torch.randint(lo, hi + 1, (5, 6, 10), dtype=torch.int8)
    packed = Q.pack_int4(q, signed=signed)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6, 5)
    assert torch.equal(Q.unpack_int4(packed, signed=signed), q)


def test_pack_int4_layout_low_nibble_first():
    assert Q.pack_int4(torch.tensor([1, 2], dtype=torch.int8)).item() == 0x21
    assert Q.pack_int4(torch.tensor([-1, 0], dtype=torch.int8)).item() == 0x0F


def test_pack_int4_errors():
    with pytest.raises(ValueError, match="even"):
        Q.pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        Q.pack_int4(torch.tensor([8, 0], dtype=torch.int8))
    with pytest.raises(TypeError, match="integer tensor"):
        Q.pack_int4(torch.zeros(2))
    with pytest.raises(TypeError, match="uint8"):
        Q.unpack_int4(torch.zeros(2, dtype=torch.int8))


# --------------------------------------------------------------------------- NF4, LLM.int8

def test_nf4_code_properties():
    code = Q.nf4_code()
    assert code.shape == (16,) and code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1
    assert (code.diff() > 0).all()
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8
    # QLoRA Appendix E lists the values; a few of them:
    for value in (-0.6961928, -0.0910500, 0.0795803, 0.7229568):
        assert (code - value).abs().min() < 1e-6


@pytest.mark.skipif(not has_package("bitsandbytes"), reason="bitsandbytes not installed")
def test_nf4_matches_bitsandbytes():
    import bitsandbytes.functional as bnbF

    assert torch.allclose(Q.nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"), atol=1e-6)
    w = torch.randn(64, 128)
    packed, absmax = Q.quantize_nf4(w, 64)
    ours = Q.dequantize_nf4(packed, absmax, w.shape)
    assert torch.allclose(ours, Q.bnb_nf4_roundtrip(w, 64), atol=1e-5)


def test_nf4_bits_and_double_quantization():
    assert Q.nf4_bits_per_parameter(64) == 4.5
    assert Q.nf4_bits_per_parameter(64, True) == pytest.approx(4.127, abs=1e-3)
    absmax = torch.rand(1000) + 0.5
    q, scales, mean = Q.double_quantize(absmax, 256)
    assert q.dtype == torch.int8 and scales.shape == (4,)
    restored = Q.double_dequantize(q, scales, mean, 1000)
    assert (restored - absmax).abs().max() < 0.01
    err = Q.reconstruction_error_nf4_vs_int4(torch.randn(128, 256))
    assert err["nf4"] < err["int4_symmetric"]  # 16 normal-quantile levels vs 15 uniform ones
    assert err["nf4_double_quant"] < 1.05 * err["nf4"]
    with pytest.raises(ValueError, match="group_size=64 must divide"):
        Q.quantize_nf4(torch.randn(10, 10), 64)


def test_llm_int8_decomposition_handles_outlier_features():
    x = torch.randn(16, 128)
    x[:, [3, 77]] = 25.0  # two outlier feature dimensions
    w = torch.randn(32, 128) / 10
    out, cols = Q.llm_int8_matmul(x, w, threshold=6.0)
    plain, none = Q.llm_int8_matmul(x, w, threshold=0.0)
    ref = x @ w.T
    assert cols.tolist() == [3, 77] and none.numel() == 0
    assert (out - ref).abs().max() < 0.3 * (plain - ref).abs().max()
    with pytest.raises(ValueError, match="threshold"):
        Q.llm_int8_matmul(x, w, threshold=-1)


@pytest.mark.skipif(not has_package("bitsandbytes"), reason="bitsandbytes not installed")
def test_bitsandbytes_linear8bit_with_threshold_agrees_with_ours():
    lin = nn.Linear(128, 32)
    x = torch.randn(8, 128)
    x[:, 5] = 20.0
    with torch.no_grad():
        ref = lin(x)
        ours, _ = Q.llm_int8_matmul(x, lin.weight, 6.0)
        ours = ours + lin.bias
        bnb_out = Q.bnb_linear8bit(lin, 6.0)(x).float()
    scale = ref.abs().max()
    assert (bnb_out - ref).abs().max() < 0.02 * scale
    assert (ours - ref).abs().max() < 0.02 * scale


# --------------------------------------------------------------------------- weight-only models

class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.lm_head = nn.Linear(64, 10, bias=False)

    def forward(self, input_ids=None, x=None):
        return self.lm_head(self.down(torch.relu(self.up(x))))


def test_weight_only_int8_handler_shrinks_bytes_and_stays_close():
    model = TinyMLP()
    x = torch.randn(4, 64)
    q = Q.quantize_copy(model, Q.WeightOnlyInt8QuantHandler)
    assert isinstance(q.up, Q.WeightOnlyInt8Linear) and isinstance(q.lm_head, nn.Linear)
    assert q.up.weight.dtype == torch.int8
    with torch.no_grad():
        assert torch.allclose(q(x=x), model(x=x), atol=0.02)
    fp = Q.linear_weight_bytes(model)
    assert Q.linear_weight_bytes(q) < 0.3 * fp + model.lm_head.weight.nbytes


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_groupwise_handler_packs_4bit_and_dequantizes_like_fake_quantize(bits):
    model = TinyMLP()
    q = Q.quantize_copy(model, Q.WeightOnlyGroupwiseQuantHandler, bits, 32)
    layer = q.up
    assert isinstance(layer, Q.WeightOnlyGroupwiseLinear)
    assert layer.weight.shape == ((128, 32) if bits == 4 else (128, 64))
    expected = Q.fake_quantize(model.up.weight.detach(), bits, False, "group", 32)
    assert torch.allclose(layer.dequantized_weight(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="group_size=48 must divide"):
        Q.WeightOnlyGroupwiseLinear(64, 8, 4, 48)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    k, n = 64, 48
    mixing = torch.randn(k, k) / math.sqrt(k)
    x = torch.randn(4096, k) @ mixing + 0.3 * torch.randn(4096, k)  # correlated features
    w = torch.randn(n, k)
    h = 2 * x.T @ x / x.shape[0]
    for bits in (3, 4):
        q, s, z = Q.gptq_quantize_weight(w, h, bits=bits, group_size=32, block_size=16)
        w_gptq = (s.repeat_interleave(32, 1) * (q.float() - z.repeat_interleave(32, 1)))
        w_rtn = Q.fake_quantize(w, bits, False, "group", 32)
        out_err = lambda wq: ((x @ (wq - w).T) ** 2).mean().item()  # noqa: E731
        assert out_err(w_gptq) < 0.8 * out_err(w_rtn)
        assert int(q.max()) <= 2 ** bits - 1


def test_gptq_dead_inputs_get_zero_weights():
    model = TinyMLP()
    h = torch.eye(64)
    h[3, 3] = 0  # a dead input: its weights become 0
    q, s, z = Q.gptq_quantize_weight(model.up.weight, h, bits=4, group_size=64)
    deq = s * (q.float() - z)
    assert deq[:, 3].abs().max() == 0


def test_gptq_handler_quantizes_every_target_layer_with_the_hessians_it_is_given():
    """The handler stores what gptq_quantize_weight computes for each layer, in RTN's runtime
    modules, and leaves lm_head alone; on correlated inputs it beats RTN on the layer output."""
    torch.manual_seed(0)
    model = TinyMLP()
    mix = torch.randn(64, 64) / 8 + torch.eye(64)
    x = torch.randn(512, 64) @ mix  # correlated inputs: where GPTQ's error feedback helps
    hidden = torch.relu(model.up(x)).detach()
    hessians = {"up": 2 * x.T @ x / len(x), "down": 2 * hidden.T @ hidden / len(hidden)}
    gptq = Q.quantize_copy(model, Q.GPTQQuantHandler, hessians=hessians, bits=4, group_size=32)
    rtn = Q.quantize_copy(model, Q.WeightOnlyGroupwiseQuantHandler, bits=4, group_size=32)
    assert isinstance(gptq.up, Q.WeightOnlyGroupwiseLinear) and type(gptq.lm_head) is nn.Linear
    q, s, z = Q.gptq_quantize_weight(model.up.weight, hessians["up"], bits=4, group_size=32)
    s, z = s.repeat_interleave(32, dim=1), z.repeat_interleave(32, dim=1)  # (out, groups) -> (out, in)
    torch.testing.assert_close(gptq.up.dequantized_weight(), s * (q.float() - z))
    with torch.no_grad():
        ref = model.up(x)
        err_gptq = (gptq.up(x) - ref).pow(2).mean()
        err_rtn = (rtn.up(x) - ref).pow(2).mean()
    assert err_gptq < err_rtn
    with pytest.raises(ValueError, match="calibration_ids"):
        Q.GPTQQuantHandler(model)


def test_collect_hessians_equals_2_xtx_over_n_for_every_layer(small_model):
    model, _, ids = small_model
    calib = ids[:512].view(2, 256)
    hessians = Q.collect_hessians(model, calib)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        layer, xs = model.get_submodule(name), []
        hook = layer.register_forward_hook(
            lambda m, i, o: xs.append(i[0].reshape(-1, m.in_features)))
        with torch.no_grad():
            model(input_ids=calib)
        hook.remove()
        x = torch.cat(xs).double()
        assert torch.allclose(hessians[name].double(), 2 * x.T @ x / x.shape[0], rtol=1e-4,
                              atol=1e-5)


def test_collect_hessians_rejects_1d_ids():
    with pytest.raises(ValueError, match="calibration_ids"):
        Q.collect_hessians(TinyMLP(), torch.zeros(10, dtype=torch.long))


# --------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def small_model(small_lm):
    return small_lm


def test_weight_only_int8_on_course_model_keeps_perplexity(small_model):
    model, _, ids = small_model
    q = Q.quantize_copy(model, Q.WeightOnlyInt8QuantHandler)
    base = Q.lm_quality(model, model, ids, max_tokens=2048)
    quality = Q.lm_quality(model, q, ids, max_tokens=2048)
    assert quality["perplexity"] < 1.01 * base["perplexity"]
    assert quality["top1_agreement"] > 0.97


def test_quantized_kv_cache_memory_and_quality(small_model):
    from transformers import DynamicCache

    model, _, ids = small_model
    batch = ids[:1024].view(4, 256)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        ref = model(input_ids=batch).logits
        dense = DynamicCache(config=model.config)
        model(input_ids=batch, **cache_argument(dense), use_cache=True)
        stored = {}
        for bits in (8, 4):
            cache = Q.make_quantized_kv_cache(layers, bits)
            out = model(input_ids=batch, **cache_argument(cache), use_cache=True).logits
            stored[bits] = Q.kv_cache_stored_bytes(cache)
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            assert agree > (0.98 if bits == 8 else 0.85)
    from utils.roofline import kv_cache_bytes

    head_dim = model.config.hidden_size // model.config.num_attention_heads
    fp32 = kv_cache_bytes(layers, model.config.num_key_value_heads, head_dim, 256, 4, 4)
    assert Q.kv_cache_stored_bytes(dense) == fp32
    per_row = 2 + 1  # fp16 scale + uint8 zero point per token and head
    assert stored[8] == fp32 / 4 * (1 + per_row / head_dim)
    assert stored[4] == fp32 / 8 * (1 + 2 * per_row / head_dim)


def test_quantized_kv_cache_generates_like_float(small_model):
    from utils.models import generate_text

    model, tok, _ = small_model
    ids = tok("And God said,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        b = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                           **cache_argument(Q.make_quantized_kv_cache(
                               model.config.num_hidden_layers, 8)))
    assert torch.equal(a, b)  # greedy tokens unchanged by an int8 cache
    text = generate_text(model, tok, "And God said,", 8)
    assert text.startswith("And God said,") and text == tok.decode(a[0], skip_special_tokens=True)


def test_dynamic_int8_minilm_size_and_cosine():
    from utils.data import sample_sentences
    from utils.metrics import cosine_similarity
    from utils.models import embed_sentences, load_minilm

    model, tok = load_minilm()
    sentences = sample_sentences(16)
    reference = embed_sentences(model, tok, sentences)
    # Both activation ranges, whatever this CPU would pick by default: 7-bit activations (the
    # default without VNNI) measured 0.975 on an AVX2 EPYC, 8-bit 0.992 (AVX2) and 0.993 (VNNI).
    for reduce_range, bound in ((True, 0.96), (False, 0.985)):
        q = Q.quantize_dynamic_int8(model, reduce_range=reduce_range)
        assert Q.linear_weight_bytes(model) / Q.linear_weight_bytes(q) > 3.5
        cos = cosine_similarity(reference, embed_sentences(q, tok, sentences))
        assert cos.mean() > bound, (reduce_range, cos.mean())
    assert model.encoder.layer[0].output.dense.__class__ is nn.Linear  # the original is intact


def test_number_formats_table():
    rows = {r["format"]: r for r in Q.number_formats()}
    assert rows["bf16"]["step_near_1"] == 2 ** -7 and rows["fp16"]["max"] == 65504.0
    assert rows["int8"]["bytes"] == 1 and rows["nf4 (x absmax)"]["levels"] == "16"


# -------------------------------------------------------------- fused kernels, SmoothQuant, AWQ, FP8, KIVI

def test_groupwise_bits_per_weight_matches_stored_bytes():
    assert Q.groupwise_bits_per_weight(4, 32) == 4 + 40 / 32 == 5.25
    model = TinyMLP()
    q = Q.quantize_copy(model, Q.WeightOnlyGroupwiseQuantHandler, 4, 32)
    stored = q.up.weight.nbytes + q.up.scales.nbytes + q.up.zeros.nbytes  # counted by hand
    assert stored * 8 / q.up.weight.numel() / 2 == Q.groupwise_bits_per_weight(4, 32)
    with pytest.raises(ValueError, match="group_size must be"):
        Q.groupwise_bits_per_weight(4, 0)


@pytest.mark.parametrize("compute_dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_kernels_agree_with_the_readable_dequantize_path(compute_dtype, tol):
    lin = nn.Linear(256, 96, bias=True)
    x = torch.randn(3, 5, 256)
    readable8 = Q.quantize_copy(nn.Sequential(lin), Q.WeightOnlyInt8QuantHandler, skip=())[0]
    readable4 = Q.quantize_copy(nn.Sequential(lin), Q.WeightOnlyGroupwiseQuantHandler, 4, 32,
                                skip=())[0]
    fused8 = Q.FusedInt8Linear.from_readable(readable8, compute_dtype)
    fused4 = Q.FusedInt4Linear.from_readable(readable4, compute_dtype)
    with torch.no_grad():
        for readable, fused in ((readable8, fused8), (readable4, fused4)):
            ref = x @ readable.dequantized_weight().T + lin.bias if hasattr(
                readable, "dequantized_weight") else readable(x)
            got = fused(x)
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert ((got - ref).abs().max() / ref.abs().max()).item() < tol
    assert fused8.weight.data_ptr() == readable8.weight.data_ptr()  # int8 buffers shared


def test_fused_weight_only_copy_shares_floats_and_counts_bytes():
    model = TinyMLP()
    model.lm_head = nn.Linear(64, 16, bias=False)  # torch's int4 packing needs N % 16 == 0
    f8 = Q.fused_weight_only_copy(model, 8)
    f4 = Q.fused_weight_only_copy(model, 4, 32)
    assert isinstance(f8.lm_head, Q.FusedInt8Linear) and isinstance(f4.up, Q.FusedInt4Linear)
    assert type(model.up) is nn.Linear  # the original is intact
    n = sum(m.weight.numel() for m in (model.up, model.down, model.lm_head))
    rows = sum(m.out_features for m in (model.up, model.down, model.lm_head))
    with pytest.raises(ValueError, match="multiple of 16"):
        Q.FusedInt4Linear.from_linear(nn.Linear(64, 10), 32)
    assert Q.linear_weight_bytes(f8) == n + 2 * rows  # int8 + one bf16 scale per row
    assert Q.linear_weight_bytes(f4) == n / 2 + n / 32 * 2 * 2  # nibbles + bf16 (scale, offset)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        Q.fused_weight_only_copy(model, 3)


def test_smoothquant_scales_by_hand_and_the_product_is_unchanged():
    w = torch.tensor([[1.0, -4.0, 0.5], [-2.0, 1.0, 0.25]])
    act = torch.tensor([8.0, 1.0, 0.5])
    s = Q.smoothquant_scales(act, w, alpha=0.5)
    expected = [math.sqrt(8.0) / math.sqrt(2.0), math.sqrt(1.0) / math.sqrt(4.0),
                math.sqrt(0.5) / math.sqrt(0.5)]
    assert s.tolist() == pytest.approx(expected, rel=1e-6)
    s75 = Q.smoothquant_scales(act, w, alpha=0.75)
    assert s75[0].item() == pytest.approx(8.0 ** 0.75 / 2.0 ** 0.25, rel=1e-6)
    x = torch.randn(7, 3) * act
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T)
    # after smoothing, channel j's activation max and weight max are balanced (alpha = 0.5)
    assert torch.allclose(act / s, w.abs().amax(0) * s, rtol=1e-5)
    with pytest.raises(ValueError, match="alpha must lie in"):
        Q.smoothquant_scales(act, w, alpha=1.5)
    with pytest.raises(ValueError, match="act_absmax must be"):
        Q.smoothquant_scales(act[:2], w)


def test_smoothquant_helps_w8a8_on_an_outlier_channel():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(256, 64)
    x[:, 5] *= 60  # one systematic outlier channel, as in LLM activations
    absmax = x.abs().amax(0)
    ref = lin(x).detach()
    err = lambda m: (m(x) - ref).pow(2).mean().item()  # noqa: E731
    with torch.no_grad():
        assert err(Q.W8A8Linear(lin, Q.smoothquant_scales(absmax, lin.weight, 0.5))) < \
            0.5 * err(Q.W8A8Linear(lin))


def test_awq_loss_equals_the_output_error_and_search_beats_rtn():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = torch.randn(512, 64) * (torch.rand(64) * 4 + 0.1)  # channels of unequal magnitude
    h = 2 * x.T @ x / x.shape[0]
    s, alpha, losses = Q.awq_search_scale(w, x.abs().mean(0), h, bits=3, group_size=32, grid=10)
    assert len(losses) == 11 and 0 <= alpha <= 1 and min(losses) == losses[round(alpha * 10)]
    w_rtn = Q.fake_quantize(w, 3, False, "group", 32)
    out_err = 2 * ((x @ (w_rtn - w).T) ** 2).sum().item() / x.shape[0] / w.shape[0]
    assert losses[0] == pytest.approx(out_err, rel=1e-4)  # alpha = 0 is RTN
    w_awq = Q.fake_quantize(w * s, 3, False, "group", 32) / s
    assert ((x @ (w_awq - w).T) ** 2).mean() <= ((x @ (w_rtn - w).T) ** 2).mean()


def _e2m1_grid():
    """Every FP4 E2M1 value from its bits (1 sign, 2 exponent with bias 1, 1 mantissa)."""
    values = set()
    for sign in (1, -1):
        for e in range(4):
            for m in range(2):
                v = (m / 2) if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
                values.add(sign * v)
    return sorted(values)


def test_mxfp4_against_a_brute_force_nearest_e2m1_with_power_of_two_block_scales():
    grid = torch.tensor(_e2m1_grid())
    assert grid.abs().unique().tolist() == list(Q.FP4_E2M1_VALUES)
    x = torch.randn(4, 64) * torch.tensor([1e-3, 1.0, 30.0, 1.0])[:, None]
    got = Q.mxfp4_quantize(x)
    for block, out in zip(x.reshape(-1, 32), got.reshape(-1, 32)):
        _, e = torch.frexp(block.abs().max())  # max = m 2^e, m in [0.5, 1): floor(log2) = e - 1
        scale = 2.0 ** (int(e) - 1 - 2)
        v = (block / scale).clamp(-6, 6)
        nearest = grid[(v[:, None] - grid[None]).abs().argmin(1)]
        torch.testing.assert_close(out, nearest * scale)
    # one block by hand: max 7.5 -> floor(log2 7.5) = 2, X = 2^0, 7.5 saturates to 6
    block = torch.tensor([7.5, 0.25, 0.75, -1.25, 2.5, 5.0, -0.2, 0.0] + [0.0] * 24)
    assert Q.mxfp4_quantize(block)[:8].tolist() == [6.0, 0.0, 1.0, -1.0, 2.0, 4.0, -0.0, 0.0]
    assert Q.mxfp4_quantize(torch.zeros(32)).abs().sum() == 0
    assert Q.mxfp4_bits_per_weight() == 4.25
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.mxfp4_quantize(torch.randn(3, 20))


def _e4m3_grid():
    values = set()
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # the NaN code of E4M3 "fn": no infinities, max 448
            v = (m / 8) * 2.0 ** -6 if e == 0 else 2.0 ** (e - 7) * (1 + m / 8)
            values.update((v, -v))
    return torch.tensor(sorted(values))


def test_fp8_e4m3_matches_the_grid_built_from_its_bits():
    grid = _e4m3_grid()
    assert grid.max().item() == 448.0
    w = torch.randn(8, 40)
    got = Q.fp8_fake_quantize(w, "e4m3", "channel")
    scale = w.abs().amax(1, keepdim=True) / 448
    v = w / scale
    nearest = grid[(v.reshape(-1, 1) - grid[None]).abs().argmin(1)].reshape(w.shape)
    torch.testing.assert_close(got, nearest * scale)
    e5 = Q.fp8_fake_quantize(w, "e5m2")
    assert (e5 - w).pow(2).mean() > (got - w).pow(2).mean()  # 2 mantissa bits vs 3
    with pytest.raises(ValueError, match="fmt must be one of"):
        Q.fp8_fake_quantize(w, "e3m4")


def test_kivi_keys_per_channel_values_per_token_by_hand():
    torch.manual_seed(0)
    k = torch.randn(1, 2, 64, 8) * torch.tensor([1, 1, 1, 20.0, 1, 1, 1, 1])  # outlier channel
    v = torch.randn(1, 2, 64, 8)
    kq, vq = Q.kivi_fake_quantize(k, v, bits=4, group=32)
    for t0 in (0, 32):  # keys: min-max over the 32 tokens of each channel, asymmetric 4-bit
        blk = k[..., t0:t0 + 32, :]
        lo, hi = blk.amin(-2, keepdim=True).clamp(max=0), blk.amax(-2, keepdim=True).clamp(min=0)
        s = ((hi - lo) / 15).half().float()
        z = torch.clamp(-torch.round(lo / s), 0, 15)
        ref = s * (torch.clamp(torch.round(blk / s) + z, 0, 15) - z)
        torch.testing.assert_close(kq[..., t0:t0 + 32, :], ref)
    lo, hi = v.amin(-1, keepdim=True).clamp(max=0), v.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 15).half().float()
    z = torch.clamp(-torch.round(lo / s), 0, 15)
    torch.testing.assert_close(vq, s * (torch.clamp(torch.round(v / s) + z, 0, 15) - z))
    per_token = Q.kivi_fake_quantize(k.transpose(-1, -2), v, 4, 8)[0]  # sanity of the shape
    assert per_token.shape == k.transpose(-1, -2).shape
    # with an outlier channel, per-token keys (over head_dim) crush every other channel
    layer = Q._QuantizedKVLayerImpl(4)
    layer.dtype = k.dtype
    tok = layer._dequantize(layer._quantize(k))
    normal = torch.arange(8) != 3
    assert (kq - k)[..., normal].pow(2).mean() < 0.1 * (tok - k)[..., normal].pow(2).mean()


def test_kivi_cache_streams_like_the_batch_version_and_keeps_a_float_residual():
    cls = Q.KIVILayer
    layer = cls(4, 8)
    k, v = torch.randn(1, 2, 21, 16), torch.randn(1, 2, 21, 16)
    out_k = None
    for t in range(21):  # decode: one token at a time
        out_k, out_v = layer.update(k[..., t:t + 1, :], v[..., t:t + 1, :])
    ref_k, ref_v = Q.kivi_fake_quantize(k, v, 4, 8)
    torch.testing.assert_close(out_k, ref_k)
    torch.testing.assert_close(out_v, ref_v)
    assert torch.equal(out_k[..., 16:, :], k[..., 16:, :])  # 5 residual tokens stay float
    with pytest.raises(ValueError, match="method must be one of"):
        Q.make_quantized_kv_cache(2, 4, method="per-head")


def test_dynamic_int8_skip_keeps_the_output_head_float():
    model = TinyMLP()
    q = Q.quantize_dynamic_int8(model, skip=("lm_head",))
    assert type(q.lm_head) is nn.Linear and type(q.up) is not nn.Linear
    assert Q.linear_weight_bytes(q, skip=("lm_head",)) < 0.3 * Q.linear_weight_bytes(
        model, skip=("lm_head",))


def test_format_error_table_orders_the_formats():
    w = torch.randn(64, 256)
    row = Q.format_error_table({"w": w}, 64)[0]
    assert row["int8"] < row["fp8_e4m3"] < row["fp8_e5m2"] < row["int4_g64"]
    assert row["nf4_b64"] < row["int4_g64"] * 1.5 and row["mxfp4"] < 0.05
    bpw = Q.format_bits_per_weight(256, 64)
    assert bpw["mxfp4"] == 4.25 and bpw["int4_g64"] == 4 + 40 / 64 and bpw["nf4_b64"] == 4.5
