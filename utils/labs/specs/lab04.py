"""Grading spec of lab 04, knowledge distillation (chapter 04).

Expected values come from the reference implementations in ``utils.distillation`` (imported inside
functions, so importing this spec stays cheap); the learner's answers must not merely call them.
Logits travel as ``logits_arg`` (plain JSON: the values plus the flat indices that are ``-inf``,
since strict JSON has no infinity) and are rebuilt by ``call_with_logits``, which also turns
``{"__float__": "inf"}`` into a float. Hidden cases are drawn from ``random.Random(SPEC.seed)``:
random shapes and temperatures, logits of magnitude 1e4 (a naive ``exp`` overflows, a
``log(softmax)`` underflows to ``-inf``), ``-inf`` masks shared by teacher and student, in the
teacher only and in the student only (an infinite KL), vocabularies on both sides of the int16
index limit, and bad arguments that must raise ``ValueError``. Infinite expected values must come
back infinite (of the same sign); ``_tensor_close`` checks that and, where asked, the dtype.
"""

from __future__ import annotations

import math

from utils.labs.spec import (Case, Exercise, LabSpec, _compare_raises, _flatten, _fmt, _num,
                             _show, choice, dict_close, one_of)

ADAPTER = "utils.labs.specs.lab04:call_with_logits"
INF = {"__float__": "inf"}
NAN = {"__float__": "nan"}


# --------------------------------------------------------------------------- arguments


def logits_arg(values, masked=(), dtype: str = "float32") -> dict:
    """A tensor argument: ``torch.tensor(values, dtype)`` with ``-inf`` at the flat indices
    ``masked`` (JSON has no infinity)."""
    return {"__logits__": values, "dtype": dtype, "masked": sorted(masked)}


def _build(x):
    if isinstance(x, dict) and "__logits__" in x:
        import torch

        t = torch.tensor(x["__logits__"], dtype=getattr(torch, x["dtype"]))
        if x["masked"]:
            t.view(-1)[torch.tensor(x["masked"], dtype=torch.long)] = float("-inf")
        return t
    if isinstance(x, dict) and set(x) == {"__float__"}:
        return float(x["__float__"])
    if isinstance(x, list):
        return [_build(v) for v in x]
    if isinstance(x, dict):
        return {k: _build(v) for k, v in x.items()}
    return x


def call_with_logits(fn, *args, **kwargs):
    """Adapter: ``fn`` called with every ``logits_arg(...)`` turned into a torch tensor."""
    return fn(*_build(list(args)), **_build(kwargs))


def _expected(reference):
    """``expected(*plain_args)``: the reference called on tensors, in the grading process."""
    return lambda *args, **kwargs: call_with_logits(reference, *args, **kwargs)


def _rand(rng, shape, scale=1.0, digits=3):
    if len(shape) == 1:
        return [round(rng.gauss(0, 1) * scale, digits) for _ in range(shape[0])]
    return [_rand(rng, shape[1:], scale, digits) for _ in range(shape[0])]


def _rows(shape) -> int:
    return math.prod(shape[:-1])


def _mask(rng, shape, per_row, rows=None, avoid=()):
    """Flat indices of ``per_row`` masked columns in each of ``rows`` (default: every row),
    never at a flat index in ``avoid``."""
    v = shape[-1]
    out = []
    for r in (range(_rows(shape)) if rows is None else rows):
        free = [c for c in range(v) if r * v + c not in avoid]
        out += [r * v + c for c in rng.sample(free, per_row)]
    return out


def _shape(rng, vocab=(2, 9)):
    lead = rng.choice([[], [rng.randint(1, 4)], [rng.randint(1, 3), rng.randint(1, 3)]])
    return [*lead, rng.randint(*vocab)]


# --------------------------------------------------------------------------- comparisons


def _tensor_reason(expected, got, rtol, atol, dtype=None):
    if not (isinstance(got, dict) and "__array__" in got):
        return f"expected a tensor of shape {expected['shape']}, got {_show(got)}"
    if got["shape"] != expected["shape"]:
        return f"expected shape {expected['shape']}, got shape {got['shape']}"
    if dtype is not None and got.get("dtype") != dtype:
        return f"expected dtype {dtype}, got dtype {got.get('dtype')}"
    for i, (e, g) in enumerate(zip(_flatten(expected["__array__"]), _flatten(got["__array__"]))):
        e, g = _num(e), _num(g)
        where = f"element {i} (flat index)"
        if type(g) not in (int, float):
            return f"{where}: expected {_fmt(e)}, got {_show(g)}"
        if math.isnan(g):
            return f"{where}: expected {_fmt(e)}, got nan (0 * inf, inf - inf or exp overflow?)"
        if math.isinf(e) or math.isinf(g):
            if e != g:
                return f"{where}: expected {_fmt(e)}, got {_fmt(g)}"
            continue
        if abs(g - e) > atol + rtol * abs(e):
            return f"{where}: expected {_fmt(e)}, got {_fmt(g)} (rtol={rtol}, atol={atol})"
    return None


