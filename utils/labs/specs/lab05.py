"""Grading spec of lab 05, low-rank factorization and KV-cache-shrinking attention (chapter 05).

Expected values come from the reference implementations in ``utils.lowrank`` and
``utils.roofline`` (imported inside functions, so importing this spec stays cheap and torch-free);
the learner's answers must not merely call them. Tensors travel as ``tensor_arg`` (plain JSON) and
are rebuilt by ``call_with_tensors``. Hidden cases are drawn from ``random.Random(SPEC.seed)``:
tall and wide random matrices (their spectra checked to have a clear gap at every rank asked, so
the best rank-r approximation is unique and stable in float32 too), exactly low-rank matrices,
rank = min(m, n), spectra with exact zeros (budget 0 gives the numerical rank), budgets placed
half-way between two tail errors (never on one), sizes where m n / (m + n) is an integer, the
published attention shapes (Llama-2-7B, Llama-3-8B, DeepSeek-V2), and bad arguments that must
raise ``ValueError``.
"""

from __future__ import annotations

import math

from utils.labs.spec import (Case, Exercise, LabSpec, _compare_raises, _show, array_close,
                             call_with_tensors, choice, close, dict_close, one_of, tensor_arg)

ADAPTER = "utils.labs.spec:call_with_tensors"

