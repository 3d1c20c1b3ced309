"""Grading spec of lab 03, pruning (chapter 03).

Expected values come from the reference implementations in ``utils.pruning`` (imported inside
functions, so importing this spec stays cheap); the learner's answers must not merely call them.
Tensors travel as ``tensor_arg`` (plain JSON) and are rebuilt by ``call_with_tensors``. Hidden
cases are drawn from ``random.Random(SPEC.seed)``: random shapes and sparsities, weights rounded
to one decimal (so that many |w| tie), N:M patterns other than 2:4, zero input features, sweeps
that cross twice or never, and bad arguments that must raise ``ValueError``.
"""

from __future__ import annotations

from utils.labs.spec import (Case, Exercise, LabSpec, _compare_raises, _show, array_close,
                                 call_with_tensors, choice, close, one_of, tensor_arg)

ADAPTER = "utils.labs.spec:call_with_tensors"


def _mat(rng, rows, cols, scale=1.0, digits=5):
    return [[round(rng.gauss(0, 1) * scale, digits) for _ in range(cols)] for _ in range(rows)]


def _expected(reference):
    """``expected(*plain_args)``: the reference called on tensors, in the grading process."""
    return lambda *args, **kwargs: call_with_tensors(reference, *args, **kwargs)


# --------------------------------------------------------------------------- comparisons


def _mask_reason(expected, got) -> str | None:
    """``got`` must be a bool tensor equal to the expected keep-mask."""
    if not (isinstance(got, dict) and "__array__" in got):
        return f"expected a boolean tensor of shape {expected['shape']}, got {_show(got)}"
    if got.get("dtype") != "bool":
        return (f"the mask must be a bool tensor (True = kept), got dtype {got.get('dtype')}; "
                "a comparison such as `scores > t` or `torch.ones(..., dtype=torch.bool)` gives one")
    if got["shape"] != expected["shape"]:
        return f"expected shape {expected['shape']}, got shape {got['shape']}"
    flat_e, flat_g = _flat(expected["__array__"]), _flat(got["__array__"])
    if flat_g == flat_e:
        return None
    removed_e, removed_g = flat_e.count(False), sum(1 for v in flat_g if v is False)
    first = next(i for i, (e, g) in enumerate(zip(flat_e, flat_g)) if e != g)
    what = "kept" if flat_e[first] else "removed"
    return (f"you removed {removed_g} entries, expected {removed_e}; the first difference is at "
            f"flat index {first}, which should be {what}")


def _flat(x):
    if isinstance(x, list):
        return [v for item in x for v in _flat(item)]
    return [x]


def _mask_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    return _mask_reason(expected, got)


def _mask_list_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    if not isinstance(got, list) or len(got) != len(expected):
        return f"expected a list of {len(expected)} masks (one per weight), got {_show(got)}"
    for i, (e, g) in enumerate(zip(expected, got)):
        reason = _mask_reason(e, g)
        if reason:
            return f"mask {i}: {reason}"
    return None


def _pair_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    if not isinstance(got, dict) or set(got) != {"w1", "b1", "w2"}:
        return f"expected a dict with keys 'w1', 'b1', 'w2', got {_show(got)}"
    same = array_close(rtol=0.0, atol=1e-7)
    for key in ("w1", "b1", "w2"):
        reason = same(expected[key], got[key])
        if reason:
            return f"[{key!r}] {reason}"
    return None


def _break_even_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    if expected is None:
        return None if got is None else \
            f"expected None (sparse never wins in this sweep), got {_show(got)}"
    if got is None:
        return f"expected {expected:.6g}, got None"
    return close(rel_tol=0.0, abs_tol=1e-6)(expected, got)


# --------------------------------------------------------------------------- 1: global magnitude


def _global_ref(weights, sparsity):
    from utils.pruning import global_magnitude_masks

    masks = global_magnitude_masks({f"w{i}": w for i, w in enumerate(weights)}, sparsity)
    return [masks[f"w{i}"] for i in range(len(weights))]


