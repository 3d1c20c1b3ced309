"""Grading spec of lab 01, operator fusion and graph compilation (chapter 01).

Expected values come from the reference implementations in ``utils.fusion`` (imported inside
functions, so importing this spec stays cheap); the learner's answers must not merely call them.
Tensor and graph arguments are built from plain JSON by the adapters below, inside the sandbox.
Hidden cases are drawn from ``random.Random(SPEC.seed)``.
"""

from __future__ import annotations

from utils.labs.spec import (Case, Exercise, LabSpec, array_close, close,
                                 dict_close, exact, tensor_arg)

# --------------------------------------------------------------------------- 1: chain traffic


def _chain_counts(ops, numel, bytes_per_value=4):
    from utils.fusion import ElementwiseOp, chain_traffic

    if not ops:
        raise ValueError("ops must not be empty")
    chain = [ElementwiseOp(f"op{i}", int(n), int(f)) for i, (n, f) in enumerate(ops)]
    t = chain_traffic(chain, numel, bytes_per_value)
    return {"unfused_bytes": t["unfused_bytes"], "fused_bytes": t["fused_bytes"],
            "unfused_flops": t["flops"], "fused_flops": t["flops"],
            "speedup": t["unfused_bytes"] / t["fused_bytes"]}


def _hidden_chain(rng):
    cases = []
    for _ in range(5):
        length = rng.randint(1, 6)
        ops = [[rng.choice([1, 1, 1, 2, 3]), rng.choice([1, 2, 8, 20])] for _ in range(length)]
        cases.append(Case((ops, rng.choice([1, 1000, 2**20, 2**25])),
                          {"bytes_per_value": rng.choice([1, 2, 4])}))
    return cases + [Case(([], 100), raises="ValueError", label="empty chain"),
                    Case(([[1, 1]], -5), raises="ValueError", label="negative numel")]


# --------------------------------------------------------------------------- 2: the recurrence


def _online_update(m, d, block):
    import math

    if not block:
        raise ValueError("block must not be empty")
    m_new = max([m, *block])
    shift = 0.0 if m_new == -math.inf else m_new
    return [m_new, d * math.exp(m - shift) + sum(math.exp(x - shift) for x in block)]


def _update_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return close()(expected, got)
    if not isinstance(got, list) or len(got) != 2:
        return f"expected a list or tuple [m, d], got {got!r:.80}"
    for name, e, g in (("m", *[expected[0], got[0]]), ("d", expected[1], got[1])):
        reason = close(rel_tol=1e-9, abs_tol=1e-12)(e, g)
        if reason:
            return f"{name}: {reason}"
    return None


def _hidden_update(rng):
    cases = []
    for _ in range(5):
        m = round(rng.uniform(-5, 5), 3)
        d = round(rng.uniform(0.5, 20), 3)
        block = [round(rng.uniform(-10, 10) * rng.choice([1, 100]), 3)
                 for _ in range(rng.randint(1, 6))]
        cases.append(Case((m, d, block)))
    cases.append(Case((float("-inf"), 0.0, [700.0, 710.0]), label="first block, huge values"))
    return cases + [Case((0.0, 1.0, []), raises="ValueError", label="empty block")]


# --------------------------------------------------------------------------- 3: online softmax


def call_masked(fn, values, masked=(), block=4):
    """Adapter: ``fn(x, block=block)`` with ``x = tensor(values)`` and -inf at each ``[row, col]``
    of ``masked`` (JSON has no -inf)."""
    import torch

    x = torch.tensor(values, dtype=torch.float32)
    for row, col in masked:
        x[row, col] = float("-inf")
    return fn(x, block=block)


def _softmax_expected(values, masked=(), block=4):
    import torch

    return call_masked(lambda x, block: torch.softmax(x, dim=-1), values, masked, block)


def _rows(rng, rows, cols, scale):
    return [[round(rng.gauss(0, 1) * scale, 4) for _ in range(cols)] for _ in range(rows)]


def _hidden_softmax(rng):
    cases = [Case((_rows(rng, rng.randint(1, 4), rng.randint(1, 13), rng.choice([1, 10, 1000])),),
                  {"block": rng.choice([1, 3, 4, 16])}) for _ in range(4)]
    values = _rows(rng, 3, 9, 50)
    masked = [[r, c] for r in range(3) for c in range(9) if c > r + 2]  # causal-like
    cases.append(Case((values, masked), {"block": 2}, label="causal -inf mask, logits x50"))
    return cases