# Published attention shapes, the same numbers as utils.lowrank.PUBLISHED_CONFIGS and
# utils.lowrank.DEEPSEEK_V2 (written out so that importing the spec needs no torch).
LLAMA2_7B = {"kind": "mha", "layers": 32, "heads": 32, "head_dim": 128}
LLAMA3_8B = {"kind": "gqa", "layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128}
LLAMA3_8B_MQA = {"kind": "mqa", "layers": 32, "heads": 32, "head_dim": 128}
DEEPSEEK_V2_MLA = {"kind": "mla", "layers": 60, "latent": 512, "rope_dim": 64}


def _mat(rng, rows, cols, scale=1.0, digits=4):
    return [[round(rng.gauss(0, 1) * scale, digits) for _ in range(cols)] for _ in range(rows)]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _scalar_reason(got):
    if isinstance(got, dict) and "__array__" in got and got.get("shape") == []:
        return "return a plain Python number: call .item() on the 0-dim tensor (or int(...))"
    return None


def _number(rel_tol, abs_tol):
    """``close`` with a clearer reason when a 0-dim tensor comes back instead of a number."""
    inner = close(rel_tol, abs_tol)

    def compare(expected, got):
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        return _scalar_reason(got) or inner(expected, got)

    return compare


def _integer(expected, got):
    """An int equal to the expected one (a bool or a tensor is not an int)."""
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    reason = _scalar_reason(got)
    if reason:
        return reason
    if type(got) is not int:
        return f"expected the integer {expected}, got {_show(got)}"
    return None if got == expected else f"expected {expected}, got {got}"


# --------------------------------------------------------------------------- 1: best rank r


def _best_rank_ref(weight, rank):
    """W_r = A B from the reference, in float64 whatever the input dtype."""
    from utils.lowrank import truncated_svd

    def product(w, r):
        a, b = truncated_svd(w.double() if w.is_floating_point() else w, r)
        return a @ b

    return call_with_tensors(product, weight, rank)


def _gapped(rng, rows, cols, ranks, min_gap=0.05):
    """A random rows x cols matrix whose relative spectral gap (s_r - s_{r+1}) / s_1 is at least
    ``min_gap`` at every rank in ``ranks`` (redrawn until it is): W_r is then unique and a
    float32 SVD finds it to about 1e-6."""
    import torch

    for _ in range(200):
        w = _mat(rng, rows, cols)
        s = torch.linalg.svdvals(torch.tensor(w, dtype=torch.float64)).tolist() + [0.0]
        if all((s[r - 1] - s[r]) / s[0] >= min_gap for r in ranks):
            return w
    raise RuntimeError("no random matrix with a clear spectral gap: change the seed")


def _hidden_best_rank(rng):
    cases = []
    for rows, cols in ((7, 4), (3, 8), (6, 6), (9, 5), (4, 10)):
        rank = rng.randint(1, min(rows, cols) - 1)
        dtype = rng.choice(["float32", "float64"])
        cases.append(Case((tensor_arg(_gapped(rng, rows, cols, [rank]), dtype), rank),
                          label=f"random {rows}x{cols} ({dtype}), rank {rank}"))
    u = [[float(rng.randint(-3, 3)) for _ in range(2)] for _ in range(6)]
    v = [[float(rng.randint(-3, 3)) for _ in range(5)] for _ in range(2)]
    low = [[sum(u[i][k] * v[k][j] for k in range(2)) for j in range(5)] for i in range(6)]
    square = _gapped(rng, 4, 4, [1])
    return cases + [
        Case((tensor_arg(_gapped(rng, 5, 3, []), "float64"), 3),
             label="rank = min(m, n) = 3: W itself (error 0)"),
        Case((tensor_arg(_gapped(rng, 3, 6, []), "float64"), 3),
             label="a wide 3x6 matrix at rank 3 = min(m, n): W itself"),
        Case((tensor_arg(low, "float64"), 2), label="a 6x5 matrix of rank exactly 2, at rank 2: "
                                                    "W itself"),
        Case((tensor_arg(square, "float64"), 1), label="rank 1 of a 4x4 matrix: s_1 u_1 v_1^T"),
        Case((tensor_arg(square, "float64"), 0), raises="ValueError", label="rank 0"),
        Case((tensor_arg(square, "float64"), 5), raises="ValueError",
             label="rank 5 > min(m, n) = 4"),
        Case((tensor_arg(_mat(rng, 3, 7), "float64"), 4), raises="ValueError",
             label="rank 4 of a 3x7 matrix (> min(m, n) = 3)"),
        Case((tensor_arg(square, "float64"), 1.5), raises="ValueError", label="rank 1.5"),
        Case((tensor_arg(square, "float64"), True), raises="ValueError",
             label="rank True (a bool is not a rank)"),
        Case((tensor_arg([1.0, 2.0, 3.0], "float64"), 1), raises="ValueError",
             label="a 1-D weight")]


# --------------------------------------------------------------------------- 2: tail error


def _tail_ref(singular_values, rank):
    from utils.lowrank import tail_error

    def ref(s, r):
        if not _is_int(r) or not 0 <= r <= s.numel():
            raise ValueError(f"rank must be an integer in 0..{s.numel()}, got {r!r}")
        return tail_error(s, r)

    return call_with_tensors(ref, singular_values, rank)


def _spectrum(rng, length, digits=3):
    """``length`` distinct descending positive values."""
    while True:
        s = sorted((round(rng.uniform(0.01, 10.0), digits) for _ in range(length)), reverse=True)
        if len(set(s)) == length:
            return s


def _hidden_tail(rng):
    cases = []
    for _ in range(4):
        s = _spectrum(rng, rng.randint(2, 9))
        rank = rng.randint(1, len(s) - 1)
        cases.append(Case((tensor_arg(s, "float64"), rank),
                          label=f"{len(s)} random singular values, rank {rank}"))
    s = _spectrum(rng, 6)
    return cases + [
        Case((tensor_arg(s, "float64"), 0), label="rank 0: the whole ||W||_F"),
        Case((tensor_arg(s, "float64"), 6), label="rank = len(s): exactly 0"),
        Case((tensor_arg([3.0, 1.0, 0.0, 0.0], "float64"), 2),
             label="exact zeros at the tail: exactly 0"),
        Case((tensor_arg(_spectrum(rng, 5), "float32"), 2), label="float32 singular values"),
        Case((tensor_arg([1e8, 4e4, 3e4], "float64"), 1),
             label="s = [1e8, 4e4, 3e4], rank 1: the tail is 5e4, tiny against ||W||_F"),
        Case((tensor_arg(s, "float64"), -1), raises="ValueError", label="rank -1"),
        Case((tensor_arg(s, "float64"), 7), raises="ValueError", label="rank 7 > len(s) = 6"),
        Case((tensor_arg(s, "float64"), 2.0), raises="ValueError",
             label="rank 2.0 (a float is not a rank)"),
        Case((tensor_arg(s, "float64"), True), raises="ValueError", label="rank True")]


# --------------------------------------------------------------------------- 3: rank for a budget


def _budget_ref(singular_values, relative_error):
    from utils.lowrank import smallest_rank_for_error

    def ref(s, budget):
        if s.numel() and not s.abs().sum() > 0:
            raise ValueError("singular_values must not all be 0 (a zero matrix has no relative "
                             "error)")
        return smallest_rank_for_error(s, budget)

    return call_with_tensors(ref, singular_values, relative_error)


def _relative_tails(s):
    total = math.fsum(v * v for v in s)
    return [math.sqrt(math.fsum(v * v for v in s[r:]) / total) for r in range(len(s) + 1)]


def _hidden_budget(rng):
    cases = []
    for _ in range(5):
        s = _spectrum(rng, rng.randint(3, 10))
        tails = _relative_tails(s)
        r = rng.randint(1, len(s) - 1)  # budget half-way between tails[r] and tails[r - 1]
        budget = round((tails[r] + tails[r - 1]) / 2, 6)
        assert tails[r] + 1e-6 < budget < tails[r - 1] - 1e-6
        dtype = rng.choice(["float32", "float64"])
        cases.append(Case((tensor_arg(s, dtype), budget),
                          label=f"{len(s)} random singular values ({dtype}), budget {budget}"))
    decaying = [round(0.5 ** i, 6) for i in range(12)]
    tails = _relative_tails(decaying)
    budget = round((tails[4] + tails[3]) / 2, 6)
    return cases + [
        Case((tensor_arg(decaying, "float64"), budget),
             label=f"a spectrum halving at each step, budget {budget}"),
        Case((tensor_arg([5.0, 2.0, 1.0, 0.0, 0.0, 0.0], "float64"), 0.0),
             label="budget 0 with three exact zeros: the numerical rank, 3"),
        Case((tensor_arg([1.3, 0.7, 0.3, 0.1, 0.0, 0.0], "float64"), 0.0),
             label="budget 0, values not exact in binary, two exact zeros: 4"),
        Case((tensor_arg([1.0, 1.0, 1.0, 1.0], "float64"), 0.0),
             label="budget 0, no zero: full rank 4"),
        Case((tensor_arg([2.0, 2.0, 2.0, 2.0], "float64"), 0.6),
             label="four equal values, budget 0.6: tails 0.866, 0.707, 0.5 -> rank 3"),
        Case((tensor_arg([3.0], "float64"), 0.5), label="a single singular value: rank 1"),
        Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), 0.999),
             label="budget 0.999: rank 1 (rank 0 has error exactly 1)"),
        Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), 1.0), raises="ValueError",
             label="budget 1.0"),
        Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), -0.1), raises="ValueError",
             label="budget -0.1"),
        Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), True), raises="ValueError",
             label="budget True"),
        Case((tensor_arg([], "float64"), 0.1), raises="ValueError", label="no singular value"),
        Case((tensor_arg([0.0, 0.0], "float64"), 0.1), raises="ValueError",
             label="all singular values 0 (||W||_F = 0)")]


