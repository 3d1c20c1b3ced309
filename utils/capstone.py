"""Chapter 10 (capstone): the course teacher through the whole pipeline, and a measured decision.

A *brief* states the goal as a deployment would: a quality bound (perplexity within 5% of the
teacher's) and what to minimise or maximise on this machine (batch-1 decode latency, or decode
throughput at batch 16), ties broken by the smaller model. A *variant* is a chain of stages, each
one a chapter's reference implementation applied to the result of the previous one:

- ``prune``: chapter 03's structured pruning, half of every MLP's channels, activation-aware
  (``utils.pruning.structured_prune``);
- ``heal``: chapter 04's logit distillation from the unpruned teacher (forward KL, T = 1, the
  Minitron setting; ``utils.distillation.kd_objective``);
- ``lowrank``: chapter 05's SVD factorisation at 30% fewer decoder parameters
  (``utils.lowrank.compress_model``);
- ``int8`` / ``int4``: chapter 02's weight-only quantization, per channel / groups of 32
  (``WeightOnlyInt8QuantHandler``, ``WeightOnlyGroupwiseQuantHandler``).

Quality (perplexity, top-1 agreement with the teacher, on fixed held-out tokens) is measured on
the transformers model; speed on chapter 06's decode path (``utils.llama.CourseLlama`` with a
static KV cache), with the quantized layers as torch's fused int8 / int4 CPU kernels
(``utils.quantization.fused_weight_only_copy``), all variants timed side by side in one run.

``python -m utils.capstone build --brief latency`` builds every candidate with a progress bar per
stage (a stage already built is loaded from its folder, not redone), measures them, chooses, and
prints the report card; ``--save`` writes ``models/results/10_capstone.json``, which the notebook
loads.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from utils.paths import MODELS_DIR, REPO_ROOT

CHAPTER = "10"  # found by utils.report; notebooks/10_*.ipynb, solutions/lab10_*.ipynb
RESULTS_PATH = MODELS_DIR / "results" / "10_capstone.json"
WORK_DIR = REPO_ROOT / ".capstone"  # built stages (ignored by git): delete to rebuild


@dataclass(frozen=True)
class Brief:
    """A deployment goal: quality bound first, then the objective, then the smaller model."""

    name: str
    description: str
    max_perplexity_ratio: float  # perplexity <= ratio x the teacher's
    batch: int                   # the decode batch the objective is measured at
    objective: str               # "decode_ms" (minimise) or "tokens_per_s" (maximise)


BRIEFS = {
    "latency": Brief("latency", "the teacher's quality within 5% perplexity, at the lowest "
                     "batch-1 decode latency, then the smallest size", 1.05, 1, "decode_ms"),
    "throughput": Brief("throughput", "the teacher's quality within 5% perplexity, at the "
                        "highest decode throughput at batch 16, then the smallest size",
                        1.05, 16, "tokens_per_s"),
}

STAGES = ("prune", "heal", "lowrank", "int8", "int4")
QUANTIZE = ("int8", "int4")
# every variant the build measures: the teacher, each stage alone, the chains, and the ordering
# ablation (int4 then prune: the pruning scores read rounded weights; prune then int4)
VARIANTS = ((), ("int8",), ("int4",), ("lowrank",), ("prune",), ("prune", "heal"),
            ("prune", "heal", "int8"), ("prune", "heal", "int4"), ("prune", "int4"),
            ("int4", "prune"))


ABLATIONS = (("int4", "prune"),)  # measured for the ordering, not candidates (stored in float)

# What each technique buys on a GPU, from published measurements (their conditions beside them).
PUBLISHED_GPU = {
    "int8": "Llama-2-7B batch-1 decode 104.9 -> 155.6 tokens/s (1.48x), A100-80GB at 330 W "
            "(gpt-fast README, Benchmarks)",
    "int4": "Llama-2-7B batch-1 decode 104.9 -> 196.8 tokens/s (1.88x), groups of 32, "
            "A100-80GB at 330 W (gpt-fast README, Benchmarks)",
    "prune": "none quoted here: at batch 1 the gain follows the weight bytes removed "
             "(chapter 00's bandwidth bound)",
    "heal": "no speed effect: it buys back quality lost to pruning",
    "lowrank": "none quoted here: the factored layer pays only below the break-even rank "
               "(chapter 05)",
}


def variant_name(chain) -> str:
    return " -> ".join(chain) if chain else "teacher"


def check_chain(chain) -> tuple[str, ...]:
    """A valid stage chain: known stages, each at most once, at most one quantization, heal only
    after prune; quantization may come before prune (the ablation: the weights are then rounded
    in place, so that pruning can still slice them), but nothing follows a quantization except
    prune."""
    chain = tuple(chain)
    unknown = [s for s in chain if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: stages are {STAGES}")
    if len(set(chain)) != len(chain) or sum(s in QUANTIZE for s in chain) > 1:
        raise ValueError(f"each stage at most once and one quantization, got {chain}")
    if "heal" in chain and ("prune" not in chain or chain.index("heal") < chain.index("prune")):
        raise ValueError(f"heal must come after prune, got {chain}")
    for i, stage in enumerate(chain[:-1]):
        if stage in QUANTIZE and any(s != "prune" for s in chain[i + 1:]):
            raise ValueError(f"only prune may follow a quantization, got {chain}")
    return chain


# --------------------------------------------------------------------------- the stages

@dataclass
class Context:
    """What the stages share: the teacher, its tokenizer, the data and the settings."""

    teacher: torch.nn.Module
    tokenizer: object
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    calibration_ids: torch.Tensor
    heal_steps: int = 200
    max_tokens: int = 8192
    seed: int = 0


def load_context(heal_steps: int = 200, max_tokens: int = 8192) -> Context:
    from utils.models import calibration_tokens, encode_split, load_course_model

    teacher, tokenizer = load_course_model("teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return Context(teacher, tokenizer, encode_split("train", tokenizer),
                   encode_split("validation", tokenizer),
                   calibration_tokens(tokenizer, sequences=8, seq_len=256), heal_steps,
                   max_tokens)


def _rounded_in_place(model, bits: int):
    """A float copy whose decoder Linear weights hold their quantized values (dequantized): the
    model a quantizer would produce, still sliceable by pruning (the ordering ablation)."""
    from utils.models import find_linears
    from utils.quantization import fake_quantize

    out = copy.deepcopy(model)
    with torch.no_grad():
        for linear in find_linears(out).values():
            w = linear.weight
            w.copy_(fake_quantize(w, 8, True, "channel") if bits == 8 else
                    fake_quantize(w, 4, False, "group", 32))
    return out


def apply_stage(stage: str, model, ctx: Context, later_prune: bool = False):
    """``stage`` applied to a copy of ``model`` (the input is left as it is)."""
    from utils.quantization import (WeightOnlyGroupwiseQuantHandler, WeightOnlyInt8QuantHandler,
                                    quantize_copy)

    if stage == "prune":
        from utils.pruning import structured_prune

        return structured_prune(model, 0.5, calibration_ids=ctx.calibration_ids)
    if stage == "heal":
        from utils.distillation import HEAL_TRAINING, kd_objective
        from utils.models import finetune

        healed = copy.deepcopy(model)
        for p in healed.parameters():
            p.requires_grad_(True)
        finetune(healed, ctx.heal_steps, seed=ctx.seed, loss_fn=kd_objective(ctx.teacher, 1.0, 0.0),
                 data=ctx.train_ids, desc="heal (KD from the teacher)", **HEAL_TRAINING)
        for p in healed.parameters():
            p.requires_grad_(False)
        return healed
    if stage == "lowrank":
        from utils.lowrank import compress_model

        return compress_model(model, 0.3, "svd")
    if stage in QUANTIZE:
        bits = 8 if stage == "int8" else 4
        if later_prune:
            return _rounded_in_place(model, bits)
        if bits == 8:
            return quantize_copy(model, WeightOnlyInt8QuantHandler)
        return quantize_copy(model, WeightOnlyGroupwiseQuantHandler, bits=4, group_size=32)
    raise ValueError(f"unknown stage {stage!r}: stages are {STAGES}")


def _stage_file(chain, i: int, ctx: Context) -> str:
    """The saved prefix ``chain[:i + 1]``'s file name: heal carries its steps, a quantization
    that pruning follows is the rounded float model, not the quantized one."""
    names = []
    for j, stage in enumerate(chain[:i + 1]):
        if stage == "heal":
            stage = f"heal{ctx.heal_steps}"
        elif stage in QUANTIZE and "prune" in chain[j + 1:]:
            stage = f"{stage}rounded"
        names.append(stage)
    return "_".join(names) + ".pt"


def build(chain, ctx: Context, work_dir: Path | None = WORK_DIR, progress: bool = True,
          memo: dict | None = None):
    """The model of ``chain``, built stage by stage from the teacher. Each prefix once built is
    kept in ``memo`` (shared between calls) and, with ``work_dir``, saved there and loaded
    instead of rebuilt in a later run (restartable); the heal stage's file names its steps."""
    from tqdm.auto import tqdm

    chain = check_chain(chain)
    memo = {} if memo is None else memo
    model = ctx.teacher
    bar = tqdm(chain, desc=variant_name(chain), disable=not progress or not chain)
    for i, stage in enumerate(bar):
        bar.set_postfix(stage=stage)
        key = _stage_file(chain, i, ctx)
        path = None if work_dir is None else Path(work_dir) / key
        if key in memo:
            model = memo[key]
        elif path is not None and path.exists():
            model = memo[key] = torch.load(path, weights_only=False)
        else:
            model = memo[key] = apply_stage(stage, model, ctx,
                                            later_prune="prune" in chain[i + 1:])
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model, path)
    return model.eval()