def _tensor_close(rtol: float = 1e-4, atol: float = 1e-5, dtype: str | None = None):
    """Tensors of the expected shape (and ``dtype`` when given), close elementwise; an infinite
    expected value must come back as the same infinity."""

    def compare(expected, got):
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        return _tensor_reason(expected, got, rtol, atol, dtype)

    return compare


def _topk_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    if not isinstance(got, list) or len(got) != 2:
        return f"expected a tuple (values, indices), got {_show(got)}"
    reason = _tensor_reason(expected[0], got[0], 1e-3, 0.0, "float16")
    if reason:
        return f"values: {reason}"
    reason = _tensor_reason(expected[1], got[1], 0.0, 0.0, expected[1]["dtype"])
    if reason:
        return f"indices: {reason}"
    return None


# --------------------------------------------------------------------------- 1: softmax at T


def _softmax_ref(logits, temperature):
    from utils.distillation import softmax_with_temperature

    return softmax_with_temperature(logits, temperature)


def _hidden_softmax(rng):
    cases = []
    for _ in range(4):
        shape, t = _shape(rng), rng.choice([0.5, 1.0, 2.0, 4.0, 10.0])
        scale = rng.choice([1.0, 3.0, 10.0])
        cases.append(Case((logits_arg(_rand(rng, shape, scale)), t),
                          label=f"random logits of shape {tuple(shape)}, T = {t}"))
    huge = [2, 7]
    cases += [Case((logits_arg(_rand(rng, huge, 1e4, 1)), 1.0),
                   label="logits of magnitude 1e4, T = 1 (exp overflows unless you shift)"),
              Case((logits_arg(_rand(rng, huge, 1e4, 1)), 0.5),
                   label="logits of magnitude 1e4, T = 0.5"),
              Case((logits_arg(_rand(rng, [3, 6], 2.0), _mask(rng, [3, 6], 2)), 2.0),
                   label="two -inf (masked) tokens per row, T = 2"),
              Case((logits_arg(_rand(rng, [2, 5], 5.0)), 0.05),
                   label="T = 0.05: nearly one-hot"),
              Case((logits_arg(_rand(rng, [4], 1.0)), 3), label="a single row, integer T = 3"),
              Case((logits_arg(_rand(rng, [2, 3])), 0.0), raises="ValueError",
                   label="temperature 0"),
              Case((logits_arg(_rand(rng, [2, 3])), -1.5), raises="ValueError",
                   label="temperature -1.5"),
              Case((logits_arg(_rand(rng, [2, 3])), INF), raises="ValueError",
                   label="temperature inf"),
              Case((logits_arg(_rand(rng, [2, 3])), NAN), raises="ValueError",
                   label="temperature nan"),
              Case((logits_arg(_rand(rng, [2, 3])), True), raises="ValueError",
                   label="temperature True (a bool is not a temperature)")]
    return cases


# --------------------------------------------------------------------------- 2, 3: KL


def _forward_ref(teacher_logits, student_logits, temperature=1.0):
    from utils.distillation import forward_kl

    return forward_kl(teacher_logits, student_logits, temperature)


def _reverse_ref(teacher_logits, student_logits, temperature=1.0):
    from utils.distillation import reverse_kl

    return reverse_kl(teacher_logits, student_logits, temperature)