def _hidden_global(rng):
    cases = []
    for _ in range(4):
        layers = [tensor_arg(_mat(rng, rng.randint(1, 5), rng.randint(1, 6),
                                  rng.choice([0.1, 1.0, 3.0]), digits=1))
                  for _ in range(rng.randint(1, 3))]
        sparsity = rng.choice([0.1, 0.25, 0.5, 0.7, 0.9])
        cases.append(Case((layers, sparsity),
                          label=f"{len(layers)} random layer(s), weights to 1 decimal (ties), "
                                f"sparsity {sparsity}"))
    small, large = _mat(rng, 3, 4, 0.01), _mat(rng, 2, 5, 10.0)
    cases += [Case(([tensor_arg(small), tensor_arg(large)], 0.5),
                   label="a layer of tiny weights next to a layer of large ones: the tiny layer "
                         "loses all its weights"),
              Case(([tensor_arg([[0.3, -0.3, 0.3, -0.3, 0.3]])], 0.5),
                   label="5 equal |w|, 2.5 to remove: round() gives 2, the first two go"),
              Case(([tensor_arg([[0.0, 0.0], [0.0, 0.0]]), tensor_arg([[1.0]])], 0.8),
                   label="all-zero layer, round(0.8 * 5) = 4 removed"),
              Case(([tensor_arg(_mat(rng, 2, 3))], 0.0), label="sparsity 0: everything kept"),
              Case(([tensor_arg(_mat(rng, 2, 3))], -0.1), raises="ValueError",
                   label="sparsity -0.1"),
              Case(([tensor_arg(_mat(rng, 2, 3))], 1.2), raises="ValueError",
                   label="sparsity 1.2"),
              Case(([], 0.5), raises="ValueError", label="no weights at all")]
    return cases


# --------------------------------------------------------------------------- 2: N:M


def _nm_ref(scores, n, m):
    from utils.pruning import nm_mask

    return nm_mask(scores, n, m)