# --------------------------------------------------------------------------- measuring

def float_parent(chain) -> tuple[str, ...]:
    """The chain without its final quantization: the float model the speed path quantizes with
    torch's fused kernels (the same per-channel / group-32 rounding as the readable layers)."""
    chain = tuple(chain)
    return chain[:-1] if chain and chain[-1] in QUANTIZE else chain


def speed_model(chain, model):
    """Chapter 06's decode path for ``chain``, from ``model``, the built ``float_parent(chain)``:
    ``CourseLlama`` with a final quantization as torch's fused CPU kernels (float32 activations:
    a CPU may lack fast bf16). None for a low-rank model (its blocks are not plain Linears)."""
    from utils.llama import CourseLlama
    from utils.lowrank import LowRankLinear
    from utils.quantization import fused_weight_only_copy

    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        return None  # CourseLlama's blocks hold plain Linear layers: timed as the HF model below
    course = CourseLlama.from_llama(model)
    last = tuple(chain)[-1] if chain else None
    if last in QUANTIZE:
        course = fused_weight_only_copy(course, bits=8 if last == "int8" else 4, group_size=32,
                                        skip=("lm_head",), compute_dtype=torch.float32)
    return course


def quality(models: dict, ctx: Context) -> dict[str, dict]:
    """Perplexity and top-1 agreement with the teacher of each transformers model, on the first
    ``ctx.max_tokens`` held-out tokens (the teacher's argmax computed once)."""
    from utils.metrics import lm_quality, reference_top1

    ref = reference_top1(ctx.teacher, ctx.val_ids, ctx.max_tokens)
    with torch.inference_mode():
        return {name: lm_quality(ref, m, ctx.val_ids, ctx.max_tokens) for name, m in models.items()}