# --------------------------------------------------------------------------- 4: folding


def _fold_expected(W, b, g, beta):
    import torch

    from utils.fusion import fold_norm_into_linears

    from utils.labs.spec import _to_tensors

    W, b, g, beta = (_to_tensors(v).to(torch.float64) for v in (W, b, g, beta))
    lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
    norm = torch.nn.LayerNorm(W.shape[1], dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(W), lin.bias.copy_(b), norm.weight.copy_(g), norm.bias.copy_(beta)
    fold_norm_into_linears(norm, [lin])
    return [lin.weight.detach(), lin.bias.detach()]


def _fold_compare(expected, got):
    if not isinstance(got, list) or len(got) != 2:
        return f"expected a pair [W_folded, b_folded] of tensors, got {got!r:.80}"
    for name, e, g in (("W_folded", expected[0], got[0]), ("b_folded", expected[1], got[1])):
        reason = array_close(rtol=1e-5, atol=1e-6)(e, g)
        if reason:
            return f"{name}: {reason}"
    return None


def _fold_case(rng, n_out, n_in):
    def mat(r, c):
        return [[round(rng.uniform(-1, 1), 4) for _ in range(c)] for _ in range(r)]

    return Case((tensor_arg(mat(n_out, n_in), "float64"), tensor_arg(mat(1, n_out)[0], "float64"),
                 tensor_arg([round(rng.uniform(0.5, 1.5), 4) for _ in range(n_in)], "float64"),
                 tensor_arg(mat(1, n_in)[0], "float64")))


# --------------------------------------------------------------------------- 5: FX pass


def program_swiglu(a, b, c):
    return F_silu(a) * b + c


def program_swapped(a, b, c):
    return b * F_silu(a) - F_silu(c) * a


def program_shared(a, b, c):
    s = F_silu(a)  # two users: must NOT be rewritten
    return s * b + s


def program_none(a, b, c):
    return (a * b).relu() + c


def F_silu(x):  # noqa: N802 - spelled like the functional call it stands for
    import torch.nn.functional as F

    return F.silu(x)


PROGRAMS = ("program_swiglu", "program_swapped", "program_shared", "program_none")


def call_fx_pass(fn, program):
    """Adapter: trace ``program`` (one of ``PROGRAMS``) with ``torch.fx``, run the pass
    ``fn(gm)`` and report plainly what it did: its return value, the call_function targets left in
    the graph, and whether the rewritten graph computes the same as the program."""
    import torch

    from utils.labs.specs import lab01

    if program not in PROGRAMS:
        raise ValueError(f"program must be one of {PROGRAMS}")
    func = getattr(lab01, program)
    gm = torch.fx.symbolic_trace(func)  # F_silu is traced through: one F.silu node
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(5, generator=gen) for _ in range(3)]
    ref = func(*args)
    rewrites = fn(gm)
    ops = [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
           if n.op == "call_function"]
    return {"rewrites": rewrites, "ops": ops,
            "same_output": bool(torch.allclose(gm(*args), ref, atol=1e-6))}


def _fx_expected(program):
    from utils.fusion import fuse_silu_mul

    return call_fx_pass(fuse_silu_mul, program)


# --------------------------------------------------------------------------- 6: FlashAttention step


def call_flash_step(fn, m, l, o, scores, values):
    """Adapter: ``fn(m, l, o, scores, values)`` on float64 tensors made from the plain lists
    (m, l: (R,); o: (R, Dv); scores: (R, B); values: (B, Dv))."""
    import torch

    args = [torch.tensor(a, dtype=torch.float64) for a in (m, l, o, scores, values)]
    return fn(*args)


def _flash_expected(m, l, o, scores, values):
    from utils.fusion import flash_attention_update

    return list(call_flash_step(flash_attention_update, m, l, o, scores, values))


def _flash_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return close()(expected, got)
    if not isinstance(got, list) or len(got) != 3:
        return f"expected a tuple (m_new, l_new, o_new) of tensors, got {got!r:.80}"
    for name, e, g in zip(("m_new", "l_new", "o_new"), expected, got):
        reason = array_close(rtol=1e-9, atol=1e-12)(e, g)
        if reason:
            return f"{name}: {reason}"
    return None


