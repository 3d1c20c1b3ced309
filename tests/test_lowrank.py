"""Chapter 05: truncated SVD and Eckart-Young, the break-even rank, activation-aware
factorizations (SVD-LLM's whitening is optimal for the output error), attention FLOPs and cache
formulas, KV-head pooling (MHA -> GQA -> MQA), latent attention's absorbed projections, LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from utils import lowrank as L
from utils.models import calibration_tokens
from utils.roofline import kv_cache_bytes, measure_kv_cache


def _correlated_inputs(rng, tokens=512, n=24):
    mix = torch.randn(n, n, generator=rng) * torch.logspace(0, -2, n)  # very unequal channels
    return (torch.randn(tokens, n, generator=rng) @ mix).double()


# --------------------------------------------------------------------------- SVD


def test_truncated_svd_error_is_the_spectrum_tail_and_beats_other_rank_r_matrices(rng):
    w = torch.randn(40, 30, generator=rng, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in (1, 5, 29, 30):
        a, b = L.truncated_svd(w, r)
        assert a.shape == (40, r) and b.shape == (r, 30)
        assert torch.linalg.matrix_rank(a @ b) == r
        assert (w - a @ b).norm().item() == pytest.approx(L.tail_error(s, r), abs=1e-9)
    a, b = L.truncated_svd(w, 5)
    for _ in range(5):  # any other rank-5 matrix is further away
        other = torch.randn(40, 5, generator=rng, dtype=torch.float64) @ torch.randn(
            5, 30, generator=rng, dtype=torch.float64)
        assert (w - other).norm() > (w - a @ b).norm()
    with pytest.raises(ValueError, match="rank must be at most min\\(m, n\\) = 30"):
        L.truncated_svd(w, 31)


def test_smallest_rank_for_error_matches_a_brute_force_search(rng):
    s = torch.linalg.svdvals(torch.randn(20, 16, generator=rng))
    total = s.pow(2).sum().sqrt().item()
    for budget in (0.0, 0.05, 0.3, 0.6, 0.99):
        r = L.smallest_rank_for_error(s, budget)
        assert L.tail_error(s, r) / total <= budget + 1e-9
        assert r == 0 or L.tail_error(s, r - 1) / total > budget
    with pytest.raises(ValueError, match="relative_error must be a number in \\[0, 1\\)"):
        L.smallest_rank_for_error(s, 1.5)
    with pytest.raises(ValueError, match="must not all be zero"):
        L.smallest_rank_for_error(torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="rank must be an integer in 0..16"):
        L.tail_error(s, -1)


def test_break_even_rank_is_the_last_rank_that_saves_parameters():
    for m, n in ((4, 4), (1024, 384), (384, 384), (7, 3)):
        r = L.break_even_rank(m, n)
        assert L.lowrank_params(m, n, r) < m * n <= L.lowrank_params(m, n, r + 1)
    assert L.break_even_rank(4, 4) == 1  # 2 (4 + 4) = 16: rank 2 saves nothing
    assert L.break_even_rank(10**9, 10**9) == 10**9 // 2 - 1  # exact for any size
    assert L.rank_for_reduction(384, 1024, 0.2) == 223
    assert L.lowrank_params(384, 1024, 223) <= 0.8 * 384 * 1024
    with pytest.raises(ValueError, match="reduction must be a number in \\[0, 1\\)"):
        L.rank_for_reduction(4, 4, 1.0)


# --------------------------------------------------------------------------- activation-aware


def test_svd_llm_minimises_the_output_error_and_full_rank_is_exact(rng):
    x = _correlated_inputs(rng)
    linear = nn.Linear(24, 16).double()
    hessian = 2 * x.T @ x / len(x)
    absmean = x.abs().mean(0)
    errs = {}
    for method in L.METHODS:
        f = L.factor_linear(linear, 6, method, hessian=hessian, absmean=absmean)
        approx = f.up.weight @ f.down.weight
        errs[method] = L.output_error(linear.weight, approx, x)
        x_in = x[:5]
        assert torch.allclose(f(x_in), x_in @ approx.T + linear.bias, atol=1e-9)
    assert errs["svd-llm"] < errs["asvd"] < errs["svd"]
    # SVD-LLM's truncation is the optimum of ||(W - W') X^T|| over rank 6: a random rank-6 W' or
    # the plain SVD cannot beat it
    full = L.factor_linear(linear, 16, "svd-llm", hessian=hessian)
    assert torch.allclose(full.up.weight @ full.down.weight, linear.weight, atol=1e-6)


def test_factor_linear_needs_its_statistics_and_a_known_method():
    linear = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="needs absmean"):
        L.factor_linear(linear, 2, "asvd")
    with pytest.raises(ValueError, match="needs hessian"):
        L.factor_linear(linear, 2, "svd-llm")
    with pytest.raises(ValueError, match="method must be one of"):
        L.factor_linear(linear, 2, "pca")


def test_compress_model_meets_the_budget_and_svd_llm_keeps_more_quality(small_lm):
    model, tok, val = small_lm
    # 1,024 calibration tokens: more than the widest input (512), or the whitening overfits
    calib = calibration_tokens(tok, sequences=8, seq_len=128)
    dense = L.linear_params(model)
    batch = val[:256].view(2, 128)
    with torch.no_grad():
        ref = model(input_ids=batch).logits
    errors = {}
    for method in L.METHODS:
        c = L.compress_model(model, 0.4, method, calib)
        assert L.linear_params(c) <= 0.6 * dense + 1
        with torch.no_grad():
            errors[method] = (c(input_ids=batch).logits - ref).pow(2).mean().item()
    assert errors["svd-llm"] < errors["svd"]
    with pytest.raises(ValueError, match="needs calibration_ids"):
        L.compress_model(model, 0.2, "asvd")


def test_factored_latency_rows_and_the_measured_break_even():
    rows = L.factored_latency(64, 64, [4, 60], tokens=8, min_run_time=0.01)
    assert [r["rank"] for r in rows] == [4, 60] and all(r["factored_ms"] > 0 for r in rows)
    fake = [{"rank": 8, "speedup": 3.0}, {"rank": 64, "speedup": 1.2}, {"rank": 128, "speedup": 0.8}]
    assert L.measured_break_even(fake) == 64
    assert L.measured_break_even([{"rank": 8, "speedup": 0.5}]) is None


# --------------------------------------------------------------------------- attention and caches


def test_attention_flops_are_quadratic_and_overtake_the_mlp_where_the_formula_says():
    a1 = L.attention_flops(256, 384, 6, 2, 64, 1024)
    a2 = L.attention_flops(512, 384, 6, 2, 64, 1024)
    assert a2["attention"] == 4 * a1["attention"] and a2["mlp"] == 2 * a1["mlp"]
    t = L.attention_overtakes_mlp(384, 6, 64, 1024)
    assert t == 3 * 384 * 1024 / 384
    at = L.attention_flops(int(t), 384, 6, 2, 64, 1024)
    assert at["attention"] == at["mlp"]


def test_mla_cache_against_mha_gqa_mqa_for_deepseek_v2_shapes():
    d = L.DEEPSEEK_V2
    mla = L.mla_cache_bytes(d["layers"], d["latent"], d["rope_dim"], 4096)
    mha = kv_cache_bytes(d["layers"], d["heads"], d["head_dim"], 4096, 1, 2)
    assert mla == (512 + 64) * 60 * 4096 * 2
    assert mla / mha == pytest.approx(576 / (2 * 128 * 128))
    # the paper's comparison: 4.5 d_h per layer and token, as GQA with 2.25 groups
    assert (d["latent"] + d["rope_dim"]) / d["head_dim"] == 4.5


def test_pool_kv_heads_averages_consecutive_heads_and_is_identity_at_full_groups(rng):
    w = torch.randn(4 * 3, 5, generator=rng)  # 4 heads of dim 3
    assert torch.equal(L.pool_kv_heads(w, 4, 3, 4), w)
    two = L.pool_kv_heads(w, 4, 3, 2)
    assert torch.allclose(two[:3], (w[0:3] + w[3:6]) / 2)
    assert torch.allclose(two[3:], (w[6:9] + w[9:12]) / 2)
    assert torch.allclose(L.pool_kv_heads(w, 4, 3, 1), w.view(4, 3, 5).mean(0))
    with pytest.raises(ValueError, match="groups must divide kv_heads=4"):
        L.pool_kv_heads(w, 4, 3, 3)


def test_convert_kv_heads_makes_a_working_mqa_model_with_the_formula_cache(small_lm):
    model, _, val = small_lm
    batch = val[:128].view(1, 128)
    same = L.convert_kv_heads(model, model.config.num_key_value_heads)
    with torch.no_grad():
        assert torch.allclose(same(input_ids=batch).logits, model(input_ids=batch).logits,
                              atol=1e-5)
    mqa = L.convert_kv_heads(model, 1)
    assert mqa.config.num_key_value_heads == 1 and mqa.model.layers[0].self_attn.k_proj.out_features == 48
    cache = measure_kv_cache(mqa, 64)
    assert cache["measured_bytes"] == cache["formula_bytes"]
    assert cache["formula_bytes"] * model.config.num_key_value_heads == measure_kv_cache(
        model, 64)["formula_bytes"]
    with torch.no_grad():
        out = mqa.generate(batch[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


def test_latent_attention_absorbed_equals_decompressed(rng):
    torch.manual_seed(0)
    mla = L.LatentAttention(hidden=32, heads=4, head_dim=8, latent=12).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    assert torch.allclose(mla(x), mla(x, absorbed=True), atol=1e-10)
    assert mla.cache_values_per_token() == {"mla": 12, "mha": 64}


def test_lora_merged_equals_unmerged_and_starts_as_the_base(rng):
    base = nn.Linear(16, 12)
    lora = L.LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(3, 16, generator=rng)
    assert torch.allclose(lora(x), base(x))  # B = 0 at the start
    with torch.no_grad():
        lora.lora_b.normal_()
    assert not torch.allclose(lora(x), base(x))
    assert torch.allclose(lora.merged()(x), lora(x), atol=1e-5)


def test_multi_adapter_forward_equals_one_adapter_per_row(rng):
    x = torch.randn(3, 5, 16, generator=rng)
    w = torch.randn(12, 16, generator=rng)
    a, b = torch.randn(4, 2, 16, generator=rng), torch.randn(4, 12, 2, generator=rng)
    ids = torch.tensor([2, 0, 2])
    out = L.multi_adapter_forward(x, w, a, b, ids, 0.5)
    for row, i in enumerate(ids.tolist()):
        assert torch.allclose(out[row], x[row] @ (w + 0.5 * b[i] @ a[i]).T, atol=1e-4)