def decode_timings(models: dict, batch: int, prompt_len: int = 64,
                   min_run_time: float = 0.5) -> dict[str, dict]:
    """One decode step (a token per sequence against a static cache of ``prompt_len``) of each
    ``CourseLlama`` at ``batch`` sequences, timed side by side in one ``utils.bench.compare``
    run: ``{name: {"median_ms", "speedup", "tokens_per_s"}}``."""
    from utils.quantization import decode_speed

    return decode_speed(models, prompt_len=prompt_len, min_run_time=min_run_time,
                        batch_size=batch)


def prefill_timings(models: dict, prompt_len: int = 64,
                    min_run_time: float = 0.5) -> dict[str, dict]:
    """The prefill of one ``prompt_len``-token prompt into a static cache (batch 1) by each
    ``CourseLlama``, timed side by side in one ``utils.bench.compare`` run (the time to the
    first token, less the sampling): ``{name: {"median_ms", "iqr_ms", "speedup"}}``."""
    from utils.bench import compare

    steps = {}
    with torch.inference_mode():
        for label, m in models.items():
            config = getattr(m, "_orig_mod", m).config
            ids = torch.randint(0, config.vocab_size, (1, prompt_len),
                                generator=torch.Generator().manual_seed(0))
            steps[label] = course_steps(m, config, ids)[0]
        return compare(steps, min_run_time=min_run_time, warmup=1)