def _hidden_kl(rng):
    cases = []
    for _ in range(3):
        shape, t = _shape(rng), rng.choice([0.5, 1.0, 2.0, 4.0])
        cases.append(Case((logits_arg(_rand(rng, shape, 2.0)), logits_arg(_rand(rng, shape, 2.0))),
                          {"temperature": t},
                          label=f"random logits of shape {tuple(shape)}, T = {t}"))
    shape = [3, 6]
    teacher = _rand(rng, shape, 1.0)
    close_student = [[round(v + rng.gauss(0, 1e-2), 4) for v in row] for row in teacher]
    shared = _mask(rng, shape, 2)
    one_sided = _mask(rng, shape, 1, rows=[0, 2])
    cases += [
        Case((logits_arg(_rand(rng, shape, 1e4, 1)), logits_arg(_rand(rng, shape, 1e4, 1))),
             label="logits of magnitude 1e4 (log(softmax) underflows to -inf: use log_softmax)"),
        Case((logits_arg(_rand(rng, shape, 1e4, 1)), logits_arg(_rand(rng, shape, 1e4, 1))),
             {"temperature": 4.0}, label="logits of magnitude 1e4, T = 4"),
        Case((logits_arg(teacher), logits_arg(close_student)),
             label="student = teacher + noise of 0.01: a KL close to 0"),
        Case((logits_arg(teacher), logits_arg(teacher)), {"temperature": 2.0},
             label="student = teacher: exactly 0"),
        Case((logits_arg(_rand(rng, shape), shared), logits_arg(_rand(rng, shape), shared)),
             {"temperature": 2.0},
             label="the same two tokens -inf in teacher and student (finite: 0 log 0 = 0)"),
        Case((logits_arg(_rand(rng, shape), one_sided), logits_arg(_rand(rng, shape))),
             label="-inf in the teacher only, rows 0 and 2"),
        Case((logits_arg(_rand(rng, shape)), logits_arg(_rand(rng, shape), one_sided)),
             label="-inf in the student only, rows 0 and 2"),
        Case((logits_arg(_rand(rng, [7])), logits_arg(_rand(rng, [7]))),
             label="one distribution of shape (7,): a 0-dim result"),
        Case((logits_arg(_rand(rng, [2, 3, 5])), logits_arg(_rand(rng, [2, 3, 5]))),
             {"temperature": 1.5}, label="(2, 3, 5) logits, T = 1.5"),
        Case((logits_arg(_rand(rng, [3, 5])), logits_arg(_rand(rng, [3, 4]))),
             raises="ValueError", label="teacher (3, 5), student (3, 4)"),
        Case((logits_arg(_rand(rng, [3, 5])), logits_arg(_rand(rng, [5, 3]))),
             raises="ValueError", label="teacher (3, 5), student (5, 3)"),
        Case((logits_arg(_rand(rng, [2, 4])), logits_arg(_rand(rng, [2, 4]))),
             {"temperature": 0}, raises="ValueError", label="temperature 0"),
        Case((logits_arg(_rand(rng, [2, 4])), logits_arg(_rand(rng, [2, 4]))),
             {"temperature": -2.0}, raises="ValueError", label="temperature -2")]
    return cases


# --------------------------------------------------------------------------- 4: the KD loss


def _kd_ref(student_logits, teacher_logits, labels=None, temperature=2.0, alpha=0.5):
    from utils.distillation import kd_loss

    return kd_loss(student_logits, teacher_logits, labels, temperature, alpha, t_squared=True)


def _labels(rng, shape, ignored=0, avoid=()):
    """Random labels (the logits' shape without V), ``ignored`` of them -100, never a flat
    logits index in ``avoid`` (a masked student token)."""
    v, rows = shape[-1], _rows(shape)
    flat = []
    for r in range(rows):
        flat.append(rng.choice([c for c in range(v) if r * v + c not in avoid]))
    for r in rng.sample(range(rows), ignored):
        flat[r] = -100
    return _nest(flat, shape[:-1])


def _nest(flat, shape):
    if len(shape) <= 1:
        return flat if shape else flat[0]
    step = len(flat) // shape[0]
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _hidden_kd(rng):
    cases = []
    for _ in range(3):
        shape = rng.choice([[rng.randint(2, 5), rng.randint(3, 8)],
                            [2, rng.randint(2, 4), rng.randint(3, 8)]])
        t, a = rng.choice([1.0, 2.0, 4.0]), rng.choice([0.1, 0.5, 1.0])
        labels = _labels(rng, shape, ignored=1)
        cases.append(Case((logits_arg(_rand(rng, shape, 2.0)), logits_arg(_rand(rng, shape, 2.0)),
                           logits_arg(labels, dtype="int64")), {"temperature": t, "alpha": a},
                          label=f"random logits {tuple(shape)}, one label -100, T = {t}, "
                                f"alpha = {a}"))
    shape = [4, 6]
    shared = _mask(rng, shape, 2)
    cases += [
        Case((logits_arg(_rand(rng, shape, 1e4, 1)), logits_arg(_rand(rng, shape, 1e4, 1)),
              logits_arg(_labels(rng, shape), dtype="int64")),
             label="logits of magnitude 1e4, default T = 2, alpha = 0.5"),
        Case((logits_arg(_rand(rng, shape), shared), logits_arg(_rand(rng, shape), shared),
              logits_arg(_labels(rng, shape, avoid=set(shared)), dtype="int64")),
             {"temperature": 3.0, "alpha": 0.25},
             label="two -inf tokens per row in both, labels on unmasked tokens, T = 3"),
        Case((logits_arg(_rand(rng, shape)), logits_arg(_rand(rng, shape))), {"temperature": 4.0},
             label="labels None: the soft term only, T = 4"),
        Case((logits_arg(_rand(rng, shape)), logits_arg(_rand(rng, shape)),
              logits_arg(_labels(rng, shape), dtype="int64")), {"alpha": 0.0, "temperature": 2.0},
             label="alpha = 0: the soft term only"),
        Case((logits_arg(_rand(rng, shape)), logits_arg(_rand(rng, shape)),
              logits_arg(_labels(rng, shape, ignored=3), dtype="int64")), {"temperature": 1.0},
             label="T = 1 (no T^2 effect), three labels -100"),
        Case((logits_arg(_rand(rng, [6])), logits_arg(_rand(rng, [6])),
              logits_arg(_labels(rng, [6]), dtype="int64")), {"temperature": 2.0},
             label="one position of shape (6,), a 0-dim label"),
        Case((logits_arg(_rand(rng, shape)), logits_arg(_rand(rng, [4, 5]))),
             raises="ValueError", label="student (4, 6), teacher (4, 5)"),
        Case((logits_arg(_rand(rng, shape)), logits_arg(_rand(rng, shape)),
              logits_arg([0, 1, 2], dtype="int64")), raises="ValueError",
             label="3 labels for 4 positions"),
        Case((logits_arg(_rand(rng, shape)), logits_arg(_rand(rng, shape))),
             {"temperature": 0.0}, raises="ValueError", label="temperature 0")]
    return cases