# --------------------------------------------------------------------------- 4: break-even rank


def _break_even_ref(m, n):
    from utils.lowrank import break_even_rank

    return break_even_rank(m, n)


def _hidden_break_even(rng):
    cases = [Case((m, n), label=f"m = {m}, n = {n}")
             for m, n in ((rng.randint(2, 60), rng.randint(2, 60)) for _ in range(4))]
    return cases + [
        Case((1, 1), label="1x1: no rank saves anything, 0"),
        Case((2, 2), label="2x2: m n / (m + n) = 1, so 0"),
        Case((3, 6), label="3x6: m n / (m + n) = 2 exactly, so 1"),
        Case((12, 4), label="12x4: m n / (m + n) = 3 exactly, so 2"),
        Case((1, 100), label="1x100: a single row, 0"),
        Case((4096, 4096), label="4096x4096 (Llama's q_proj)"),
        Case((11008, 4096), label="11008x4096 (Llama-2-7B's up_proj)"),
        Case((128256, 4096), label="128256x4096 (Llama 3's lm_head)"),
        Case((10**6, 10**6), label="10^6 x 10^6: m n / (m + n) = 500000 exactly"),
        Case((0, 8), raises="ValueError", label="m = 0"),
        Case((8, -2), raises="ValueError", label="n = -2"),
        Case((8.0, 8), raises="ValueError", label="m = 8.0 (a float)"),
        Case((True, 8), raises="ValueError", label="m = True")]