def course_steps(m, config, prompt: torch.Tensor):
    """(prefill of ``prompt``, one decode step after it) callables of ``CourseLlama`` ``m``
    (or its compiled wrapper) over one static KV cache, batch 1."""
    from utils.llama import StaticKVCache

    n = prompt.shape[1]
    cache = StaticKVCache(config, 1, n + 1)
    positions, step_pos = torch.arange(n), torch.tensor([n])
    return (lambda: m(prompt, cache, positions), lambda: m(prompt[:, -1:], cache, step_pos))


def size_bytes(model) -> int:
    from utils.quantization import serialized_bytes

    return serialized_bytes(model)


def measure(chains, ctx: Context, work_dir: Path | None = WORK_DIR, min_run_time: float = 0.5,
            progress: bool = True, memo: dict | None = None) -> list[dict]:
    """Build every chain, then measure all of them in the same run: size, perplexity, top-1,
    batch-1 prefill of a 64-token prompt, batch-1 decode ms and batch-16 tokens/s. One row per
    chain. ``memo`` (see ``build``) keeps the built models for the caller."""
    memo = {} if memo is None else memo
    built = {variant_name(c): (tuple(c), build(c, ctx, work_dir, progress, memo)) for c in chains}
    q = quality({n: m for n, (_, m) in built.items()}, ctx)
    fast = {n: speed_model(c, build(float_parent(c), ctx, work_dir, False, memo))
            for n, (c, m) in built.items()}
    timed = {n: m for n, m in fast.items() if m is not None}
    first = prefill_timings(timed, min_run_time=min_run_time)
    one = decode_timings(timed, 1, min_run_time=min_run_time)
    many = decode_timings(timed, 16, min_run_time=min_run_time)
    teacher_ppl = q["teacher"]["perplexity"] if "teacher" in q else None
    rows = []
    for name, (chain, model) in built.items():
        rows.append({
            "variant": name, "stages": list(chain), "size_mb": size_bytes(model) / 1e6,
            "perplexity": q[name]["perplexity"],
            "perplexity_ratio": q[name]["perplexity"] / teacher_ppl if teacher_ppl else None,
            "top1_agreement": q[name]["top1_agreement"],
            "prefill_ms": first[name]["median_ms"] if name in first else None,
            "decode_ms": one[name]["median_ms"] if name in one else None,
            "tokens_per_s": many[name]["tokens_per_s"] if name in many else None,
            "ablation": chain in ABLATIONS})
    return rows


# --------------------------------------------------------------------------- serving the choice

DEPLOY_PROMPT = 64  # prompt tokens of the timed prefill; the decode step attends over them
ENGINES = ("eager", "compiled", "onnxruntime")