# --------------------------------------------------------------------------- 5: the top-k cache


def _cache_ref(teacher_logits, k):
    import torch

    from utils.distillation import index_bytes

    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in 1..{vocab}, got {k!r}")
    top = teacher_logits.float().topk(k, dim=-1)
    dtype = torch.int16 if index_bytes(vocab) == 2 else torch.int32
    return top.values.half(), top.indices.to(dtype)


def _distinct(rng, shape):
    """Logits with distinct values, multiples of 0.01 below 9 in magnitude (exact enough in
    fp16 that no two top values tie after the cast)."""
    return _nest([v / 100 for v in rng.sample(range(-900, 900), _rows(shape) * shape[-1])],
                 shape)


def _big_vocab(rng, vocab, k):
    """One row over ``vocab`` tokens: small integers, then k + 2 distinct large values planted,
    one of them at the last token id."""
    row = [float(rng.randint(-9, 0)) for _ in range(vocab)]
    spots = rng.sample(range(vocab - 1), k + 1) + [vocab - 1]
    for value, spot in zip(rng.sample(range(10, 60), k + 2), spots):
        row[spot] = float(value)
    return [row]


def _hidden_cache(rng):
    cases = []
    for _ in range(3):
        shape = [rng.randint(1, 4), rng.randint(3, 12)]
        k = rng.randint(1, shape[1])
        cases.append(Case((logits_arg(_distinct(rng, shape)), k),
                          label=f"random distinct logits {tuple(shape)}, k = {k}"))
    cases += [Case((logits_arg(_distinct(rng, [2, 3, 7])), 3),
                   label="(2, 3, 7) logits (batch, sequence, vocabulary), k = 3"),
              Case((logits_arg(_distinct(rng, [2, 5])), 5), label="k = V: every token, sorted"),
              Case((logits_arg(_distinct(rng, [3, 6])), 1), label="k = 1: the argmax"),
              Case((logits_arg(_big_vocab(rng, 32768, 4)), 4),
                   label="V = 32768: ids up to 32767 still fit int16"),
              Case((logits_arg(_big_vocab(rng, 32769, 4)), 4),
                   label="V = 32769: id 32768 needs int32"),
              Case((logits_arg(_distinct(rng, [2, 4])), 0), raises="ValueError", label="k = 0"),
              Case((logits_arg(_distinct(rng, [2, 4])), 5), raises="ValueError",
                   label="k = 5 > V = 4"),
              Case((logits_arg(_distinct(rng, [2, 4])), 2.0), raises="ValueError",
                   label="k = 2.0 (not an int)"),
              Case((logits_arg(_distinct(rng, [2, 4])), True), raises="ValueError",
                   label="k = True")]
    return cases


# --------------------------------------------------------------------------- 6: KL from the cache


def _topk_kl_ref(values, indices, student_logits, temperature=1.0):
    from utils.distillation import topk_forward_kl

    vocab = student_logits.shape[-1]
    if indices.is_floating_point() or indices.numel() and not (
            0 <= int(indices.min()) and int(indices.max()) < vocab):
        raise ValueError(f"indices must be integer token ids in 0..{vocab - 1}")
    return topk_forward_kl(values, indices, student_logits, temperature)


def _cached(rng, positions, vocab, k, scale=2.0):
    """(teacher values (..., k) sorted descending, their ids) for ``positions`` rows."""
    values, ids = [], []
    for _ in range(positions):
        row = [v / 100 * scale for v in rng.sample(range(-400, 400), vocab)]
        order = sorted(range(vocab), key=lambda c: -row[c])[:k]
        values.append([round(row[c], 3) for c in order])
        ids.append(order)
    return values, ids