# --------------------------------------------------------------------------- 5: factored cost


def _cost_ref(m, n, rank, tokens=1):
    from utils.lowrank import lowrank_params

    for name, value in {"m": m, "n": n, "rank": rank, "tokens": tokens}.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if rank > min(m, n):
        raise ValueError(f"rank must be at most min(m, n) = {min(m, n)}, got {rank}")
    params = lowrank_params(m, n, rank)
    return {"params": params, "flops": 2 * tokens * params, "saving": 1 - params / (m * n)}


def _hidden_cost(rng):
    cases = []
    for _ in range(4):
        m, n = rng.randint(2, 5000), rng.randint(2, 5000)
        rank, tokens = rng.randint(1, min(m, n)), rng.choice([1, 7, 128, 4096])
        cases.append(Case((m, n, rank), {"tokens": tokens},
                          label=f"{m}x{n} at rank {rank}, {tokens} token(s)"))
    return cases + [
        Case((4096, 4096, 2048),
             label="4096x4096 at rank 2048 = m n / (m + n): a saving of exactly 0"),
        Case((11008, 4096, 1), label="rank 1"),
        Case((6, 4, 4), label="rank = min(m, n) = 4"),
        Case((6, 4, 5), raises="ValueError", label="rank 5 > min(m, n) = 4"),
        Case((6, 4, 0), raises="ValueError", label="rank 0"),
        Case((6, 4, 2), {"tokens": 0}, raises="ValueError", label="tokens = 0"),
        Case((6, -4, 2), raises="ValueError", label="n = -4")]


# --------------------------------------------------------------------------- 6: KV cache


_KV_KEYS = {"mha": ("layers", "heads", "head_dim"),
            "gqa": ("layers", "heads", "kv_heads", "head_dim"),
            "mqa": ("layers", "head_dim"),
            "mla": ("layers", "latent", "rope_dim")}


def _kv_ref(config, seq_len, batch_size=1, bytes_per_value=2):
    from utils.lowrank import mla_cache_bytes
    from utils.roofline import kv_cache_bytes

    if not isinstance(config, dict) or config.get("kind") not in _KV_KEYS:
        raise ValueError("config['kind'] must be one of 'mha', 'gqa', 'mqa', 'mla'")
    kind = config["kind"]
    for key in _KV_KEYS[kind]:
        if key not in config:
            raise ValueError(f"a {kind} config needs {key!r}")
        low = 0 if key == "rope_dim" else 1
        if not _is_int(config[key]) or config[key] < low:
            raise ValueError(f"config[{key!r}] must be an integer >= {low}")
    for name, value in {"seq_len": seq_len, "batch_size": batch_size}.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer")
    if isinstance(bytes_per_value, bool) or not isinstance(bytes_per_value, (int, float)) \
            or not 0 < bytes_per_value < math.inf:
        raise ValueError("bytes_per_value must be a positive finite number")
    c = config
    if kind == "mla":
        return mla_cache_bytes(c["layers"], c["latent"], c["rope_dim"], seq_len, batch_size,
                               bytes_per_value)
    if kind == "gqa" and c["heads"] % c["kv_heads"]:
        raise ValueError("kv_heads must divide heads")
    kv = {"mha": c.get("heads"), "gqa": c.get("kv_heads"), "mqa": 1}[kind]
    return kv_cache_bytes(c["layers"], kv, c["head_dim"], seq_len, batch_size, bytes_per_value)