def _export_decoder(model, path: Path) -> Path:
    """Chapter 08's ``DecoderWithPast`` of ``model`` exported to ``path`` (kept: restartable)."""
    from utils.export import DecoderWithPast, cache_shape, export_onnx

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    past = [torch.zeros(cache_shape(cfg, 2, 3)) for _ in range(2)]
    signature = {"input_ids": ("batch", "sequence"),
                 "past_keys": (None, "batch", None, "past", None),
                 "past_values": (None, "batch", None, "past", None)}
    return export_onnx(DecoderWithPast(model), (ids, *past), path, signature,
                       ["logits", "present_keys", "present_values"])


def deployment(chain, ctx: Context, work_dir: Path | None = WORK_DIR, memo: dict | None = None,
               engines=ENGINES, min_run_time: float = 0.5, new_tokens: int = 16) -> dict:
    """The variant of ``chain`` served by each of ``engines``, beside the teacher in eager
    PyTorch: chapter 06's static-cache decode (``eager``) and the same under ``torch.compile``
    (``compiled``, one graph for the prefill shape, one for the decode step), and chapter 08's
    export to ONNX Runtime (``onnxruntime``: ``DecoderWithPast``, the cache as tensors that grow).
    Batch 1: the prefill of a ``DEPLOY_PROMPT``-token prompt and one decode step after it, each
    timed side by side in one ``compare`` run. Each engine's ``new_tokens`` greedy tokens are
    checked against the eager variant's; ``setup_s`` is its one-off cost (compiling, exporting
    and loading the session), not timed with the steps. An engine that cannot serve the variant
    (a quantized model has no ONNX export here; a machine without a C++ compiler cannot compile)
    gets a row with the reason instead of numbers."""
    from utils.bench import compare
    from utils.llama import generate_with_cache

    chain = check_chain(chain)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown}: engines are {ENGINES}")
    memo = {} if memo is None else memo
    model = build(chain, ctx, work_dir, False, memo)
    course = speed_model(chain, build(float_parent(chain), ctx, work_dir, False, memo))
    if course is None:
        raise ValueError(f"{variant_name(chain)} has no decode path to serve (low-rank layers)")
    teacher = speed_model((), ctx.teacher)
    prompt = ctx.val_ids.reshape(-1)[:DEPLOY_PROMPT].unsqueeze(0)  # held-out text

    name = variant_name(chain)
    rows, prefill, decode = [], {}, {}
    with torch.inference_mode():
        reference = generate_with_cache(course, prompt, new_tokens)[0, DEPLOY_PROMPT:].tolist()
        served = [("teacher, eager", teacher, "the baseline")]
        if chain:
            served.append((f"{name}, eager", course, "the reference tokens"))
        for label, m, note in served:
            prefill[label], decode[label] = course_steps(m, m.config, prompt)
            rows.append({"engine": label, "setup_s": 0.0, "same tokens": None,
                         "note": f"chapter 06's static KV cache; {note}"})
        if "compiled" in engines:
            label, t0 = f"{name}, torch.compile", time.perf_counter()
            try:
                compiled = torch.compile(course, dynamic=False)
                tokens = generate_with_cache(compiled, prompt, new_tokens)[0, DEPLOY_PROMPT:]
                tokens = tokens.tolist()
                prefill[label], decode[label] = course_steps(compiled, course.config, prompt)
                for step in (prefill[label], decode[label]):
                    step()  # the step shapes compiled before timing
                rows.append({"engine": label, "setup_s": time.perf_counter() - t0,
                             "same tokens": tokens == reference,
                             "note": "Inductor, a graph per shape (prefill, decode)"})
            except Exception as err:  # noqa: BLE001  (no compiler, an unsupported kernel)
                rows.append({"engine": label, "note": f"not served: {type(err).__name__}: "
                             f"{str(err).splitlines()[0][:120]}"})
        if "onnxruntime" in engines:
            label = f"{name}, ONNX Runtime"
            if chain and chain[-1] in QUANTIZE:
                rows.append({"engine": label, "note": "not served: this quantized model has no "
                             "ONNX export here (chapter 08 quantizes in the engine instead)"})
            else:
                from utils.export import (empty_cache, greedy_decode, ort_session, ort_step,
                                          workdir)

                t0 = time.perf_counter()
                folder = Path(work_dir) if work_dir is not None else workdir("course10_")
                stem = Path(_stage_file(chain, len(chain) - 1, ctx)).stem if chain else "teacher"
                path = _export_decoder(model, folder / f"{stem}.onnx")
                session = ort_session(path, providers=["CPUExecutionProvider"])
                step = ort_step(session)
                tokens = greedy_decode(step, prompt, new_tokens, model.config)
                ids = prompt.numpy().astype("int64")
                empty = [t.numpy() for t in empty_cache(model.config)]
                _, keys, values = step(ids, *empty)
                prefill[label] = lambda: step(ids, *empty)
                decode[label] = lambda: step(ids[:, -1:], keys, values)
                rows.append({"engine": label, "setup_s": time.perf_counter() - t0,
                             "same tokens": tokens == reference,
                             "note": "DecoderWithPast, CPU provider, all graph optimisations"})
        first = compare(prefill, min_run_time=min_run_time, warmup=1)
        step = compare(decode, min_run_time=min_run_time, warmup=1)
    for row in rows:
        label = row["engine"]
        if label in first:
            row.update(prefill_ms=first[label]["median_ms"], prefill_x=first[label]["speedup"],
                       decode_ms=step[label]["median_ms"], decode_x=step[label]["speedup"])
    return {"variant": name, "prompt_len": DEPLOY_PROMPT, "new_tokens": new_tokens,
            "rows": rows}


