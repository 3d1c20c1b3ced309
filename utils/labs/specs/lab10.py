"""Grading spec of lab 10, the capstone (chapter 10): reading a Pareto front, choosing for a
brief, predicting a stage's effect from chapter 00's bound, an open brief met by a plan of the
course's stages, and one question on the order of stages.

The open brief is graded on what is deterministic: the learner's ``PLAN`` (a plain list of stage
names) is looked up, in the grading process, in the chapter's committed run (stored bytes and
held-out perplexity of every variant, measured in one run by ``python -m utils.capstone build``)
and compared with the brief's bounds. Nothing the submission runs can change those numbers; no
latency decides a score.
"""

from __future__ import annotations

import random  # noqa: F401  (hidden cases take a random.Random)

from utils.labs.spec import Case, Exercise, LabSpec, _show, choice, close, exact, one_of

# the open brief: at most this fraction of the teacher's stored bytes, perplexity within this
# ratio of the teacher's (the committed run's held-out tokens)
PLAN_MAX_SIZE, PLAN_MAX_PERPLEXITY = 0.30, 1.05


def _row(name, ppl, ms, mb, tps=None):
    return {"variant": name, "perplexity": ppl, "decode_ms": ms, "size_mb": mb,
            "tokens_per_s": tps}


PUBLIC_ROWS = [_row("teacher", 16.77, 6.8, 44.1, 900.0), _row("int8", 16.79, 7.4, 15.9, 500.0),
               _row("int4", 16.95, 9.9, 12.6, 300.0), _row("prune", 21.49, 5.1, 29.9, 1100.0),
               _row("prune -> heal", 17.48, 5.1, 29.9, 1100.0),
               _row("prune -> heal -> int8", 17.52, 5.9, 10.9, 600.0)]


def _random_rows(rng, n):
    rows = [_row("teacher", round(rng.uniform(10, 20), 2), round(rng.uniform(5, 10), 2),
                 round(rng.uniform(30, 50), 1), round(rng.uniform(200, 900)))]
    for i in range(n - 1):
        rows.append(_row(f"variant {i}", round(rows[0]["perplexity"] * rng.uniform(0.98, 1.4), 2),
                         round(rng.uniform(2, 12), 2), round(rng.uniform(5, 50), 1),
                         round(rng.uniform(100, 1500))))
    return rows


# --------------------------------------------------------------------------- 1: Pareto front

def _pareto_ref(rows, cost_key):
    from utils.capstone import pareto_front

    return pareto_front(rows, "perplexity", cost_key)


def _hidden_pareto(rng):
    tie = [_row("a", 10.0, 5.0, 1.0), _row("b", 10.0, 5.0, 2.0), _row("c", 9.0, 6.0, 3.0)]
    cases = [Case((tie, "decode_ms"), label="two rows with equal values: neither dominates"),
             Case(([_row("only", 3.0, 3.0, 3.0)], "size_mb"), label="one row")]
    for _ in range(4):
        cases.append(Case((_random_rows(rng, rng.randint(3, 9)),
                           rng.choice(["decode_ms", "size_mb"])), label="random rows"))
    return cases


# --------------------------------------------------------------------------- 2: choose

def _choose_ref(rows, max_ratio, objective):
    from utils.capstone import Brief, choose

    row = choose(rows, Brief("lab", "", max_ratio, 1, objective))
    return None if row is None else row["variant"]


def _hidden_choose(rng):
    tie = PUBLIC_ROWS + [_row("same speed, smaller", 16.80, 6.8, 10.0, 900.0)]
    cases = [Case((tie, 1.05, "decode_ms"), label="a tie on latency: the smaller model"),
             Case((PUBLIC_ROWS, 1.0, "decode_ms"), label="ratio 1.0: only the teacher itself"),
             Case((PUBLIC_ROWS, 0.9, "decode_ms"), label="nothing qualifies")]
    for _ in range(4):
        cases.append(Case((_random_rows(rng, rng.randint(3, 8)), rng.choice([1.02, 1.1, 1.3]),
                           rng.choice(["decode_ms", "tokens_per_s"])), label="random rows"))
    return cases


# --------------------------------------------------------------------------- 3: predicted speed-up

def _speedup_ref(weight_bytes, new_weight_bytes, kv_bytes):
    from utils.roofline import decode_tokens_per_second_bound

    bw = 1e11  # any bandwidth: it cancels in the ratio
    return (decode_tokens_per_second_bound(bw, new_weight_bytes, kv_bytes)
            / decode_tokens_per_second_bound(bw, weight_bytes, kv_bytes))


def _hidden_speedup(rng):
    cases = [Case((14e9, 3.9e9, 0.0), label="a 7B model, fp16 -> int4 (g=32), no cache"),
             Case((14e9, 3.9e9, 8e9), label="the same with an 8 GB KV cache (long context)"),
             Case((1e6, 1e6, 5e5), label="no change"),
             Case((1e6, 2e6, 0.0), label="a larger model: a slow-down")]
    for _ in range(3):
        w = rng.uniform(1e8, 1e10)
        cases.append(Case((w, w * rng.uniform(0.2, 1.0), w * rng.uniform(0, 2))))
    return cases + [Case((1e6, 1e6, -1.0), raises="ValueError", label="negative kv_bytes")]


def _speedup_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        from utils.labs.spec import _compare_raises

        return _compare_raises(expected, got)
    return close(1e-9, 1e-12)(expected, got)