def _hidden_topk_kl(rng):
    cases = []
    for _ in range(3):
        n, v = rng.randint(1, 4), rng.randint(4, 12)
        k, t = rng.randint(1, v), rng.choice([1.0, 2.0, 4.0])
        index_dtype = rng.choice(["int16", "int32", "int64"])
        values, ids = _cached(rng, n, v, k)
        cases.append(Case((logits_arg(values, dtype="float16"),
                           logits_arg(ids, dtype=index_dtype),
                           logits_arg(_rand(rng, [n, v], 2.0))), {"temperature": t},
                          label=f"{n} positions, V = {v}, k = {k} (fp16 values, {index_dtype} "
                                f"ids), T = {t}"))
    values, ids = _cached(rng, 3, 6, 6)
    cases.append(Case((logits_arg(values), logits_arg(ids, dtype="int64"),
                       logits_arg(_rand(rng, [3, 6]))), {"temperature": 2.0},
                      label="k = V: the full forward KL, T = 2"))
    values, ids = _cached(rng, 4, 8, 1)
    cases.append(Case((logits_arg(values), logits_arg(ids, dtype="int64"),
                       logits_arg(_rand(rng, [4, 8]))), label="k = 1: -log q at the argmax"))
    flat_v, flat_i = _cached(rng, 6, 7, 3)
    cases.append(Case((logits_arg([flat_v[:3], flat_v[3:]], dtype="float16"),
                       logits_arg([flat_i[:3], flat_i[3:]], dtype="int16"),
                       logits_arg(_rand(rng, [2, 3, 7]))),
                      label="(2, 3, 7) student logits, k = 3"))
    values, ids = _cached(rng, 3, 6, 3)
    hit = [0 * 6 + ids[0][1], 2 * 6 + ids[2][0]]  # a cached token -inf in the student
    miss = [r * 6 + next(c for c in range(6) if c not in ids[r]) for r in range(3)]
    cases += [Case((logits_arg(values), logits_arg(ids, dtype="int64"),
                    logits_arg(_rand(rng, [3, 6]), hit)),
                   label="the student -inf at a cached token in rows 0 and 2"),
              Case((logits_arg(values), logits_arg(ids, dtype="int64"),
                    logits_arg(_rand(rng, [3, 6]), miss)),
                   label="the student -inf only at tokens outside the cache (finite)"),
              Case((logits_arg(values), logits_arg(ids, dtype="int64"),
                    logits_arg(_rand(rng, [3, 6], 1e4, 1))),
                   label="student logits of magnitude 1e4"),
              Case((logits_arg(values), logits_arg([row[:2] for row in ids], dtype="int64"),
                    logits_arg(_rand(rng, [3, 6]))), raises="ValueError",
                   label="values (3, 3), indices (3, 2)"),
              Case((logits_arg(values), logits_arg(ids, dtype="int64"),
                    logits_arg(_rand(rng, [2, 6]))), raises="ValueError",
                   label="3 cached positions, 2 student positions"),
              Case((logits_arg(values), logits_arg([[0, 1, 6]] * 3, dtype="int64"),
                    logits_arg(_rand(rng, [3, 6]))), raises="ValueError",
                   label="token id 6 with V = 6"),
              Case((logits_arg(values), logits_arg(ids, dtype="int64"),
                    logits_arg(_rand(rng, [3, 6]))), {"temperature": -1.0}, raises="ValueError",
                   label="temperature -1")]
    return cases


# --------------------------------------------------------------------------- 7: cache bytes