def _hidden_nm(rng):
    cases = []
    for n, m in ((2, 4), (1, 4), (4, 8), (2, 8), (1, 2)):
        rows, groups = rng.randint(1, 4), rng.randint(1, 3)
        cases.append(Case((tensor_arg(_mat(rng, rows, groups * m)), n, m),
                          label=f"random {rows}x{groups * m} scores, {n}:{m}"))
    ints = [[float(rng.randint(0, 2)) for _ in range(8)] for _ in range(3)]
    cases += [Case((tensor_arg(ints), 2, 4), label="integer scores 0..2: many ties, 2:4"),
              Case((tensor_arg([[[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]] * 2), 2, 4),
                   label="a 3-D tensor (2, 2, 4): groups along the last dimension"),
              Case((tensor_arg(_mat(rng, 2, 6)), 3, 3), label="n = m: everything kept"),
              Case((tensor_arg(_mat(rng, 2, 8)), 5, 4), raises="ValueError", label="n=5 > m=4"),
              Case((tensor_arg(_mat(rng, 2, 8)), 0, 4), raises="ValueError", label="n=0"),
              Case((tensor_arg(_mat(rng, 3, 10)), 2, 4), raises="ValueError",
                   label="last dimension 10 is not a multiple of m=4")]
    return cases


# --------------------------------------------------------------------------- 3: Wanda


def _wanda_ref(weight, x, sparsity):
    from utils.pruning import row_mask, wanda_scores

    if x.dim() != 2:
        raise ValueError("x must be 2-D")
    return row_mask(wanda_scores(weight, x.norm(dim=0)), sparsity)


def _hidden_wanda(rng):
    cases = []
    for _ in range(4):
        out, inp, tokens = rng.randint(1, 5), rng.randint(2, 9), rng.randint(1, 6)
        x = _mat(rng, tokens, inp)
        j = rng.randrange(inp)
        for row in x:  # one loud input feature: its weights survive even when small
            row[j] = round(row[j] * 20, 4)
        sparsity = rng.choice([0.25, 0.5, 0.6, 0.75])
        cases.append(Case((tensor_arg(_mat(rng, out, inp)), tensor_arg(x), sparsity),
                          label=f"random W {out}x{inp}, X {tokens}x{inp} with a loud feature, "
                                f"sparsity {sparsity}"))
    cases += [Case((tensor_arg(_mat(rng, 3, 4)),
                    tensor_arg([[0.0, 1.0, 0.0, 2.0], [0.0, -1.0, 0.0, 2.0]]), 0.5),
                   label="two input features that are always 0: their weights go first "
                         "(score ties at 0: the earlier goes first)"),
              Case((tensor_arg([[1.0, -1.0, 1.0, -1.0, 1.0]] * 2), tensor_arg([[1.0] * 5]), 0.5),
                   label="all scores equal, round(0.5 * 5) = 2 per row: the first two go"),
              Case((tensor_arg(_mat(rng, 2, 4)), tensor_arg(_mat(rng, 3, 4)), 0.0),
                   label="sparsity 0"),
              Case((tensor_arg(_mat(rng, 2, 4)), tensor_arg(_mat(rng, 3, 5)), 0.5),
                   raises="ValueError", label="x has 5 features, the weight 4 inputs"),
              Case((tensor_arg(_mat(rng, 2, 4)), tensor_arg(_mat(rng, 3, 4)), 1.0),
                   raises="ValueError", label="sparsity 1.0")]
    return cases


# --------------------------------------------------------------------------- 4: structured pair


def _pair_ref(w1, b1, w2, keep):
    import torch
    import torch.nn as nn

    from utils.pruning import _sliced_linear

    hidden = w1.shape[0]
    if b1.shape != (hidden,) or w2.dim() != 2 or w2.shape[1] != hidden:
        raise ValueError("shapes")
    if len(set(keep)) != len(keep) or any(not 0 <= i < hidden for i in keep):
        raise ValueError("keep")
    up = nn.Linear(w1.shape[1], hidden)
    down = nn.Linear(hidden, w2.shape[0], bias=False)
    with torch.no_grad():
        up.weight.copy_(w1), up.bias.copy_(b1), down.weight.copy_(w2)
    idx = torch.tensor(keep, dtype=torch.long)
    up, down = _sliced_linear(up, out_idx=idx), _sliced_linear(down, in_idx=idx)
    return {"w1": up.weight.detach(), "b1": up.bias.detach(), "w2": down.weight.detach()}


def _hidden_pair(rng):
    cases = []
    for _ in range(4):
        hidden, inp, out = rng.randint(2, 8), rng.randint(1, 5), rng.randint(1, 4)
        keep = sorted(rng.sample(range(hidden), rng.randint(1, hidden)))
        cases.append(Case((tensor_arg(_mat(rng, hidden, inp)), tensor_arg(_mat(rng, 1, hidden)[0]),
                           tensor_arg(_mat(rng, out, hidden)), keep),
                          label=f"random pair in={inp}, hidden={hidden}, out={out}, "
                                f"keep {len(keep)} channels"))
    w1, b1, w2 = _mat(rng, 4, 3), _mat(rng, 1, 4)[0], _mat(rng, 2, 4)
    cases += [Case((tensor_arg(w1), tensor_arg(b1), tensor_arg(w2), [0, 1, 2, 3]),
                   label="keep every channel: nothing changes"),
              Case((tensor_arg(w1), tensor_arg(b1), tensor_arg(w2), [3]),
                   label="keep only the last channel"),
              Case((tensor_arg(w1), tensor_arg(b1), tensor_arg(w2), [-1, 2]),
                   raises="ValueError", label="index -1 (out of range 0..3)"),
              Case((tensor_arg(w1), tensor_arg(b1), tensor_arg(w2), [0, 2, 2]),
                   raises="ValueError", label="duplicate index 2"),
              Case((tensor_arg(w1), tensor_arg(b1[:3]), tensor_arg(w2), [0, 1]),
                   raises="ValueError", label="b1 has 3 entries for 4 hidden channels"),
              Case((tensor_arg(w1), tensor_arg(b1), tensor_arg(_mat(rng, 2, 5)), [0, 1]),
                   raises="ValueError", label="w2 has 5 columns for 4 hidden channels")]
    return cases


# --------------------------------------------------------------------------- 5: break-even


def _break_even_ref(sparsities, dense_ms, sparse_ms):
    from utils.pruning import break_even_sparsity

    return break_even_sparsity(sparsities, dense_ms, sparse_ms)


def _sweep(rng, crossing):
    """A made-up dense vs CSR sweep whose sparse time falls with sparsity."""
    s = sorted(rng.sample([0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99], rng.randint(4, 7)))
    dense = [round(rng.uniform(9.5, 10.5), 3) for _ in s]
    # sparse ~ dense * (1 - s) / (1 - crossing): equal to dense at `crossing`
    sparse = [round(d * (1 - x) / (1 - crossing) * rng.uniform(0.95, 1.05), 3)
              for d, x in zip(dense, s)]
    return s, dense, sparse


def _hidden_break_even(rng):
    cases = []
    for crossing in (0.75, 0.85, 0.93):
        s, d, c = _sweep(rng, crossing)
        cases.append(Case((s, d, c), label=f"{len(s)} points, sparse catches up near {crossing}"))
    cases += [Case(([0.5, 0.7, 0.9, 0.95], [10.0] * 4, [30.0, 9.0, 12.0, 4.0]),
                   label="wins at 0.7, loses at 0.9, wins again: the first crossing counts"),
              Case(([0.5, 0.9, 0.99], [2.0, 2.0, 2.0], [9.0, 5.0, 2.5]),
                   label="sparse never wins"),
              Case(([0.1, 0.2], [5.0, 5.0], [4.0, 1.0]), label="sparse already wins at 0.1"),
              Case(([0.5], [3.0], [4.0]), label="one point, sparse slower"),
              Case(([0.5], [3.0], [2.0]), label="one point, sparse faster"),
              Case(([0.5, 0.8, 0.9], [1, 1, 1], [4, 2, 1]), label="integer timings, equal at 0.9"),
              Case(([0.5, 0.9], [1.0, 1.0, 1.0], [2.0, 0.5]), raises="ValueError",
                   label="3 dense timings for 2 sparsities"),
              Case(([0.5, 0.5, 0.9], [1.0] * 3, [3.0, 2.0, 0.5]), raises="ValueError",
                   label="sparsity 0.5 twice (not strictly increasing)"),
              Case(([0.5, 0.9], [1.0, 0.0], [2.0, 0.5]), raises="ValueError",
                   label="a dense time of 0"),
              Case(([0.5, 0.9], [1.0, 1.0], [2.0, -0.5]), raises="ValueError",
                   label="a negative sparse time"),
              Case(([], [], []), raises="ValueError", label="empty sweep")]
    return cases


# --------------------------------------------------------------------------- 6: concept

SPEEDUP_OPTIONS = ("a", "b", "c", "d")


def _speedup_answer():
    return "b"


SPEC = LabSpec(
    lab="lab03",
    notebook="lab03_pruning.ipynb",
    title="Lab 03: pruning",
    seed=3300, timeout_s=120, cell_timeout_s=30, call_timeout_s=10, memory_mb=4096,
    preimport=("torch",),
    exercises=(
        Exercise(
            name="global_prune_mask", points=3,
            title="Global magnitude pruning: one threshold for all layers",
            expected=_expected(_global_ref), adapter=ADAPTER, compare=_mask_list_compare,
            public=(Case(([tensor_arg([[0.1, -2.0], [0.3, 0.05]]), tensor_arg([[1.0, -0.2]])], 0.5),
                         label="two layers, 6 weights, 3 removed: 0.05, 0.1, -0.2"),
                    Case(([tensor_arg([[0.5, -0.5], [0.5, 1.0]]), tensor_arg([[0.5]])], 0.4),
                         label="ties: four |w| = 0.5, 2 removed: the first two in flattened order"),
                    Case(([tensor_arg([[3.0, -1.0]])], 0), label="sparsity 0: everything kept"),
                    Case(([tensor_arg([[3.0, -1.0]])], 1.0), raises="ValueError",
                         label="sparsity 1.0",
                         hint="raise ValueError unless 0 <= sparsity < 1")),
            hidden=_hidden_global,
            references=("utils.pruning.global_magnitude_masks", "utils.pruning.magnitude_mask",
                        "utils.pruning._keep_largest"),
            hint="concatenate all |w| flattened, stable-sort ascending, mark the first "
                 "round(sparsity * total) as removed, then cut the flat mask back into the "
                 "layers' shapes"),
        Exercise(
            name="n_m_mask", points=2, title="N:M semi-structured sparsity",
            expected=_expected(_nm_ref), adapter=ADAPTER, compare=_mask_compare,
            public=(Case((tensor_arg([[0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.7, 0.4]]), 2, 4),
                         label="2:4 on 8 scores: two groups of 4"),
                    Case((tensor_arg([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 2.0]]), 2, 4),
                         label="ties: the earlier entries are kept"),
                    Case((tensor_arg([[1.0, 2.0, 3.0, 4.0]]), 3, 2), raises="ValueError",
                         label="n=3 > m=2", hint="raise ValueError when n > m"),
                    Case((tensor_arg([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]), 2, 4),
                         raises="ValueError", label="6 columns, m=4",
                         hint="the last dimension must be a multiple of m")),
            hidden=_hidden_nm,
            references=("utils.pruning.nm_mask",),
            hint="reshape to (-1, m) groups, stable-sort each group descending, keep the first n "
                 "positions (scatter True into a bool mask), reshape back"),
        Exercise(
            name="wanda_mask", points=3, title="Wanda: weight magnitude times input norm",
            expected=_expected(_wanda_ref), adapter=ADAPTER, compare=_mask_compare,
            public=(Case((tensor_arg([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]),
                          tensor_arg([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), 0.5),
                         label="equal input norms: plain per-row magnitude"),
                    Case((tensor_arg([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]),
                          tensor_arg([[10.0, 0.1, 0.1, 1.0], [-10.0, 0.1, -0.1, 1.0]]), 0.5),
                         label="a loud first feature saves its small weight in row 0"),
                    Case((tensor_arg([[0.5, -0.5, 0.5, 2.0]]), tensor_arg([[1.0, 1.0, 1.0, 0.0]]),
                          0.75), label="ties and a silent feature: 3 of 4 removed"),
                    Case((tensor_arg([[1.0, 2.0]]), tensor_arg([[1.0, 2.0, 3.0]]), 0.5),
                         raises="ValueError", label="x has 3 features, the weight 2 inputs",
                         hint="x must be (tokens, in_features) with the weight's in_features")),
            hidden=_hidden_wanda,
            references=("utils.pruning.wanda_scores", "utils.pruning.row_mask",
                        "utils.pruning.magnitude_mask", "utils.pruning._keep_largest",
                        "utils.pruning.input_norms_from_hessian"),
            hint="norm_j = ||x[:, j]||_2 (over tokens, dim 0); score = |W| * norm (broadcast over "
                 "rows); in each row stable-sort ascending and remove the first "
                 "round(sparsity * in_features)"),
        Exercise(
            name="prune_linear_pair", points=3,
            title="Structured pruning of a pair of linear layers",
            expected=_expected(_pair_ref), adapter=ADAPTER, compare=_pair_compare,
            public=(Case((tensor_arg([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0], [0.5, 0.5, 0.5],
                                      [-1.0, 3.0, 1.0]]),
                          tensor_arg([0.1, 0.2, 0.3, 0.4]),
                          tensor_arg([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]]), [0, 2]),
                         label="hidden 4 -> 2: rows 0 and 2 of W1 and b1, columns 0 and 2 of W2"),
                    Case((tensor_arg([[1.0], [2.0], [3.0]]), tensor_arg([0.0, 0.0, 0.0]),
                          tensor_arg([[1.0, 1.0, 1.0]]), [0, 0]), raises="ValueError",
                         label="duplicate index 0", hint="each kept channel once: ValueError"),
                    Case((tensor_arg([[1.0], [2.0], [3.0]]), tensor_arg([0.0, 0.0, 0.0]),
                          tensor_arg([[1.0, 1.0, 1.0]]), [1, 3]), raises="ValueError",
                         label="index 3 of 3 channels", hint="indices must lie in 0..hidden-1")),
            hidden=_hidden_pair,
            references=("utils.pruning.prune_mlp_channels", "utils.pruning._sliced_linear",
                        "utils.pruning.prune_attention_groups"),
            hint="W1[keep] and b1[keep] (the rows that produce the kept channels), W2[:, keep] "
                 "(the columns that read them)"),
        Exercise(
            name="break_even_sparsity_from_timings", points=2,
            title="The break-even sparsity of a sparse kernel",
            expected=_break_even_ref, compare=_break_even_compare,
            public=(Case(([0.5, 0.7, 0.9, 0.95], [10.0, 10.0, 10.0, 10.0], [40.0, 20.0, 8.0, 5.0]),
                         label="crossing between 0.7 and 0.9"),
                    Case(([0.5, 0.8, 0.9], [2.0, 2.0, 2.0], [9.0, 4.0, 2.0]),
                         label="equal at 0.9: the break-even is 0.9"),
                    Case(([0.5, 0.9], [1.0, 1.0], [3.0, 1.5]), label="sparse never wins: None"),
                    Case(([0.5, 0.9], [3.0, 3.0], [2.0, 1.0]),
                         label="sparse already wins at the first point: 0.5"),
                    Case(([0.9, 0.5], [1.0, 1.0], [2.0, 0.5]), raises="ValueError",
                         label="sparsities not increasing",
                         hint="raise ValueError unless sparsities strictly increase")),
            hidden=_hidden_break_even,
            references=("utils.pruning.break_even_sparsity",),
            hint="r_i = log(sparse_i / dense_i); r_0 <= 0: return s_0; at the first i with "
                 "r_i <= 0: s_{i-1} + (s_i - s_{i-1}) r_{i-1} / (r_{i-1} - r_i); none: None"),
        Exercise(
            name="ANSWER_SPEEDUP", points=1, kind="value",
            title="Does unstructured sparsity speed up a dense matmul?",
            expected=_speedup_answer, compare=choice(),
            public=(Case(label="your answer is one of 'a', 'b', 'c', 'd' (graded on submission)",
                         compare=one_of(SPEEDUP_OPTIONS), expected="a", graded=False),),
            hidden=lambda rng: [Case(label="the answer")],
            hint="what does a dense kernel do with a weight that happens to be 0?"),
    ),
)