# --------------------------------------------------------------------------- deciding

def pareto_front(rows: list[dict], quality_key: str = "perplexity", cost_key: str = "decode_ms"
                 ) -> list[str]:
    """Variants not dominated: no other row is at least as good on both (lower quality_key and
    lower cost_key) and better on one. Rows missing a value are left out."""
    usable = [r for r in rows if r.get(quality_key) is not None and r.get(cost_key) is not None
              and not r.get("ablation")]
    front = []
    for r in usable:
        dominated = any(o[quality_key] <= r[quality_key] and o[cost_key] <= r[cost_key]
                        and (o[quality_key] < r[quality_key] or o[cost_key] < r[cost_key])
                        for o in usable)
        if not dominated:
            front.append(r["variant"])
    return front


def choose(rows: list[dict], brief: Brief | str) -> dict | None:
    """The brief's variant: among rows within its perplexity bound (against the teacher row),
    the best objective, then the smallest size; None when nothing qualifies."""
    brief = BRIEFS[brief] if isinstance(brief, str) else brief
    teacher = next((r for r in rows if r["variant"] == "teacher"), None)
    if teacher is None:
        raise ValueError("rows must include the 'teacher' row (the quality reference)")
    bound = brief.max_perplexity_ratio * teacher["perplexity"]
    ok = [r for r in rows if r["perplexity"] <= bound and r.get(brief.objective) is not None
          and not r.get("ablation")]
    if not ok:
        return None
    sign = 1 if brief.objective == "decode_ms" else -1
    return min(ok, key=lambda r: (sign * r[brief.objective], r["size_mb"]))


def ordering_ablation(rows: list[dict]) -> dict[str, float]:
    """Perplexity of prune -> int4 against int4 -> prune, from measured rows."""
    by = {r["variant"]: r for r in rows}
    a, b = by[variant_name(("prune", "int4"))], by[variant_name(("int4", "prune"))]
    return {"prune -> int4": a["perplexity"], "int4 -> prune": b["perplexity"],
            "difference": b["perplexity"] - a["perplexity"]}