def _hidden_kv(rng):
    cases = []
    sizes = [1, 2, 4, 0.5, 2]
    rng.shuffle(sizes)
    for kind, nbytes in zip(("mha", "gqa", "mqa", "mla", "gqa"), sizes):
        layers = rng.choice([2, 6, 24, 28, 40, 80])
        heads = rng.choice([8, 16, 32, 64])
        if kind == "mla":
            config = {"kind": "mla", "layers": layers, "latent": rng.choice([128, 256, 512]),
                      "rope_dim": rng.choice([32, 64])}
        else:
            config = {"kind": kind, "layers": layers, "heads": heads,
                      "head_dim": rng.choice([64, 96, 128])}
            if kind == "gqa":
                config["kv_heads"] = rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0])
        seq, batch = rng.choice([1, 512, 4096, 131072]), rng.choice([1, 3, 16])
        cases.append(Case((config, seq), {"batch_size": batch, "bytes_per_value": nbytes},
                          label=f"a random {kind} config, {seq} tokens, batch {batch}, "
                                f"{nbytes} bytes per value"))
    return cases + [
        Case((LLAMA3_8B_MQA, 4096), label="Llama-3-8B turned into MQA, 4096 tokens"),
        Case((LLAMA3_8B, 32768), {"batch_size": 8}, label="Llama-3-8B, 32k tokens, batch 8"),
        Case((dict(DEEPSEEK_V2_MLA, heads=128, head_dim=128), 32768),
             label="DeepSeek-V2's config with its extra keys (heads, head_dim): ignored"),
        Case(({"kind": "mla", "layers": 60, "latent": 512, "rope_dim": 0}, 4096),
             label="MLA without the decoupled RoPE key (rope_dim 0): the latent alone"),
        Case(({"kind": "gqa", "layers": 32, "heads": 32, "kv_heads": 32, "head_dim": 128}, 4096),
             label="GQA with as many KV heads as heads: MHA"),
        Case((LLAMA2_7B, 4096), {"bytes_per_value": 1}, label="Llama-2-7B with an int8 cache"),
        Case(({"kind": "gqa", "layers": 32, "heads": 32, "kv_heads": 6, "head_dim": 128}, 128),
             raises="ValueError", label="32 heads cannot share 6 KV heads"),
        Case(({"kind": "gqa", "layers": 32, "heads": 8, "kv_heads": 16, "head_dim": 128}, 128),
             raises="ValueError", label="more KV heads (16) than heads (8)"),
        Case(({"kind": "gqa", "layers": 32, "heads": 32, "head_dim": 128}, 128),
             raises="ValueError", label="a gqa config without kv_heads"),
        Case(({"kind": "mla", "layers": 60, "rope_dim": 64}, 128), raises="ValueError",
             label="an mla config without latent"),
        Case(({"kind": "mlp", "layers": 32, "heads": 32, "head_dim": 128}, 128),
             raises="ValueError", label="kind 'mlp'"),
        Case(({"layers": 32, "heads": 32, "head_dim": 128}, 128), raises="ValueError",
             label="no kind at all"),
        Case(({"kind": "mha", "layers": 0, "heads": 32, "head_dim": 128}, 128),
             raises="ValueError", label="0 layers"),
        Case(({"kind": "mla", "layers": 60, "latent": 512, "rope_dim": -64}, 128),
             raises="ValueError", label="rope_dim -64"),
        Case((LLAMA2_7B, 0), raises="ValueError", label="seq_len 0"),
        Case((LLAMA2_7B, 128), {"batch_size": 0}, raises="ValueError", label="batch_size 0"),
        Case((LLAMA2_7B, 128), {"bytes_per_value": 0}, raises="ValueError",
             label="bytes_per_value 0")]