def _bytes_ref(tokens, k, vocab_size, value_bytes=2):
    from utils.distillation import topk_cache_bytes

    for name, value in (("value_bytes", value_bytes), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(k, int) and not isinstance(k, bool) and k > vocab_size:
        raise ValueError(f"k must be at most vocab_size={vocab_size}, got {k}")
    return topk_cache_bytes(tokens, k, vocab_size, value_bytes)


def _hidden_bytes(rng):
    cases = [Case((rng.choice([1, 1000, 2**20, 10**9]), rng.choice([1, 8, 32, 64]),
                   rng.choice([4096, 32000, 50257, 128256])), {"value_bytes": rng.choice([2, 4])},
                  label="a random cache") for _ in range(3)]
    return cases + [
        Case((10**6, 32, 32768), label="V = 32768: 2-byte ids"),
        Case((10**6, 32, 32769), label="V = 32769: 4-byte ids"),
        Case((5, 1, 2), {"value_bytes": 1}, label="tiny: 5 tokens, k = 1, V = 2, 1-byte values"),
        Case((100, 4096, 4096), label="k = V: the cache is larger than the full distribution"),
        Case((0, 32, 4096), raises="ValueError", label="tokens = 0"),
        Case((100, 0, 4096), raises="ValueError", label="k = 0"),
        Case((100, 8, 0), raises="ValueError", label="vocab_size = 0"),
        Case((100, 8.0, 4096), raises="ValueError", label="k = 8.0 (not an int)"),
        Case((100, 5000, 4096), raises="ValueError", label="k = 5000 > vocab_size 4096"),
        Case((100, 8, 4096), {"value_bytes": 0}, raises="ValueError", label="value_bytes = 0")]


# --------------------------------------------------------------------------- 8: the gradient


def _grad_ref(teacher_logits, student_logits, temperature=1.0):
    from utils.distillation import forward_kl

    z = student_logits.detach().float().clone().requires_grad_(True)
    forward_kl(teacher_logits.detach(), z, temperature).sum().backward()
    return z.grad


def _hidden_grad(rng):
    cases = []
    for _ in range(4):
        shape, t = _shape(rng), rng.choice([0.5, 1.0, 2.0, 4.0, 8.0])
        cases.append(Case((logits_arg(_rand(rng, shape, 2.0)), logits_arg(_rand(rng, shape, 2.0))),
                          {"temperature": t},
                          label=f"random logits of shape {tuple(shape)}, T = {t}"))
    shape = [3, 6]
    shared = _mask(rng, shape, 2)
    return cases + [
        Case((logits_arg(_rand(rng, shape, 1e4, 1)), logits_arg(_rand(rng, shape, 1e4, 1))),
             {"temperature": 2.0}, label="logits of magnitude 1e4, T = 2"),
        Case((logits_arg(_rand(rng, shape), shared), logits_arg(_rand(rng, shape), shared)),
             {"temperature": 2.0}, label="the same two tokens -inf in both (gradient 0 there)"),
        Case((logits_arg(_rand(rng, shape), _mask(rng, shape, 1)), logits_arg(_rand(rng, shape))),
             label="-inf in the teacher only"),
        Case((logits_arg(_rand(rng, [2, 5])), logits_arg(_rand(rng, [2, 5]))),
             {"temperature": 100.0}, label="T = 100: tiny gradients"),
        Case((logits_arg(_rand(rng, [3, 5])), logits_arg(_rand(rng, [3, 4]))),
             raises="ValueError", label="teacher (3, 5), student (3, 4)"),
        Case((logits_arg(_rand(rng, [2, 4])), logits_arg(_rand(rng, [2, 4]))),
             {"temperature": 0.0}, raises="ValueError", label="temperature 0"),
        Case((logits_arg(_rand(rng, [2, 4])), logits_arg(_rand(rng, [2, 4]))),
             {"temperature": INF}, raises="ValueError", label="temperature inf")]


# --------------------------------------------------------------------------- 9: concept

T_SQUARED_OPTIONS = ("a", "b", "c", "d")


def _t_squared_answer():
    return "c"


SPEC = LabSpec(
    lab="lab04",
    notebook="lab04_distillation.ipynb",
    title="Lab 04: knowledge distillation",
    seed=4400, timeout_s=120, cell_timeout_s=30, call_timeout_s=10, memory_mb=4096,
    preimport=("torch",),
    exercises=(
        Exercise(
            name="tempered_softmax", points=2, title="Softmax with a temperature",
            expected=_expected(_softmax_ref), adapter=ADAPTER, compare=_tensor_close(1e-4, 1e-6),
            public=(Case((logits_arg([[1.0, 2.0, 3.0]]), 1.0), label="[1, 2, 3] at T = 1"),
                    Case((logits_arg([[1.0, 2.0, 3.0]]), 4.0),
                         label="[1, 2, 3] at T = 4: flatter"),
                    Case((logits_arg([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]]), 2.0),
                         label="logits of magnitude 1e4 (exp(1e4) overflows)",
                         hint="subtract the row's maximum (after dividing by T) before exp"),
                    Case((logits_arg([[0.5, 1.5, 2.5, 0.0]], [1, 3]), 1.0),
                         label="two -inf (masked) tokens: probability exactly 0"),
                    Case((logits_arg([[1.0, 2.0]]), 0), raises="ValueError",
                         label="temperature 0",
                         hint="raise ValueError unless temperature is a finite number > 0 "
                              "(and not a bool)")),
            hidden=_hidden_softmax,
            references=("utils.distillation.softmax_with_temperature",
                        "utils.distillation._log_probs", "torch.softmax", "torch.log_softmax",
                        "torch.logsumexp", "torch.special.softmax", "torch.special.log_softmax",
                        "torch.special.logsumexp"),
            hint="z = logits / T; z = z - z.max(-1, keepdim=True).values; e = exp(z); "
                 "return e / e.sum(-1, keepdim=True)"),
        Exercise(
            name="kl_forward", points=2, title="Forward KL(p_T || q_T) per position",
            expected=_expected(_forward_ref), adapter=ADAPTER, compare=_tensor_close(),
            public=(Case((logits_arg([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
                          logits_arg([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]])),
                         label="two positions, V = 3, T = 1"),
                    Case((logits_arg([[2.0, 1.0, 0.0]]), logits_arg([[0.0, 1.0, 2.0]])),
                         {"temperature": 4.0}, label="the same first position at T = 4"),
                    Case((logits_arg([[1e4, 0.0, -1e4]]), logits_arg([[-1e4, 0.0, 1e4]])),
                         label="logits of magnitude 1e4: a finite KL near 2e4",
                         hint="log(softmax) gives log 0 = -inf here; log_softmax does not"),
                    Case((logits_arg([[1.0, 2.0, 0.5, 0.0]], [3]),
                          logits_arg([[0.0, 1.0, 2.0, 3.0]], [3])),
                         label="token 3 masked (-inf) in both: finite",
                         hint="0 log 0 = 0: keep only the terms where p > 0 (torch.where)"),
                    Case((logits_arg([[1.0, 2.0, 0.5]]), logits_arg([[0.0, 1.0, 2.0]], [0])),
                         label="the student gives -inf where the teacher has mass: inf"),
                    Case((logits_arg([[1.0, 2.0]]), logits_arg([[1.0, 2.0, 3.0]])),
                         raises="ValueError", label="teacher (1, 2), student (1, 3)",
                         hint="raise ValueError naming both logits when the shapes differ")),
            hidden=_hidden_kl,
            references=("utils.distillation.forward_kl", "utils.distillation.reverse_kl",
                        "utils.distillation.divergence", "utils.distillation._kl_from_log_probs",
                        "utils.distillation.topk_forward_kl"),
            hint="log_p = log_softmax(teacher / T), log_q = log_softmax(student / T); "
                 "sum over the last dim of where(p > 0, p * (log_p - log_q), 0)"),
        Exercise(
            name="kl_reverse", points=1, title="Reverse KL(q_T || p_T) per position",
            expected=_expected(_reverse_ref), adapter=ADAPTER, compare=_tensor_close(),
            public=(Case((logits_arg([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
                          logits_arg([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]])),
                         label="two positions, V = 3, T = 1"),
                    Case((logits_arg([[1.0, 2.0, 0.5]]), logits_arg([[0.0, 1.0, 2.0]], [0])),
                         label="the student -inf where the teacher has mass: finite now"),
                    Case((logits_arg([[1.0, 2.0, 0.5]], [2]), logits_arg([[0.0, 1.0, 2.0]])),
                         label="the teacher -inf where the student has mass: inf"),
                    Case((logits_arg([[1.0, 2.0]]), logits_arg([[1.0, 2.0]])),
                         {"temperature": -1.0}, raises="ValueError", label="temperature -1")),
            hidden=_hidden_kl,
            references=("utils.distillation.forward_kl", "utils.distillation.reverse_kl",
                        "utils.distillation.divergence", "utils.distillation._kl_from_log_probs",
                        "utils.distillation.topk_forward_kl"),
            hint="the same sum with the roles swapped: where(q > 0, q * (log_q - log_p), 0) "
                 "(your kl_forward with its arguments swapped)"),
        Exercise(
            name="distillation_loss", points=3, title="Hinton's distillation loss with T^2",
            expected=_expected(_kd_ref), adapter=ADAPTER, compare=_tensor_close(),
            public=(Case((logits_arg([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]]),
                          logits_arg([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
                          logits_arg([2, 0], dtype="int64")),
                         label="2 positions, labels [2, 0], default T = 2, alpha = 0.5"),
                    Case((logits_arg([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]]),
                          logits_arg([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
                          logits_arg([2, -100], dtype="int64")),
                         {"temperature": 4.0, "alpha": 1.0},
                         label="label -100 is left out of the cross-entropy; T = 4, alpha = 1"),
                    Case((logits_arg([[0.0, 1.0, 2.0]]), logits_arg([[2.0, 1.0, 0.0]])),
                         {"temperature": 3.0}, label="labels None: T^2 x mean KL only"),
                    Case((logits_arg([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]]),
                          logits_arg([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
                          logits_arg([2, 0, 1], dtype="int64")), raises="ValueError",
                         label="3 labels for 2 positions",
                         hint="labels must have the logits' shape without the vocabulary")),
            hidden=_hidden_kd,
            references=("utils.distillation.kd_loss", "utils.distillation.forward_kl",
                        "utils.distillation.divergence", "utils.distillation._kl_from_log_probs",
                        "utils.distillation.kd_objective"),
            hint="T**2 * kl_forward(teacher, student, T).mean() + alpha * "
                 "F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100) "
                 "(the cross-entropy at T = 1; skip it when labels is None or alpha == 0)"),
        Exercise(
            name="cache_topk", points=2, title="A teacher's top-k cache entry",
            expected=_expected(_cache_ref), adapter=ADAPTER, compare=_topk_compare,
            public=(Case((logits_arg([[0.5, 3.0, -1.0, 2.0, 1.0], [4.0, -2.0, 0.25, 1.5, 3.5]]), 2),
                         label="(2, 5) logits, k = 2"),
                    Case((logits_arg([[0.1, 0.7, 0.3, 0.9, 0.5, -0.2]]), 3),
                         label="k = 3: values descending, ids as int16"),
                    Case((logits_arg([[1.0, 2.0, 3.0]]), 4), raises="ValueError",
                         label="k = 4 > V = 3", hint="k must be an integer in 1..V")),
            hidden=_hidden_cache,
            references=("utils.distillation.build_topk_cache", "utils.distillation.index_bytes"),
            hint="top = logits.float().topk(k, dim=-1); values as float16; ids as int16 when "
                 "V <= 2**15 (every id <= 32767), else int32"),
        Exercise(
            name="kl_from_topk", points=2, title="The KL from a top-k cache",
            expected=_expected(_topk_kl_ref), adapter=ADAPTER, compare=_tensor_close(),
            public=(Case((logits_arg([[2.0, 1.0], [0.5, 0.0]], dtype="float16"),
                          logits_arg([[0, 2], [1, 3]], dtype="int16"),
                          logits_arg([[1.0, 0.0, 2.0, -1.0], [0.0, 1.0, 0.0, 0.5]])),
                         label="k = 2 of V = 4, fp16 values, int16 ids",
                         hint="compute in float32 (values.float()); gather the student's "
                              "log-probabilities at indices.long()"),
                    Case((logits_arg([[3.0, 1.0, 0.0]]), logits_arg([[2, 0, 1]], dtype="int64"),
                          logits_arg([[0.0, 1.0, 2.0]])), {"temperature": 2.0},
                         label="k = V = 3: the full forward KL, T = 2"),
                    Case((logits_arg([[2.0, 1.0]]), logits_arg([[0, 2]], dtype="int64"),
                          logits_arg([[1.0, 0.0, 2.0]], [2])),
                         label="the student -inf at a cached token: inf"),
                    Case((logits_arg([[2.0, 1.0]]), logits_arg([[0, 1, 2]], dtype="int64"),
                          logits_arg([[1.0, 0.0, 2.0]])), raises="ValueError",
                         label="values (1, 2), indices (1, 3)",
                         hint="values and indices must both be (..., k), with the student's "
                              "positions")),
            hidden=_hidden_topk_kl,
            references=("utils.distillation.topk_forward_kl", "utils.distillation.forward_kl",
                        "utils.distillation._kl_from_log_probs", "utils.distillation._log_probs",
                        "utils.distillation.cached_kd_objective"),
            hint="log_p = log_softmax(values.float() / T) over the k entries; "
                 "log_q = log_softmax(student.float() / T).gather(-1, indices.long()); "
                 "sum where(p > 0, p * (log_p - log_q), 0)"),
        Exercise(
            name="teacher_cache_bytes", points=1, title="What the cache saves",
            expected=_bytes_ref, compare=dict_close(rel_tol=1e-9),
            public=(Case((1000, 32, 4096), label="1000 tokens, k = 32, V = 4096, fp16"),
                    Case((10**9, 32, 128256), label="a billion tokens over Llama 3's vocabulary"),
                    Case((1000, 32, 4096), {"value_bytes": 4}, label="fp32 values"),
                    Case((1000, 0, 4096), raises="ValueError", label="k = 0",
                         hint="tokens, k, vocab_size, value_bytes: positive integers, "
                              "k <= vocab_size")),
            hidden=_hidden_bytes,
            references=("utils.distillation.topk_cache_bytes", "utils.distillation.index_bytes"),
            hint="full = tokens * V * value_bytes; top-k = tokens * k * (value_bytes + id bytes), "
                 "id bytes 2 when V <= 2**15 else 4; ratio = full / top-k"),
        Exercise(
            name="soft_logit_gradient", points=2,
            title="The soft term's gradient in closed form",
            expected=_expected(_grad_ref), adapter=ADAPTER, compare=_tensor_close(1e-4, 1e-6),
            public=(Case((logits_arg([[2.0, 1.0, 0.0]]), logits_arg([[0.0, 1.0, 2.0]])),
                         label="V = 3, T = 1"),
                    Case((logits_arg([[2.0, 1.0, 0.0]]), logits_arg([[0.0, 1.0, 2.0]])),
                         {"temperature": 4.0}, label="the same at T = 4: smaller"),
                    Case((logits_arg([[1.0, 2.0, 0.5, 0.0]], [3]),
                          logits_arg([[0.0, 1.0, 2.0, 3.0]], [3])), {"temperature": 2.0},
                         label="token 3 masked in both: its gradient is 0"),
                    Case((logits_arg([[1.0, 2.0]]), logits_arg([[1.0, 2.0]])),
                         {"temperature": 0.0}, raises="ValueError", label="temperature 0")),
            hidden=_hidden_grad,
            references=("utils.distillation.soft_gradient_norms", "utils.distillation.forward_kl",
                        "utils.distillation.softmax_with_temperature",
                        "utils.distillation._log_probs", "torch.autograd.grad",
                        "torch.autograd.backward", "torch.func.grad", "torch.func.vjp"),
            hint="(softmax(student / T) - softmax(teacher / T)) / T, elementwise; a masked "
                 "token has probability 0 on both sides"),
        Exercise(
            name="ANSWER_T_SQUARED", points=1, kind="value",
            title="Why the soft term is multiplied by T^2",
            expected=_t_squared_answer, compare=choice(),
            public=(Case(label="your answer is one of 'a', 'b', 'c', 'd' (graded on submission)",
                         compare=one_of(T_SQUARED_OPTIONS), expected="a", graded=False),),
            hidden=lambda rng: [Case(label="the answer")],
            hint="what happens to q_T - p_T as T grows, and what does the chain rule through "
                 "z / T add?"),
    ),
)