def stage_effects(rows: list[dict], chain) -> list[dict]:
    """Each stage of ``chain`` against the variant before it (the teacher first): the change
    in size, perplexity and speed, from rows measured in one run."""
    by = {r["variant"]: r for r in rows}
    out, previous = [], by["teacher"]
    for i in range(len(chain)):
        row = by[variant_name(tuple(chain[:i + 1]))]
        ratio = lambda key: (row[key] / previous[key]  # noqa: E731
                             if row.get(key) and previous.get(key) else None)
        speedup = lambda key: (previous[key] / row[key]  # noqa: E731
                               if row.get(key) and previous.get(key) else None)
        out.append({"stage": chain[i], "variant": row["variant"], "size x": ratio("size_mb"),
                    "perplexity x": ratio("perplexity"),
                    "prefill speed-up": speedup("prefill_ms"),
                    "decode speed-up": speedup("decode_ms"),
                    "batch-16 throughput x": ratio("tokens_per_s")})
        previous = row
    return out


def decision_table(rows: list[dict], bound: float = 1.05) -> list[dict]:
    """Which method when: each technique's measured effect on this machine (its variant against
    the one it was applied to: the teacher, or the pruned model for heal), what it buys on a GPU
    (``PUBLISHED_GPU``, labelled), and a verdict from the measurement: it pays here when it is
    within ``bound`` of its input's perplexity and gives a smaller or faster model."""
    by = {r["variant"]: r for r in rows}
    out = []
    for stage, before, after in (("int8", "teacher", "int8"), ("int4", "teacher", "int4"),
                                 ("lowrank", "teacher", "lowrank"),
                                 ("prune", "teacher", "prune"), ("heal", "prune", "prune -> heal")):
        a, b = by[before], by[after]
        speed = a["decode_ms"] / b["decode_ms"] if a.get("decode_ms") and b.get("decode_ms") \
            else None
        ppl = b["perplexity"] / a["perplexity"]
        size = b["size_mb"] / a["size_mb"]
        if stage == "heal":
            verdict = (f"recovers {(a['perplexity'] - b['perplexity']) / a['perplexity']:.0%} "
                       "of the pruned model's perplexity: needed after pruning")
        elif ppl > bound:
            verdict = f"costs {ppl - 1:.0%} perplexity alone: only with healing, or not at all"
        elif speed is not None and speed < 1.05:
            verdict = f"smaller ({size:.2f}x) but not faster here (decode {speed:.2f}x)"
        else:
            verdict = "pays here"
        out.append({"technique": stage, "applied to": before, "size x": size,
                    "perplexity x": ppl, "batch-1 decode x": speed, "verdict here": verdict,
                    "on a GPU (published)": PUBLISHED_GPU[stage]})
    return out


def machine() -> str:
    from utils.bench import machine_info

    info = machine_info()
    return (f"{info.get('cpu')}, {info.get('isa')}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def run_build(brief: str = "latency", heal_steps: int = 200, max_tokens: int = 8192,
              work_dir: Path | None = WORK_DIR, min_run_time: float = 0.5,
              save: bool = False) -> dict:
    """The end-to-end command: every variant built (restartable), measured in one run, the
    brief's choice served eager, compiled and in ONNX Runtime (``deployment``), and the report
    card. ``save`` writes ``RESULTS_PATH``."""
    if brief not in BRIEFS:
        raise ValueError(f"brief must be one of {sorted(BRIEFS)}, got {brief!r}")
    start = time.perf_counter()
    ctx = load_context(heal_steps, max_tokens)
    memo = {}
    rows = measure(VARIANTS, ctx, work_dir, min_run_time, memo=memo)
    chosen = {name: (choose(rows, b) or {}).get("variant") for name, b in BRIEFS.items()}
    pick = next((r for r in rows if r["variant"] == chosen[brief]), None)
    served = None if pick is None else deployment(pick["stages"], ctx, work_dir, memo,
                                                  min_run_time=min_run_time)
    result = {"settings": {"heal_steps": heal_steps, "max_tokens": max_tokens,
                           "machine": machine(), "dtype": "fp32 activations",
                           "decode": "one step, static cache of 64 tokens",
                           "date": time.strftime("%Y-%m-%d")},
              "briefs": {n: asdict(b) for n, b in BRIEFS.items()}, "rows": rows,
              "chosen": chosen, "brief": brief, "deployment": served,
              "minutes": (time.perf_counter() - start) / 60}
    if save:
        RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_PATH.write_text(json.dumps(result, indent=1) + "\n")
    return result