# --------------------------------------------------------------------------- 7: pooled KV heads


def _pool_ref(weight, kv_heads, head_dim, groups):
    from utils.lowrank import pool_kv_heads

    def ref(w, kv, hd, g):
        for name, value in {"kv_heads": kv, "head_dim": hd, "groups": g}.items():
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return pool_kv_heads(w, kv, hd, g)

    return call_with_tensors(ref, weight, kv_heads, head_dim, groups)


def _hidden_pool(rng):
    cases = []
    for kv, groups in ((8, 2), (6, 3), (4, 1), (12, 4)):
        hd, n = rng.randint(1, 4), rng.randint(1, 6)
        dtype = rng.choice(["float32", "float64"])
        cases.append(Case((tensor_arg(_mat(rng, kv * hd, n), dtype), kv, hd, groups),
                          label=f"{kv} heads of {hd} rows, {n} inputs ({dtype}) into {groups} "
                                "group(s)"))
    return cases + [
        Case((tensor_arg(_mat(rng, 6, 3)), 3, 2, 3), label="groups = kv_heads: unchanged"),
        Case((tensor_arg(_mat(rng, 5, 4)), 5, 1, 1), label="head_dim 1, everything into 1 (MQA)"),
        Case((tensor_arg(_mat(rng, 8, 2)), 4, 2, 3), raises="ValueError",
             label="3 groups do not divide 4 heads"),
        Case((tensor_arg(_mat(rng, 8, 2)), 4, 3, 2), raises="ValueError",
             label="8 rows for 4 heads of 3"),
        Case((tensor_arg(_mat(rng, 8, 2)), 4, 2, 0), raises="ValueError", label="groups 0"),
        Case((tensor_arg(_mat(rng, 8, 2)), -4, -2, 2), raises="ValueError",
             label="kv_heads -4, head_dim -2 (their product is 8)"),
        Case((tensor_arg([1.0] * 8), 4, 2, 2), raises="ValueError", label="a 1-D weight")]


# --------------------------------------------------------------------------- 8: concept

ROPE_OPTIONS = ("a", "b", "c", "d")


def _rope_answer():
    return "b"