def _flash_case(rng, rows, block, dv, first=False, masked=False, label=None):
    def r(scale=1.0):
        return round(rng.uniform(-1, 1) * scale, 4)

    scale = rng.choice([1, 10, 100])
    if first:
        m, l, o = [float("-inf")] * rows, [0.0] * rows, [[0.0] * dv for _ in range(rows)]
    else:
        m = [r(5) for _ in range(rows)]
        l = [round(rng.uniform(0.5, 20), 4) for _ in range(rows)]
        o = [[r(3) for _ in range(dv)] for _ in range(rows)]
    scores = [[r(scale) for _ in range(block)] for _ in range(rows)]
    if masked:  # mask all but one key of each row (m stays finite)
        for row in scores:
            keep = rng.randrange(block)
            for j in range(block):
                if j != keep:
                    row[j] = float("-inf")
    values = [[r(2) for _ in range(dv)] for _ in range(block)]
    return Case(([*m], l, o, scores, values), label=label)


def _hidden_flash(rng):
    cases = [_flash_case(rng, rng.randint(1, 4), rng.randint(1, 5), rng.randint(1, 4))
             for _ in range(4)]
    cases.append(_flash_case(rng, 3, 4, 2, first=True, label="first block (m = -inf, l = 0)"))
    cases.append(_flash_case(rng, 2, 5, 3, masked=True, label="-inf (masked) scores"))
    cases.append(Case(([0.0], [1.0], [[0.0, 0.0]], [[1.0, 2.0]], [[1.0, 2.0]]),
                      raises="ValueError", label="values with fewer rows than the block"))
    return cases