# --------------------------------------------------------------------------- 4: the open brief

def _plan_target():
    return {"max_size_ratio": PLAN_MAX_SIZE, "max_perplexity_ratio": PLAN_MAX_PERPLEXITY}


def measure_plan(stages) -> dict:
    """The plan's stored-size and perplexity ratios to the teacher, looked up in the chapter's
    committed run (``utils.capstone.load_results``: every variant built and measured in one run,
    8192 held-out tokens). Runs in the grading process; no model is loaded."""
    from utils.capstone import check_chain, load_results, variant_name

    name = variant_name(check_chain(stages))
    rows = {r["variant"]: r for r in load_results()["rows"] if not r.get("ablation")}
    if name not in rows:
        raise ValueError(f"the plan {name!r} is not one of the measured variants: "
                         f"{sorted(rows)}")
    return {"size_ratio": rows[name]["size_mb"] / rows["teacher"]["size_mb"],
            "perplexity_ratio": rows[name]["perplexity_ratio"]}


def _plan_compare(expected, got):
    if not (isinstance(got, list) and all(isinstance(s, str) for s in got)):
        return f"PLAN must be a list of stage names, got {_show(got)}"
    try:
        m = measure_plan(got)
    except ValueError as exc:
        return str(exc)
    if m["size_ratio"] > expected["max_size_ratio"] or \
            m["perplexity_ratio"] > expected["max_perplexity_ratio"]:
        return (f"PLAN {got} measures {m['size_ratio']:.3f}x the teacher's bytes and "
                f"{m['perplexity_ratio']:.3f}x its perplexity; the brief needs at most "
                f"{expected['max_size_ratio']}x and {expected['max_perplexity_ratio']}x")
    return None


SPEC = LabSpec(
    lab="lab10",
    notebook="lab10_capstone.ipynb",
    title="Lab 10: the capstone — Pareto fronts, briefs, predicted speed-ups, a plan that meets "
          "a brief",
    seed=1010, timeout_s=90, cell_timeout_s=30, call_timeout_s=10, memory_mb=4096,
    preimport=("torch",),
    repo_files=("models/results/10_capstone.json",),  # the committed run PLAN is looked up in
    exercises=(
        Exercise(
            name="pareto_variants", points=2, title="The variants on the Pareto front",
            expected=_pareto_ref, compare=exact(),
            public=(Case((PUBLIC_ROWS, "decode_ms"), label="perplexity against latency"),
                    Case((PUBLIC_ROWS, "size_mb"), label="perplexity against size")),
            hidden=_hidden_pareto, references=("utils.capstone.pareto_front",),
            hint="a row is dominated when another is <= on both keys and < on one; keep the "
                 "others, in the order given"),
        Exercise(
            name="pick_for_brief", points=2, title="The variant a brief chooses",
            expected=_choose_ref, compare=exact(),
            public=(Case((PUBLIC_ROWS, 1.05, "decode_ms"), label="within 5%, lowest latency"),
                    Case((PUBLIC_ROWS, 1.05, "tokens_per_s"), label="within 5%, most tokens/s"),
                    Case((PUBLIC_ROWS, 1.3, "decode_ms"), label="within 30%")),
            hidden=_hidden_choose, references=("utils.capstone.choose",),
            hint="filter perplexity <= max_ratio x the teacher row's; then min decode_ms (or "
                 "max tokens_per_s); ties: smaller size_mb; None when nothing qualifies"),
        Exercise(
            name="predicted_decode_speedup", points=2,
            title="A stage's batch-1 decode speed-up from chapter 00's bound",
            expected=_speedup_ref, compare=_speedup_compare,
            public=(Case((88e6, 22e6, 0.0), label="int8 -> int4-sized weights, no cache"),
                    Case((88e6, 44e6, 44e6), label="half the weights, a cache as large as them"),
                    Case((0.0, 1.0, 0.0), label="weight_bytes = 0", raises="ValueError",
                         hint="raise ValueError unless both weight sizes are > 0 and "
                              "kv_bytes >= 0")),
            hidden=_hidden_speedup,
            references=("utils.roofline.decode_tokens_per_second_bound",),
            hint="tokens/s <= bandwidth / (weight bytes + KV bytes): the ratio of two bounds"),
        Exercise(
            name="PLAN", points=3, kind="value",
            title="A plan of stages that meets the open brief",
            expected=lambda: _plan_target(), compare=_plan_compare,
            public=(Case(label=f"at most {PLAN_MAX_SIZE}x the teacher's stored bytes, perplexity "
                               f"within {PLAN_MAX_PERPLEXITY}x, in the chapter's measured run",
                         graded=False),),
            hidden=lambda rng: [Case(label="the brief, against the chapter's measured run")],
            hint="read the chapter's table: which stage alone keeps the quality and shrinks the "
                 "bytes the most?"),
        Exercise(
            name="ANSWER_ORDER", points=1, kind="value",
            title="Why the order of pruning and quantization matters",
            expected=lambda: "c", compare=choice(),
            public=(Case(label="your answer is one of 'a', 'b', 'c', 'd' (graded on submission)",
                         compare=one_of(("a", "b", "c", "d")), expected="a", graded=False),),
            hidden=lambda rng: [Case(label="the answer")],
            hint="what does each order's pruning score read, and what does each order's "
                 "quantizer see?"),
    ),
)