SPEC = LabSpec(
    lab="lab05",
    notebook="lab05_lowrank_attention.ipynb",
    title="Lab 05: low-rank factorization and KV-cache-shrinking attention",
    seed=5500, timeout_s=120, cell_timeout_s=30, call_timeout_s=10, memory_mb=4096,
    preimport=("torch",),
    exercises=(
        Exercise(
            name="best_rank_approximation", points=2, title="The best rank-r approximation",
            expected=_best_rank_ref, adapter=ADAPTER, compare=array_close(rtol=1e-5, atol=1e-5),
            public=(Case((tensor_arg([[3.0, 1.0, 1.0], [-1.0, 3.0, 1.0]], "float64"), 1),
                         label="a 2x3 matrix at rank 1"),
                    Case((tensor_arg([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], "float64"), 1),
                         label="diag(2, 1) padded to 3x2, rank 1: keep the 2"),
                    Case((tensor_arg([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), 2),
                         label="a tall 3x2 float32 matrix at rank 2 = min(m, n): itself"),
                    Case((tensor_arg([[1.0, 2.0], [3.0, 4.0]], "float64"), 3),
                         raises="ValueError", label="rank 3 of a 2x2 matrix",
                         hint="rank must be an integer in 1..min(m, n) (not a bool)")),
            hidden=_hidden_best_rank,
            references=("utils.lowrank.truncated_svd", "utils.lowrank.factor_linear",
                        "utils.lowrank.compress_model"),
            hint="U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False); "
                 "(U[:, :r] * S[:r]) @ Vh[:r]"),
        Exercise(
            name="eckart_young_error", points=1,
            title="The error of the best rank-r approximation, from the spectrum",
            expected=_tail_ref, adapter=ADAPTER, compare=_number(1e-6, 1e-9),
            public=(Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), 2),
                         label="s = [4, 3, 2, 1], rank 2: sqrt(4 + 1)"),
                    Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), 4),
                         label="rank 4 = len(s): 0"),
                    Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), 0),
                         label="rank 0: ||W||_F = sqrt(30)"),
                    Case((tensor_arg([4.0, 3.0], "float64"), 3), raises="ValueError",
                         label="rank 3 > len(s) = 2",
                         hint="rank must be an integer in 0..len(singular_values)")),
            hidden=_hidden_tail,
            references=("utils.lowrank.tail_error", "utils.lowrank.smallest_rank_for_error"),
            hint="sum the squares of the tail directly: s[rank:].double().pow(2).sum().sqrt()"
                 ".item() (not ||W||^2 minus the head: that cancels)"),
        Exercise(
            name="rank_for_error_budget", points=2,
            title="The smallest rank within a relative error budget",
            expected=_budget_ref, adapter=ADAPTER, compare=_integer,
            public=(Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), 0.5),
                         label="s = [4, 3, 2, 1], budget 0.5: tails 1, 0.683, 0.408, ... -> 2"),
                    Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), 0.1),
                         label="budget 0.1: rank 3 still errs 0.183 -> 4"),
                    Case((tensor_arg([4.0, 3.0, 2.0, 1.0, 0.0, 0.0], "float64"), 0.0),
                         label="budget 0 with two exact zeros: the numerical rank, 4",
                         hint="compare with a tolerance: tail / ||W||_F <= budget + 1e-12"),
                    Case((tensor_arg([4.0, 3.0, 2.0, 1.0], "float64"), 1.0), raises="ValueError",
                         label="budget 1.0",
                         hint="relative_error must be a number in [0, 1) (not a bool)")),
            hidden=_hidden_budget,
            references=("utils.lowrank.smallest_rank_for_error", "utils.lowrank.tail_error"),
            hint="tails[r] = sqrt(sum_{i >= r} s_i^2) / ||s||, for r = 0..len(s); return the "
                 "first r with tails[r] <= relative_error + 1e-12, as an int"),
        Exercise(
            name="largest_saving_rank", points=2, title="The break-even rank of a factored layer",
            expected=_break_even_ref, compare=_integer,
            public=(Case((4096, 4096), label="4096x4096"),
                    Case((4, 4), label="4x4: m n / (m + n) = 2 exactly, so 1",
                         hint="strictly fewer parameters: r (m + n) < m n; use integer "
                              "arithmetic, (m n - 1) // (m + n)"),
                    Case((11008, 4096), label="11008x4096 (Llama-2-7B's up_proj)"),
                    Case((0, 4), raises="ValueError", label="m = 0",
                         hint="m and n must be positive integers (not bools)")),
            hidden=_hidden_break_even,
            references=("utils.lowrank.break_even_rank", "utils.lowrank.rank_for_reduction",
                        "utils.lowrank.lowrank_params"),
            hint="the largest integer r with r (m + n) < m n is (m n - 1) // (m + n)"),
        Exercise(
            name="factored_linear_cost", points=1, title="What a factored layer costs",
            expected=_cost_ref, compare=dict_close(rel_tol=1e-9),
            public=(Case((4096, 4096, 1024), label="4096x4096 at rank 1024, one token"),
                    Case((11008, 4096, 512), {"tokens": 128},
                         label="11008x4096 at rank 512, 128 tokens"),
                    Case((4, 4, 3),
                         label="4x4 at rank 3: above the break-even, a negative saving"),
                    Case((4, 6, 5), raises="ValueError", label="rank 5 > min(m, n) = 4",
                         hint="m, n, rank, tokens positive integers, rank <= min(m, n)")),
            hidden=_hidden_cost,
            references=("utils.lowrank.lowrank_params", "utils.lowrank.break_even_rank"),
            hint="params = r (m + n); flops = 2 * tokens * params; saving = 1 - params / (m n)"),
        Exercise(
            name="kv_cache_size", points=3, title="KV-cache bytes of MHA, GQA, MQA and MLA",
            expected=_kv_ref, compare=_number(1e-9, 0.0),
            public=(Case((LLAMA2_7B, 4096), label="Llama-2-7B (MHA), 4096 tokens, fp16"),
                    Case((LLAMA3_8B, 4096), label="Llama-3-8B (GQA-8), 4096 tokens, fp16"),
                    Case((DEEPSEEK_V2_MLA, 4096), label="DeepSeek-V2 (MLA), 4096 tokens, fp16"),
                    Case((DEEPSEEK_V2_MLA, 32768), label="DeepSeek-V2 (MLA), 32k tokens, fp16"),
                    Case((LLAMA3_8B_MQA, 1024), {"batch_size": 4, "bytes_per_value": 4},
                         label="Llama-3-8B as MQA, 1024 tokens, batch 4, fp32"),
                    Case(({"kind": "gqa", "layers": 32, "heads": 32, "kv_heads": 5,
                           "head_dim": 128}, 4096), raises="ValueError",
                         label="32 heads, 5 KV heads",
                         hint="kv_heads must divide heads; raise ValueError, not KeyError, "
                              "for a missing key or an unknown kind")),
            hidden=_hidden_kv,
            references=("utils.roofline.kv_cache_bytes", "utils.lowrank.mla_cache_bytes",
                        "utils.roofline.model_kv_cache_bytes"),
            hint="MHA/GQA/MQA: 2 (K and V) x layers x kv_heads x head_dim x tokens x batch x "
                 "bytes, kv_heads = heads / kv_heads / 1; MLA: (latent + rope_dim) x layers x "
                 "tokens x batch x bytes (no 2: K and V share the latent)"),
        Exercise(
            name="pool_heads_into_groups", points=2,
            title="Mean-pooling K/V heads into groups (MHA -> GQA)",
            expected=_pool_ref, adapter=ADAPTER, compare=array_close(rtol=1e-6, atol=1e-6),
            public=(Case((tensor_arg([[1.0, 0.0], [0.0, 1.0], [3.0, 2.0], [2.0, 3.0]]), 4, 1, 2),
                         label="4 heads of 1 row into 2 groups: rows (0, 1) and (2, 3) averaged"),
                    Case((tensor_arg([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [8.0]]),
                          4, 2, 2), label="4 heads of 2 rows into 2 groups: heads (0, 1), (2, 3)"),
                    Case((tensor_arg([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]), 3, 2, 1),
                         label="3 heads of 2 rows into 1 (MQA)"),
                    Case((tensor_arg([[1.0], [2.0], [3.0], [4.0]]), 4, 1, 3), raises="ValueError",
                         label="3 groups for 4 heads",
                         hint="groups must divide kv_heads, and weight must have kv_heads x "
                              "head_dim rows")),
            hidden=_hidden_pool,
            references=("utils.lowrank.pool_kv_heads", "utils.lowrank.convert_kv_heads"),
            hint="weight.reshape(groups, kv_heads // groups, head_dim, n).mean(1)"
                 ".reshape(groups * head_dim, n)"),
        Exercise(
            name="ANSWER_DECOUPLED_ROPE", points=1, kind="value",
            title="Why MLA caches a separate RoPE key",
            expected=_rope_answer, compare=choice(),
            public=(Case(label="your answer is one of 'a', 'b', 'c', 'd' (graded on submission)",
                         compare=one_of(ROPE_OPTIONS), expected="a", graded=False),),
            hidden=lambda rng: [Case(label="the answer")],
            hint="write q_t^T k_s with the rotations in: what sits between W_UQ and W_UK, and "
                 "does it depend on the cached token's position?"),
    ),
)
