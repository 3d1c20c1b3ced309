"""Chapter 03: masks, Wanda, SparseGPT, structured pruning (checked against torch-pruning and
torch.nn.utils.prune), schedules and allocation, on random tensors and the small course model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from utils import pruning as P
from utils.metrics import perplexity
from utils.models import calibration_tokens, find_linears


@pytest.fixture(scope="module")
def calib(small_lm):
    return calibration_tokens(small_lm[1], sequences=4, seq_len=128)


# --------------------------------------------------------------------------- masks


def test_magnitude_mask_removes_exactly_the_count_and_breaks_ties_by_position():
    w = torch.tensor([[0.5, -0.1, 0.1], [0.1, 2.0, -0.3]])
    keep = P.magnitude_mask(w, 0.5)  # 3 of 6 go: the three 0.1s, all tied
    assert keep.tolist() == [[True, False, False], [False, True, True]]
    keep = P.magnitude_mask(w, 0.34)  # round(2.04) = 2: the first two 0.1s in order
    assert keep.tolist() == [[True, False, False], [True, True, True]]
    assert P.magnitude_mask(w, 0.0).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", True, None])
def test_sparsity_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        P.magnitude_mask(torch.ones(4), bad)


def test_global_masks_match_torch_nn_utils_prune_global_unstructured(rng):
    layers = [nn.Linear(16, 8), nn.Linear(8, 32)]
    with torch.no_grad():
        layers[0].weight.mul_(0.1)  # small weights: a global threshold empties this one more
    ours = P.global_magnitude_masks({"a": layers[0].weight, "b": layers[1].weight}, 0.6)
    torch_prune.global_unstructured([(m, "weight") for m in layers],
                                    pruning_method=torch_prune.L1Unstructured, amount=0.6)
    assert torch.equal(ours["a"], layers[0].weight_mask.bool())
    assert torch.equal(ours["b"], layers[1].weight_mask.bool())
    assert P.sparsity_of(ours["a"]) > 0.9 > P.sparsity_of(ours["b"])
    total = sum(m.numel() for m in ours.values())
    assert sum((~m).sum().item() for m in ours.values()) == round(0.6 * total)


def test_nm_mask_keeps_n_of_every_m_and_rejects_bad_n_m(rng):
    scores = torch.randn(6, 16, generator=rng).abs()
    for n, m in ((2, 4), (4, 8), (1, 4)):
        mask = P.nm_mask(scores, n, m)
        assert (mask.view(6, -1, m).sum(-1) == n).all()
        top = scores.view(-1, m).topk(n, dim=1).indices
        assert torch.equal(mask.view(-1, m).gather(1, top), torch.ones_like(top, dtype=torch.bool))
    assert P.nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="n must be <= m"):
        P.nm_mask(scores, 5, 4)
    with pytest.raises(ValueError, match="multiple of m=3"):
        P.nm_mask(scores, 2, 3)


def test_wanda_score_is_weight_times_input_column_norm(rng):
    w, x = torch.randn(5, 12, generator=rng), torch.randn(40, 12, generator=rng)
    h = 2 * x.T @ x / x.shape[0]
    norms = P.input_norms_from_hessian(h, n_tokens=x.shape[0])
    torch.testing.assert_close(norms, x.norm(dim=0))
    scores = P.wanda_scores(w, norms)
    torch.testing.assert_close(scores[2, 7], w[2, 7].abs() * x[:, 7].norm())
    mask = P.row_mask(scores, 0.5)
    assert (mask.sum(1) == 6).all()  # per output row, not per layer
    with pytest.raises(ValueError, match="input_norm must have shape \\(12,\\)"):
        P.wanda_scores(w, norms[:5])


# --------------------------------------------------------------------------- SparseGPT


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_sparsegpt_hits_the_pattern_and_reconstructs_better_than_the_masks_alone(rng, pattern):
    scale = 0.1 + 2.9 * torch.rand(64, generator=rng)  # uneven input channels, in no order
    x = torch.randn(512, 64, generator=rng) * scale
    w = torch.randn(32, 64, generator=rng)
    h = 2 * x.T @ x / x.shape[0]
    pruned = P.sparsegpt_prune(w, h, block_size=16, **pattern)
    keep = pruned != 0
    if "n" in pattern:
        assert (keep.view(32, -1, 4).sum(-1) == 2).all()
        mag = P.nm_mask(w.abs(), 2, 4)
        wanda = P.nm_mask(P.wanda_scores(w, x.norm(dim=0)), 2, 4)
    else:
        assert P.sparsity_of(pruned) == pytest.approx(0.5, abs=1 / 64)
        mag = P.magnitude_mask(w, 0.5)
        wanda = P.row_mask(P.wanda_scores(w, x.norm(dim=0)), 0.5)

    def err(v):
        return (x @ (w - v).T).pow(2).mean().item()
    assert err(pruned) < err(w * wanda) < err(w * mag)
    assert err(pruned) < err(w * keep)  # the OBS update of the kept weights helps


def test_sparsegpt_rejects_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match="hessian must be \\(8, 8\\)"):
        P.sparsegpt_prune(torch.ones(4, 8), torch.eye(4))


# --------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("method", P.METHODS)
def test_prune_unstructured_sparsifies_every_decoder_linear_and_leaves_the_original(
        small_lm, calib, method):
    model = small_lm[0]
    before = {n: m.weight.clone() for n, m in find_linears(model).items()}
    pruned, masks = P.prune_unstructured(model, method, 0.5, calibration_ids=calib)
    for name, lin in find_linears(pruned).items():
        assert P.sparsity_of(lin.weight) == pytest.approx(0.5, abs=0.01), name
        assert not lin.weight[~masks[name]].any()
    assert all(torch.equal(before[n], m.weight) for n, m in find_linears(model).items())
    nm, _ = P.prune_unstructured(model, method, n_m=(2, 4), calibration_ids=calib)
    w = nm.model.layers[0].mlp.up_proj.weight
    assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()


def test_loss_aware_methods_beat_magnitude_on_the_small_model(small_lm, calib):
    model, _, val = small_lm
    ppl = {m: perplexity(P.prune_unstructured(model, m, n_m=(2, 4), calibration_ids=calib)[0],
                         val, max_tokens=1024) for m in P.METHODS}
    assert ppl["sparsegpt"] < ppl["magnitude"] and ppl["wanda"] < ppl["magnitude"], ppl


def test_methods_need_what_they_use(small):
    with pytest.raises(ValueError, match="needs calibration_ids"):
        P.prune_unstructured(small, "wanda", 0.5)
    with pytest.raises(ValueError, match="method must be one of"):
        P.prune_unstructured(small, "random", 0.5)


def test_masked_finetune_keeps_pruned_weights_at_zero(small_lm):
    model, _, val = small_lm
    pruned, masks = P.prune_unstructured(model, "magnitude", 0.7)
    losses = P.masked_finetune(pruned, masks, 3, batch_size=2, seq_len=64, data=val,
                               progress=False)
    assert len(losses) == 3
    for name, lin in find_linears(pruned).items():
        assert not lin.weight[~masks[name]].any()
        assert lin.weight[masks[name]].ne(model.get_submodule(name).weight[masks[name]]).any()


def test_cubic_schedule_is_increasing_and_ends_at_the_target():
    s = P.cubic_schedule(0.8, 4)
    assert s[-1] == pytest.approx(0.8) and all(a < b for a, b in zip(s, s[1:]))
    assert s[0] > 0.8 / 4  # front-loaded: prunes fastest first


# --------------------------------------------------------------------------- structured


def test_pruned_mlp_equals_the_dense_mlp_with_dropped_channels_zeroed(small, rng):
    mlp = small.model.layers[0].mlp
    keep = P.keep_channels(P.mlp_channel_scores(mlp), mlp.down_proj.in_features // 2)
    x = torch.randn(3, 5, mlp.gate_proj.in_features, generator=rng)
    zeroed = copy.deepcopy(mlp)
    drop = torch.ones(mlp.down_proj.in_features, dtype=torch.bool)
    drop[keep] = False
    with torch.no_grad():
        zeroed.down_proj.weight[:, drop] = 0
    small_mlp = copy.deepcopy(mlp)
    P.prune_mlp_channels(small_mlp, keep)
    assert small_mlp.down_proj.weight.shape[1] == len(keep)
    torch.testing.assert_close(small_mlp(x), zeroed(x))


def test_structured_prune_shrinks_and_stays_a_working_transformers_model(small_lm, calib,
                                                                       tmp_path):
    from transformers import LlamaForCausalLM

    model, tok, val = small_lm
    cfg = model.config
    pruned = P.structured_prune(model, 0.5, kv_groups_keep=1, calibration_ids=calib)
    assert pruned.config.intermediate_size == cfg.intermediate_size // 2
    assert pruned.config.num_key_value_heads == 1
    assert pruned.config.num_attention_heads == cfg.num_attention_heads // cfg.num_key_value_heads
    assert P.linear_param_count(pruned) < 0.6 * P.linear_param_count(model)
    pruned.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = val[:64][None]
    with torch.inference_mode():
        torch.testing.assert_close(again(input_ids=ids).logits, pruned(input_ids=ids).logits)
        out = pruned.generate(ids[:, :8], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    assert perplexity(pruned, val, max_tokens=512) < 10 * perplexity(model, val, max_tokens=512)


def test_hand_written_mlp_pruning_equals_torch_pruning_dependency_graph(small_lm):
    pytest.importorskip("torch_pruning")
    model, _, val = small_lm
    ours = P.structured_prune(model, 0.5)
    lib = P.torch_pruning_mlp(model, P.mlp_keep_indices(model, 0.5), val[:16][None])
    ids = val[:64][None]
    with torch.inference_mode():
        torch.testing.assert_close(lib(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert lib.config.intermediate_size == ours.config.intermediate_size


def test_group_pruning_keeps_whole_query_groups(small):
    attn = copy.deepcopy(small.model.layers[0].self_attn)
    cfg = small.config
    d, q_per_kv = cfg.hidden_size // cfg.num_attention_heads, \
        cfg.num_attention_heads // cfg.num_key_value_heads
    scores = P.attention_group_scores(attn, d, q_per_kv)
    assert scores.shape == (cfg.num_key_value_heads, q_per_kv)
    P.prune_attention_groups(attn, d, q_per_kv, torch.tensor([1]), torch.tensor([[0, 1]]))
    assert attn.k_proj.out_features == attn.v_proj.out_features == d
    assert attn.q_proj.out_features == attn.o_proj.in_features == 2 * d
    torch.testing.assert_close(attn.k_proj.weight, small.model.layers[0].self_attn.k_proj.weight[d:])


def test_keep_channels_is_sorted_and_checked():
    assert P.keep_channels(torch.tensor([0.1, 3.0, 2.0, 3.0]), 2).tolist() == [1, 3]
    with pytest.raises(ValueError, match="keep must be <= the number of channels"):
        P.keep_channels(torch.ones(3), 4)


# --------------------------------------------------------------------------- speed and budget


def test_break_even_interpolates_the_first_crossing():
    s = [0.5, 0.8, 0.9]
    assert P.break_even_sparsity(s, [1, 1, 1], [4, 2, 0.5]) == pytest.approx(0.85)
    assert P.break_even_sparsity(s, [1, 1, 1], [0.9, 0.5, 0.2]) == 0.5
    assert P.break_even_sparsity(s, [1, 1, 1], [3, 2, 1.5]) is None
    with pytest.raises(ValueError, match="strictly increasing"):
        P.break_even_sparsity([0.5, 0.5], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        P.break_even_sparsity([0.5], [0], [1])


def test_csr_matmul_gives_the_dense_result_and_the_sweep_reports_each_sparsity(rng):
    w = torch.randn(16, 8, generator=rng)
    w = w * P.magnitude_mask(w, 0.9)
    x = torch.randn(8, 3, generator=rng)
    torch.testing.assert_close(torch.sparse.mm(w.to_sparse_csr(), x), w @ x)
    rows = P.sparse_matmul_sweep(16, 8, 2, sparsities=(0.5, 0.9), min_run_time=0.01)
    assert [r["sparsity"] for r in rows] == [0.5, 0.9]
    assert all(r["dense_ms"] > 0 and r["csr_ms"] > 0 for r in rows)


def test_allocation_keeps_the_budget_and_spares_the_sensitive():
    sens = {"a": 30.0, "b": 20.0, "c": 10.0}
    sizes = {"a": 100, "b": 300, "c": 600}
    alloc = P.allocate_sparsity(sens, sizes, 0.6)
    mean = sum(alloc[n] * sizes[n] for n in sens) / sum(sizes.values())
    assert mean == pytest.approx(0.6, abs=1e-6)
    assert alloc["a"] < alloc["b"] < alloc["c"]
    with pytest.raises(ValueError, match="same layers"):
        P.allocate_sparsity(sens, {"a": 1}, 0.5)


def test_sensitivity_scan_restores_every_weight(small_lm):
    model, _, val = small_lm
    sub = copy.deepcopy(model)
    before = {n: m.weight.clone() for n, m in find_linears(sub).items()}
    out = P.sensitivity_scan(sub, val, 0.9, max_tokens=256, progress=False)
    assert set(out) == set(before)
    assert all(torch.equal(before[n], m.weight) for n, m in find_linears(sub).items())
