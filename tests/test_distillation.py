"""Chapter 04: soft targets, the KD loss and its T^2, forward / reverse KL and JSD, hidden-state
and on-policy objectives, the top-k teacher cache, on random tensors and the small course model;
and the committed recipe results the notebook's claims rest on."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from utils import distillation as D
from utils.models import finetune

INF = float("inf")


def _pair(rng, shape=(5, 7, 50), scale=3.0):
    return torch.randn(shape, generator=rng) * scale, torch.randn(shape, generator=rng) * scale


# --------------------------------------------------------------------------- soft targets


def test_softmax_with_temperature_is_softmax_of_scaled_logits_and_flattens(rng):
    z = torch.randn(3, 10, generator=rng) * 4
    for t in (0.5, 1, 2, 8):
        assert torch.allclose(D.softmax_with_temperature(z, t), (z / t).softmax(-1))
    entropy = [D.dark_knowledge(D.softmax_with_temperature(z, t))["entropy"] for t in (1, 2, 4)]
    assert entropy[0] < entropy[1] < entropy[2] < math.log(10)


@pytest.mark.parametrize("bad", [0, -1.0, INF, True, "2", None])
def test_bad_temperature_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        D.softmax_with_temperature(torch.zeros(3), bad)


def test_dark_knowledge_of_a_one_hot_and_a_uniform_distribution():
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert D.dark_knowledge(one_hot) == {"mass_off_argmax": 0.0, "entropy": 0.0,
                                        "tokens_for_90pct": 1.0}
    uniform = D.dark_knowledge(torch.full((1, 10), 0.1))
    assert uniform["mass_off_argmax"] == pytest.approx(0.9)
    assert uniform["entropy"] == pytest.approx(math.log(10))
    assert uniform["tokens_for_90pct"] in (9.0, 10.0)  # 0.9 reached at the 9th, up to rounding


# --------------------------------------------------------------------------- divergences


def test_forward_kl_matches_torch_kl_div_summed_over_the_vocabulary(rng):
    t, s = _pair(rng)
    for temp in (1.0, 3.0):
        ours = D.forward_kl(t, s, temp)
        ref = F.kl_div((s / temp).log_softmax(-1), (t / temp).log_softmax(-1), log_target=True,
                       reduction="none").sum(-1)
        assert ours.shape == t.shape[:-1]
        assert torch.allclose(ours, ref, atol=1e-5)
        # the common mistake: reduction="mean" also divides by the vocabulary size
        with pytest.warns(UserWarning, match="divides the total loss by both"):
            wrong = F.kl_div((s / temp).log_softmax(-1), (t / temp).log_softmax(-1),
                             log_target=True, reduction="mean")
        assert wrong.item() == pytest.approx(ours.mean().item() / t.shape[-1], rel=1e-4)


def test_reverse_kl_is_forward_kl_with_the_roles_swapped_and_they_differ(rng):
    t, s = _pair(rng)
    assert torch.allclose(D.reverse_kl(t, s), D.forward_kl(s, t))
    assert not torch.allclose(D.reverse_kl(t, s), D.forward_kl(t, s), rtol=0.05)
    assert (D.forward_kl(t, t).abs() < 1e-6).all() and (D.forward_kl(t, s) > 0).all()


def test_minus_inf_masks_cost_nothing_where_both_mask_and_infinity_where_only_the_student_does(rng):
    t, s = _pair(rng, (4, 20))
    t[:, :5] = -INF
    s_shared = s.clone()
    s_shared[:, :5] = -INF
    kl = D.forward_kl(t, s_shared)
    ref = D.forward_kl(t[:, 5:], s_shared[:, 5:])  # the same distributions without the masked ids
    assert torch.isfinite(kl).all() and torch.allclose(kl, ref, atol=1e-6)
    assert torch.isfinite(D.forward_kl(t, s)).all()  # the teacher masks: fine
    s_only = s_shared.clone()
    s_only[:, 10] = -INF  # the teacher has mass there: KL(p || q) is infinite
    assert torch.isinf(D.forward_kl(t, s_only)).all()
    assert torch.isfinite(D.reverse_kl(t, s_only)).all()  # reverse KL ignores what q drops
    assert torch.isfinite(D.kd_loss(s_shared, t, torch.full((4,), 7))).all()


def test_generalized_jsd_is_symmetric_at_one_half_bounded_and_tends_to_both_kls(rng):
    t, s = _pair(rng, (6, 30))
    jsd = D.generalized_jsd(t, s, 0.5)
    assert torch.allclose(jsd, D.generalized_jsd(s, t, 0.5), atol=1e-6)
    assert (jsd > 0).all() and (jsd <= math.log(2)).all()
    eps = 1e-4  # JSD(beta) / beta -> KL(p || q) as beta -> 0, / (1 - beta) -> KL(q || p) at 1
    t, s = _pair(rng, (6, 30), scale=1.0)  # no probability far below eps: the limits are near
    assert torch.allclose(D.generalized_jsd(t, s, eps) / eps, D.forward_kl(t, s), rtol=0.02)
    assert torch.allclose(D.generalized_jsd(t, s, 1 - eps) / eps, D.reverse_kl(t, s), rtol=0.02)


@pytest.mark.parametrize("beta", [0, 1, 1.5, True, "0.5"])
def test_jsd_beta_outside_0_1_is_refused(beta, rng):
    t, s = _pair(rng, (2, 5))
    with pytest.raises(ValueError, match="beta must be a number in \\(0, 1\\)"):
        D.generalized_jsd(t, s, beta)


def test_divergences_refuse_mismatched_shapes_and_unknown_kinds(rng):
    with pytest.raises(ValueError, match="same shape"):
        D.forward_kl(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="kind must be one of"):
        D.divergence(torch.zeros(2, 5), torch.zeros(2, 5), "kl")
    with pytest.raises(TypeError, match="teacher_logits must be a floating-point tensor"):
        D.forward_kl(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5))


# --------------------------------------------------------------------------- the KD loss and T^2


def test_kd_loss_is_t_squared_kl_plus_alpha_ce_and_ignores_minus_100(rng):
    t, s = _pair(rng, (3, 4, 12))
    labels = torch.randint(0, 12, (3, 4), generator=rng)
    labels[0, 0] = -100
    soft = F.kl_div((s / 2).log_softmax(-1), (t / 2).log_softmax(-1), log_target=True,
                    reduction="none").sum(-1).mean()
    keep = labels != -100
    hard = F.cross_entropy(s[keep], labels[keep])
    assert D.kd_loss(s, t, labels, 2.0, 0.3).item() == pytest.approx(
        (4 * soft + 0.3 * hard).item(), rel=1e-5)
    assert D.kd_loss(s, t, labels, 2.0, 0.3, t_squared=False).item() == pytest.approx(
        (soft + 0.3 * hard).item(), rel=1e-5)
    assert D.kd_loss(s, t, None, 2.0).item() == pytest.approx(4 * soft.item(), rel=1e-5)
    with pytest.raises(ValueError, match="labels must have shape \\(3, 4\\)"):
        D.kd_loss(s, t, labels[:, :2])
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        D.kd_loss(s, t, labels, alpha=-1)


def test_the_soft_gradient_is_closed_form_and_scales_as_one_over_t_squared(rng):
    t, s = _pair(rng, (8, 100), scale=1.0)
    rows = D.soft_gradient_norms(t, s, [1, 2, 4, 8, 16, 32, 64])
    assert all(r["max_error_vs_closed_form"] < 1e-6 for r in rows)
    norms = [r["grad_norm"] for r in rows]
    assert all(a > b for a, b in zip(norms, norms[1:]))
    limit = D.high_temperature_limit(t, s)
    assert rows[-1]["grad_norm_x_T2"] == pytest.approx(limit, rel=0.01)
    assert norms[-2] / norms[-1] == pytest.approx(4.0, rel=0.01)  # doubling T quarters it


# --------------------------------------------------------------------------- students and objectives


def test_layer_map_is_tinybert_uniform():
    assert D.layer_map(4, 6) == [1, 3, 4, 6]
    assert D.layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert D.layer_map(1, 6) == [6]
    with pytest.raises(ValueError, match="student_layers must be a positive integer"):
        D.layer_map(0, 6)


def test_new_student_is_seeded_and_has_the_course_architectures():
    a, b = D.new_student("tiny", 3), D.new_student("tiny", 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.config.hidden_size == 64 and a.config.num_hidden_layers == 1
    assert D.new_student("small", 0).config.hidden_size == 192
    with pytest.raises(ValueError, match="spec must be one of"):
        D.new_student("huge")


def test_kd_objective_without_a_teacher_is_the_model_loss(small_lm):
    model, _, val = small_lm
    batch = val[:256].view(2, 128)
    with torch.no_grad():
        assert D.kd_objective(None)(model, batch).item() == pytest.approx(
            model(input_ids=batch, labels=batch).loss.item(), rel=1e-6)
        # a student equal to its teacher: the soft term vanishes, alpha x CE remains
        kd = D.kd_objective(model, 1.0, 0.5)(model, batch).item()
    assert kd == pytest.approx(0.5 * model(input_ids=batch, labels=batch).loss.item(), rel=1e-4)


def test_distillation_moves_a_tiny_student_towards_the_teacher(small_lm):
    teacher, _, val = small_lm
    student = D.new_student("tiny", 0)
    batch = val[:512].view(4, 128)
    with torch.no_grad():
        before = D.forward_kl(teacher(input_ids=batch).logits, student(input_ids=batch).logits)
    finetune(student, 15, learning_rate=3e-3, batch_size=4, seq_len=64, data=val,
             loss_fn=D.kd_objective(teacher, 1.0, 0.0), progress=False)
    with torch.no_grad():
        after = D.forward_kl(teacher(input_ids=batch).logits, student(input_ids=batch).logits)
    assert after.mean() < 0.8 * before.mean()


def test_hidden_state_student_projects_widths_and_trains_its_projections(small_lm):
    teacher, _, val = small_lm
    wrapper = D.HiddenStateStudent(D.new_student("tiny", 0), teacher)
    assert wrapper.map == [4] and wrapper.projections[0].weight.shape == (192, 64)
    batch = val[:256].view(2, 128)
    loss = D.hidden_kd_objective(teacher, 1.0, 0.5)(wrapper, batch)
    loss.backward()
    assert wrapper.projections[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        s = wrapper.student(input_ids=batch, output_hidden_states=True).hidden_states
        t = teacher(input_ids=batch, output_hidden_states=True).hidden_states
        assert 0 <= wrapper.hidden_loss(s, t).item() <= 2


def test_on_policy_objective_samples_and_falls_back_to_supervised_kd(small_lm):
    teacher, _, val = small_lm
    student = D.new_student("tiny", 0)
    batch = val[:256].view(2, 128)
    supervised = D.on_policy_objective(teacher, "reverse_kl", fraction=0.0)(student, batch)
    with torch.no_grad():
        ref = D.reverse_kl(teacher(input_ids=batch).logits[:, :-1],
                           student(input_ids=batch).logits[:, :-1]).mean()
    assert supervised.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.manual_seed(0)
    on = D.on_policy_objective(teacher, "reverse_kl", fraction=1.0)(student, batch)
    on.backward()
    assert torch.isfinite(on) and on.item() != pytest.approx(supervised.item(), rel=1e-3)
    with pytest.raises(ValueError, match="fraction must be in \\[0, 1\\]"):
        D.on_policy_objective(teacher, fraction=1.5)


def test_repetition_rate_counts_ngrams_seen_before():
    assert D.repetition_rate(torch.tensor([[1, 2, 3, 4, 5]])) == 0.0
    # 1 2 3 1 2 3: 3-grams 123 231 312 123 -> one of four repeats
    assert D.repetition_rate(torch.tensor([[1, 2, 3, 1, 2, 3]])) == 0.25
    assert D.repetition_rate(torch.tensor([[7] * 10])) == pytest.approx(7 / 8)


def test_sample_quality_is_seeded_and_scores_the_teacher_on_its_own_text_well(small_lm):
    teacher, _, val = small_lm
    prompts = val[:128].view(8, 16)
    a = D.sample_quality(teacher, teacher, prompts, new_tokens=12, seed=1)
    assert a == D.sample_quality(teacher, teacher, prompts, new_tokens=12, seed=1)
    random_student = D.sample_quality(D.new_student("tiny", 0), teacher, prompts, 12, seed=1)
    assert a["teacher_nll"] < random_student["teacher_nll"] - 2


# --------------------------------------------------------------------------- the top-k cache


def test_cache_bytes_by_formula():
    got = D.topk_cache_bytes(1000, 32, 4096)
    assert got == {"full_bytes": 1000 * 4096 * 2, "topk_bytes": 1000 * 32 * 4, "ratio": 64.0}
    assert D.index_bytes(4096) == 2 and D.index_bytes(128256) == 4
    with pytest.raises(ValueError, match="k must be a positive integer"):
        D.topk_cache_bytes(10, 0, 4096)


def test_topk_kl_is_exact_at_k_equal_v_and_its_error_shrinks_with_k(rng):
    t, s = _pair(rng, (4, 6, 40))
    top = t.topk(40, dim=-1)
    assert torch.allclose(D.topk_forward_kl(top.values, top.indices, s), D.forward_kl(t, s),
                          atol=1e-5)
    errors = [(D.topk_forward_kl(*t.topk(k, dim=-1), s) - D.forward_kl(t, s)).abs().mean()
              for k in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ValueError, match="indices must be token ids in 0..39"):
        D.topk_forward_kl(top.values, top.indices + 1, s)
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        D.topk_forward_kl(top.values, top.indices.float(), s)


def test_build_topk_cache_stores_int16_ids_and_fp16_values_of_the_formula_size(small_lm):
    teacher, _, val = small_lm
    windows = val[:512].view(4, 128)
    cache = D.build_topk_cache(teacher, windows, k=8, progress=False)
    assert cache.values.dtype == torch.float16 and cache.indices.dtype == torch.int16
    assert cache.values.shape == (4, 128, 8)
    assert cache.nbytes() == D.topk_cache_bytes(windows.numel(), 8, 4096)["topk_bytes"]
    with torch.no_grad():
        full = teacher(input_ids=windows).logits
    assert torch.equal(cache.indices.long(), full.topk(8, dim=-1).indices)
    draw = cache.batch_fn(3)(torch.Generator().manual_seed(0))
    assert [x.shape[0] for x in draw] == [3, 3, 3]
    with pytest.raises(ValueError, match="k must be at most the vocabulary size"):
        D.build_topk_cache(teacher, windows, k=5000, progress=False)


def test_cached_objective_with_a_full_cache_equals_the_live_teacher(small_lm):
    teacher, _, val = small_lm
    student = D.new_student("tiny", 0)
    windows = val[:256].view(2, 128)
    cache = D.build_topk_cache(teacher, windows, k=4096, progress=False)
    with torch.no_grad():
        live = D.kd_objective(teacher, 1.0, 0.5)(student, windows).item()
        cached = D.cached_kd_objective(1.0, 0.5)(student, (windows, cache.values,
                                                           cache.indices)).item()
    assert cached == pytest.approx(live, rel=2e-3)  # fp16 logits in the cache


def test_topk_error_reports_mass_and_a_falling_error(small_lm):
    teacher, _, val = small_lm
    rows = D.topk_error(teacher, D.new_student("tiny", 0), val[:256].view(2, 128), [1, 16, 256])
    assert [r["k"] for r in rows] == [1, 16, 256]
    assert rows[0]["teacher_mass"] < rows[1]["teacher_mass"] < rows[2]["teacher_mass"] <= 1
    assert rows[2]["relative_error"] < rows[0]["relative_error"]


def test_rows_batch_fn_draws_seeded_rows():
    rows = torch.arange(50).view(10, 5)
    draw = D.rows_batch_fn(rows, 4)
    a, b = draw(torch.Generator().manual_seed(0)), draw(torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (4, 5) and (a[:, 0] % 5 == 0).all()


def test_spread_is_mean_and_half_range():
    assert D.spread([1.0, 3.0]) == {"mean": 2.0, "half_range": 1.0, "values": [1.0, 3.0]}


# --------------------------------------------------------------------------- the committed results


def test_committed_students_load_with_the_small_architecture():
    for name in ("ce", "kd"):
        student = D.load_student(name)
        assert student.config.hidden_size == 192 and not student.training
        assert next(student.parameters()).dtype == torch.float32


def test_committed_results_support_the_chapters_claims():
    """What the notebook says rests on these files: logit KD beats cross-entropy by more than
    the seed spread, and distillation heals the pruned teacher better than fine-tuning."""
    runs = D.load_results("students")["runs"]
    seeds = D.load_results("students")["settings"]["seeds"]
    ce = D.spread(runs[f"ce/seed{s}"]["final"]["perplexity"] for s in seeds)
    kd = D.spread(runs[f"kd/seed{s}"]["final"]["perplexity"] for s in seeds)
    assert ce["mean"] - kd["mean"] > ce["half_range"] + kd["half_range"]
    heal = D.load_results("heal")
    seeds = heal["settings"]["seeds"]
    distil = [heal["runs"][f"distill/seed{s}"]["final"]["perplexity"] for s in seeds]
    tune = [heal["runs"][f"finetune/seed{s}"]["final"]["perplexity"] for s in seeds]
    assert max(distil) < min(tune) < heal["before"]["perplexity"]
    with pytest.raises(ValueError, match="part must be one of"):
        D.load_results("nope")