SPEC = LabSpec(
    lab="lab01",
    notebook="lab01_operator_fusion.ipynb",
    title="Lab 01: operator fusion and graph compilation",
    seed=2026_01, timeout_s=120, cell_timeout_s=30, call_timeout_s=20, memory_mb=4096,
    preimport=("torch",),
    exercises=(
        Exercise(
            name="chain_traffic_counts", points=3,
            title="Bytes and FLOPs of an element-wise chain, unfused vs fused",
            expected=_chain_counts, compare=dict_close(rel_tol=1e-9),
            public=(Case(([[1, 1], [1, 20], [1, 1], [2, 1]], 2**24),
                         label="bias + GELU + scale + residual on 2^24 fp32 values"),
                    Case(([[2, 1]], 10), {"bytes_per_value": 2}, label="one add of two fp16 tensors"),
                    Case(([[1, 1], [1, 1]], 0), raises="ValueError", label="numel=0",
                         hint="numel must be a positive int: raise ValueError")),
            hidden=_hidden_chain,
            references=("utils.fusion.chain_traffic", "utils.fusion.predicted_speedup"),
            hint="unfused: every op reads its tensor inputs and writes one output; fused: the "
                 "chain's external inputs once (first op's inputs + each later op's extra ones) "
                 "and one output; the FLOPs do not change"),
        Exercise(
            name="online_softmax_update", points=2, title="One step of the online-softmax recurrence",
            expected=_online_update, compare=_update_compare,
            public=(Case((float("-inf"), 0.0, [1.0, 3.0]), label="first block [1, 3]"),
                    Case((3.0, 1.1353352832366128, [2.0, 5.0]), label="then [2, 5]: the max moves"),
                    Case((5.0, 2.0, [-1.0, 4.0]), label="a block below the max"),
                    Case((0.0, 1.0, []), raises="ValueError", label="empty block",
                         hint="raise ValueError for an empty block")),
            hidden=_hidden_update,
            references=("utils.fusion.online_softmax_stats", "utils.fusion.softmax_online"),
            hint="m_new = max(m, max(block)); d_new = d * exp(m - m_new) + sum exp(x - m_new); "
                 "when m is -inf, exp(m - m_new) is 0"),
        Exercise(
            name="online_softmax", points=3, title="Online softmax over the last dimension",
            expected=_softmax_expected, compare=array_close(rtol=1e-5, atol=1e-6),
            adapter="utils.labs.specs.lab01:call_masked",
            public=(Case(([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]],), {"block": 4},
                         label="one row, two blocks"),
                    Case(([[1000.0, -1000.0, 999.0], [0.5, 0.25, 0.0]],), {"block": 2},
                         label="large magnitudes (naive softmax overflows)"),
                    Case(([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]], [[0, 3], [1, 0], [1, 1]]),
                         {"block": 1}, label="-inf mask entries, block 1")),
            hidden=_hidden_softmax,
            references=("utils.fusion.softmax_online", "utils.fusion.online_softmax_stats",
                        "utils.fusion.softmax_safe", "utils.fusion.softmax_naive",
                        "torch.softmax", "torch.nn.functional.softmax", "torch.logsumexp"),
            hint="carry (m, d) per row across blocks of the last dimension, then return "
                 "exp(x - m) / d; guard the -inf - -inf case"),
        Exercise(
            name="fold_layernorm_into_linear", points=2,
            title="Fold a LayerNorm's weight and bias into the next linear layer",
            expected=_fold_expected, compare=_fold_compare,
            adapter="utils.labs.spec:call_with_tensors",
            public=(Case((tensor_arg([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "float64"),
                          tensor_arg([0.1, 0.2, 0.3], "float64"),
                          tensor_arg([2.0, 0.5], "float64"), tensor_arg([1.0, -1.0], "float64")),
                         label="(3, 2) weight, g = [2, 0.5], beta = [1, -1]"),),
            hidden=lambda rng: [_fold_case(rng, rng.randint(1, 6), rng.randint(1, 6))
                                for _ in range(4)],
            references=("utils.fusion.fold_norm_into_linears", "utils.fusion.fold_llama_norms"),
            hint="W (g * n + beta) + b = (W diag g) n + (W beta + b): scale column j of W by g_j, "
                 "add W beta (with the original W) to b"),
        Exercise(
            name="fuse_silu_mul_pass", points=3, title="An FX pass: mul(silu(a), b) -> silu_mul(a, b)",
            expected=_fx_expected, compare=exact(),
            adapter="utils.labs.specs.lab01:call_fx_pass",
            public=(Case(("program_swiglu",), label="silu(a) * b + c"),
                    Case(("program_shared",), label="silu(a) used twice: leave it")),
            hidden=lambda rng: [Case((p,), label=p) for p in PROGRAMS],
            references=("utils.fusion.fuse_silu_mul",),
            hint="find call_function nodes whose target is operator.mul with a silu node (one "
                 "user) as either argument; insert silu_mul before it, replace_all_uses_with, "
                 "erase the mul then the silu, recompile; return the number of rewrites"),
        Exercise(
            name="flash_attention_step", points=3,
            title="One step of FlashAttention's output rescaling",
            expected=_flash_expected, compare=_flash_compare,
            adapter="utils.labs.specs.lab01:call_flash_step",
            public=(Case(([float("-inf")] * 2, [0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]],
                          [[1.0, 2.0], [0.0, -1.0]], [[1.0, 0.0], [0.0, 1.0]]),
                         label="first block: m = -inf, l = 0, O = 0"),
                    Case(([2.0, 0.0], [1.5, 1.2], [[0.5, 0.5], [1.0, -1.0]],
                          [[5.0, 1.0], [-1.0, -2.0]], [[2.0, 1.0], [0.0, 3.0]]),
                         label="row 0's max moves, row 1's does not"),
                    Case(([1.0], [2.0], [[1.0, 2.0, 3.0]], [[float("-inf"), 0.5, float("-inf")]],
                          [[1.0, 1.0, 1.0], [2.0, 0.0, -2.0], [5.0, 5.0, 5.0]]),
                         label="masked (-inf) keys in the block"),
                    Case(([0.0], [1.0], [[0.0]], [[1.0, 2.0]], [[1.0], [2.0], [3.0]]),
                         raises="ValueError", label="block of 2 scores, 3 value rows",
                         hint="raise ValueError when values.shape[0] != scores.shape[-1]")),
            hidden=_hidden_flash,
            references=("utils.fusion.flash_attention_update",
                        "utils.fusion.flash_attention_reference",
                        "torch.nn.functional.scaled_dot_product_attention",
                        "torch.softmax", "torch.nn.functional.softmax", "torch.logsumexp"),
            hint="m' = max(m, rowmax(S)); p = exp(S - m'); l' = l exp(m - m') + rowsum(p); "
                 "O' = (l exp(m - m') O + p @ V) / l'; when m is -inf, exp(m - m') is 0"),
    ),
)