def load_results() -> dict:
    """The committed run of ``python -m utils.capstone build --save``."""
    if not RESULTS_PATH.exists():
        raise FileNotFoundError(f"{RESULTS_PATH.name} is missing: run "
                                "`python -m utils.capstone build --save`")
    return json.loads(RESULTS_PATH.read_text())


def report_card(result: dict) -> str:
    from utils.report import format_table

    brief = BRIEFS[result["brief"]]
    chosen = next(r for r in result["rows"] if r["variant"] == result["chosen"][brief.name])
    lines = [f"brief '{brief.name}': {brief.description}",
             f"chosen: {chosen['variant']}  (size {chosen['size_mb']:.1f} MB, perplexity "
             f"{chosen['perplexity']:.2f} = {chosen['perplexity_ratio']:.3f}x the teacher, "
             f"decode {chosen['decode_ms']:.2f} ms/token at batch 1, "
             f"{chosen['tokens_per_s']:.0f} tokens/s at batch 16)", "",
             "stage by stage:", format_table(stage_effects(result["rows"], chosen["stages"])),
             "", "every variant, measured in the same run:",
             format_table([{k: r.get(k) for k in ("variant", "size_mb", "perplexity",
                                                   "top1_agreement", "prefill_ms", "decode_ms",
                                                   "tokens_per_s")}
                           for r in result["rows"]])]
    served = result.get("deployment")
    if served:
        lines += ["", f"the choice served (batch 1, prefill of {served['prompt_len']} tokens, "
                  "then one decode step; speed-ups over the teacher eager):",
                  format_table(deployment_table(served))]
    lines += [f"\n{result['settings']['machine']}; built and measured in "
             f"{result['minutes']:.1f} min"]
    return "\n".join(lines)


def deployment_table(served: dict) -> list[dict]:
    """``deployment``'s rows for printing: one line per engine, its reason where not served."""
    keys = ("engine", "prefill_ms", "prefill_x", "decode_ms", "decode_x", "setup_s",
            "same tokens", "note")
    return [{k: r.get(k) for k in keys} for r in served["rows"]]


def report_rows(quick: bool = False) -> list[dict]:
    """Chapter 10's figures (``python -m utils.report 10``): the committed run's chosen variant
    for each brief and its ratios to the teacher; with ``quick=False``, a live measurement of
    the teacher against its int8 copy too."""
    result = load_results()
    by = {r["variant"]: r for r in result["rows"]}
    teacher = by["teacher"]
    rows = []
    for name, variant in result["chosen"].items():
        r = by[variant]
        rows.append({"measurement": f"brief {name}: {variant}", "value": r["perplexity_ratio"],
                     "unit": "x teacher perplexity",
                     "conditions": f"size {r['size_mb'] / teacher['size_mb']:.2f}x, decode "
                                   f"{teacher['decode_ms'] / r['decode_ms']:.2f}x faster "
                                   f"(committed run, {result['settings']['machine']})"})
    if not quick:
        ctx = load_context(0, 2048)
        live = measure([(), ("int8",)], ctx, None, 0.3, progress=False)
        rows.append({"measurement": "live: int8 decode speed-up", "value":
                     live[0]["decode_ms"] / live[1]["decode_ms"], "unit": "x",
                     "conditions": f"batch 1, {machine()}"})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.capstone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build, measure and choose (restartable)")
    b.add_argument("--brief", choices=sorted(BRIEFS), default="latency")
    b.add_argument("--heal-steps", type=int, default=200)
    b.add_argument("--max-tokens", type=int, default=8192)
    b.add_argument("--work-dir", type=Path, default=WORK_DIR)
    b.add_argument("--save", action="store_true", help=f"write {RESULTS_PATH.name}")
    args = parser.parse_args(argv)
    result = run_build(args.brief, args.heal_steps, args.max_tokens, args.work_dir,
                       save=args.save)
    print(report_card(result))


if __name__ == "__main__":
    main()
