"""Chapter 04: knowledge distillation of a language model, from Hinton's T^2 to on-policy reverse KL.

All divergences take logits of shape (..., V) and return one value per position (summed over the
vocabulary, never averaged over it); ``-inf`` logits are masked tokens and contribute nothing
where the target gives them zero probability.

- Soft targets (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", §2):
  p_T = softmax(z / T). The distillation loss is T^2 * KL(p_T || q_T) + alpha * CE(q_1, y)
  (``kd_loss``). §2.1: the soft term's gradient is (q_T - p_T) / T per logit, and q_T - p_T
  itself shrinks as 1/T, so the gradient scales as 1/T^2; the T^2 keeps its weight against the
  hard term when T changes (``soft_gradient_norms`` measures it).
- Forward KL(p || q) covers the teacher's modes; reverse KL(q || p) seeks one (MiniLLM, Gu et al.
  2024); the generalized JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p +
  (1 - beta) q, goes from forward (beta -> 0) to reverse (beta -> 1) behaviour (GKD, Agarwal
  et al. 2024, who also train on the student's own samples: ``on_policy_objective``).
- Hidden-state distillation: a learned projection from the student's width to the teacher's and
  a cosine loss per mapped layer (TinyBERT's W_h, Jiao et al. 2020 §3.1; DistilBERT's cosine
  embedding loss, Sanh et al. 2019 §3), ``HiddenStateStudent``.
- Caching the teacher: its top-k logits per token stored once (``build_topk_cache``,
  ``topk_cache_bytes``), the KL computed from them (``topk_forward_kl``).
- Pruning then distillation (Minitron, Muralidharan et al. 2024): chapter 03's width-pruned
  teacher healed by logit distillation from the unpruned one (``heal_objectives``).
- Sequence-level distillation (Kim & Rush 2016, §3.2): train on the teacher's generated text
  (``teacher_sequences``).

The long runs are recipes: ``python -m utils.distillation train students|divergences|heal|
sequence`` (progress bars, fixed seeds) write ``models/results/04_<part>.json`` (and the two
students' fp16 checkpoints); the notebook loads them and runs short live versions.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.metrics import lm_quality
from utils.models import CourseModelSpec, SPECS, finetune, llama_config
from utils.paths import MODELS_DIR
from utils.validation import check_choice, check_positive, check_positive_int, check_tensor

CHAPTER = "04"

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# The capacity-limited student of the divergence experiments: one block of width 64.
TINY = CourseModelSpec("tiny", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                       intermediate_size=128, steps=0)
RESULTS_DIR = MODELS_DIR / "results"
STUDENTS_DIR = RESULTS_DIR / "04_students"
PARTS = ("students", "divergences", "heal", "sequence")


# --------------------------------------------------------------------------- soft targets


def check_temperature(temperature) -> float:
    check_positive(temperature=temperature)
    return float(temperature)


def softmax_with_temperature(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p_T = softmax(z / T) over the last dimension: T > 1 flattens, T < 1 sharpens."""
    check_tensor("logits", logits, floating=True, nonempty=True)
    return (logits / check_temperature(temperature)).softmax(-1)


def _log_probs(logits, temperature):
    check_tensor("logits", logits, floating=True, nonempty=True)
    return (logits.float() / check_temperature(temperature)).log_softmax(-1)


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v), with 0 log 0 = 0 (tokens p gives no mass cost nothing, even
    where q is -inf too); +inf where p has mass that q does not."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _check_pair(teacher_logits, student_logits):
    check_tensor("teacher_logits", teacher_logits, floating=True, nonempty=True)
    check_tensor("student_logits", student_logits, floating=True, nonempty=True)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits and student_logits must have the same shape, got "
                         f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}")


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T || q_T) per position: the student pays wherever the teacher has mass (mode
    covering). Its gradient in the student's logits is (q_T - p_T) / T."""
    _check_pair(teacher_logits, student_logits)
    return _kl_from_log_probs(_log_probs(teacher_logits, temperature),
                              _log_probs(student_logits, temperature))


def reverse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """KL(q_T || p_T) per position: the student pays only where it puts mass (mode seeking)."""
    _check_pair(teacher_logits, student_logits)
    return _kl_from_log_probs(_log_probs(student_logits, temperature),
                              _log_probs(teacher_logits, temperature))


def generalized_jsd(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q (GKD's JSD(beta)).
    beta = 0.5 is the Jensen-Shannon divergence, bounded by log 2; as beta -> 0 its gradient
    behaves as beta x forward KL, as beta -> 1 as (1 - beta) x reverse KL."""
    _check_pair(teacher_logits, student_logits)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1:
        raise ValueError(f"beta must be a number in (0, 1), got {beta!r}")
    log_p, log_q = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)
    return beta * _kl_from_log_probs(log_p, log_m) + (1 - beta) * _kl_from_log_probs(log_q, log_m)


def divergence(teacher_logits, student_logits, kind: str = "forward_kl",
               temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """One of ``DIVERGENCES`` per position."""
    check_choice("kind", kind, DIVERGENCES)
    if kind == "jsd":
        return generalized_jsd(teacher_logits, student_logits, beta, temperature)
    fn = forward_kl if kind == "forward_kl" else reverse_kl
    return fn(teacher_logits, student_logits, temperature)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor | None = None, temperature: float = 2.0, alpha: float = 0.5,
            t_squared: bool = True, kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """T^2 * mean over positions of the divergence at temperature T (Hinton et al. 2015, §2)
    plus ``alpha`` * the cross-entropy of the student at T = 1 against ``labels`` (positions
    labelled -100 are left out of the cross-entropy; ``labels=None`` or ``alpha=0``: soft term
    only). ``t_squared=False`` drops the factor, to show what it is for."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    soft = divergence(teacher_logits, student_logits, kind, temperature, beta).mean()
    if t_squared:
        soft = soft * check_temperature(temperature) ** 2
    if labels is None or alpha == 0:
        return soft
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits "
                         f"without the vocabulary), got {tuple(labels.shape)}")
    hard = F.cross_entropy(student_logits.float().reshape(-1, student_logits.size(-1)),
                           labels.reshape(-1), ignore_index=-100)
    return soft + alpha * hard


def soft_gradient_norms(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                        temperatures) -> list[dict[str, float]]:
    """For each T: the norm of d KL(p_T || q_T) / d z (the student's logits, by autograd), that
    norm times T^2, and the largest gap to the closed form (q_T - p_T) / T."""
    rows = []
    for t in temperatures:
        z = student_logits.detach().float().clone().requires_grad_(True)
        forward_kl(teacher_logits.detach(), z, t).sum().backward()
        closed = (softmax_with_temperature(z.detach(), t)
                  - softmax_with_temperature(teacher_logits.float(), t)) / t
        norm = z.grad.norm().item()
        rows.append({"temperature": float(t), "grad_norm": norm, "grad_norm_x_T2": norm * t * t,
                     "max_error_vs_closed_form": (z.grad - closed).abs().max().item()})
    return rows


def high_temperature_limit(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """What ||grad|| x T^2 tends to as T grows (Hinton et al. 2015, §2.1): for T >> |z|,
    q_i - p_i ~ ((z_i - mean z) - (v_i - mean v)) / (V T), so grad ~ that / T."""
    z, v = student_logits.float(), teacher_logits.float()
    centred = (z - z.mean(-1, keepdim=True)) - (v - v.mean(-1, keepdim=True))
    return (centred / z.shape[-1]).norm().item()


def dark_knowledge(probs: torch.Tensor) -> dict[str, float]:
    """What a distribution (..., V) carries beyond its argmax, averaged over positions: the mass
    off the argmax, the entropy (nats), and how many tokens hold 90% of the mass."""
    top = probs.max(-1).values
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    sorted_p = probs.sort(-1, descending=True).values.cumsum(-1)
    n90 = (sorted_p < 0.9).sum(-1) + 1
    return {"mass_off_argmax": (1 - top).mean().item(), "entropy": entropy.mean().item(),
            "tokens_for_90pct": n90.float().mean().item()}


# --------------------------------------------------------------------------- students


def new_student(spec: CourseModelSpec | str = "small", seed: int = 0):
    """A randomly initialised (seeded) Llama student with a course architecture (``"small"``,
    2.4M parameters, or ``"tiny"``, one narrow block)."""
    from transformers import LlamaForCausalLM

    if isinstance(spec, str):
        check_choice("spec", spec, ("small", "tiny"))
        spec = SPECS["small"] if spec == "small" else TINY
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(spec))


def _shifted(logits, ids):
    return logits[:, :-1], ids[:, 1:]


def kd_objective(teacher, temperature: float = 2.0, alpha: float = 0.5, t_squared: bool = True,
                 kind: str = "forward_kl", beta: float = 0.5, top_k: int | None = None):
    """``loss_fn(student, batch)`` for ``utils.models.finetune``: ``kd_loss`` of the student's
    next-token logits against the (frozen) teacher's on the same (B, T) batch. ``alpha=0`` and
    ``temperature=1``: pure logit distillation; a ``None`` teacher gives cross-entropy only.
    ``top_k``: the teacher's distribution truncated to its top k and renormalised, exactly what
    a ``TopKCache`` stores (forward KL only), to separate truncation from the cache's windows."""
    cached = cached_kd_objective(temperature, alpha) if top_k else None

    def loss_fn(student, batch):
        if teacher is None:
            return student(input_ids=batch, labels=batch).loss
        with torch.no_grad():
            t_logits = teacher(input_ids=batch).logits
        if cached:
            top = t_logits.float().topk(top_k, dim=-1)
            return cached(student, (batch, top.values, top.indices))
        s_logits, labels = _shifted(student(input_ids=batch).logits, batch)
        return kd_loss(s_logits, t_logits[:, :-1], labels, temperature, alpha, t_squared, kind,
                       beta)
    return loss_fn


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's uniform map: student block m (1-based) learns teacher block m * N / M, as
    indices into ``output_hidden_states`` (0 is the embeddings)."""
    check_positive_int("student_layers", student_layers)
    check_positive_int("teacher_layers", teacher_layers)
    return [(m * teacher_layers) // student_layers for m in range(1, student_layers + 1)]


class HiddenStateStudent(nn.Module):
    """A student plus one learned projection (student width -> teacher width) per mapped block;
    ``finetune`` trains both, the projections are thrown away afterwards."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        s, t = student.config, teacher.config
        self.map = layer_map(s.num_hidden_layers, t.num_hidden_layers)
        self.projections = nn.ModuleList(nn.Linear(s.hidden_size, t.hidden_size, bias=False)
                                         for _ in self.map)

    def hidden_loss(self, student_hidden, teacher_hidden) -> torch.Tensor:
        """Mean over mapped blocks and positions of 1 - cos(W h_student, h_teacher)."""
        losses = [1 - F.cosine_similarity(proj(student_hidden[i + 1]).float(),
                                          teacher_hidden[j].float(), dim=-1).mean()
                  for i, (proj, j) in enumerate(zip(self.projections, self.map))]
        return torch.stack(losses).mean()


def hidden_kd_objective(teacher, temperature: float = 2.0, alpha: float = 0.5,
                        hidden_weight: float = 1.0):
    """``loss_fn(wrapper: HiddenStateStudent, batch)``: ``kd_loss`` plus ``hidden_weight`` x the
    cosine loss between projected student and teacher hidden states."""
    def loss_fn(wrapper, batch):
        with torch.no_grad():
            t_out = teacher(input_ids=batch, output_hidden_states=True)
        s_out = wrapper.student(input_ids=batch, output_hidden_states=True)
        s_logits, labels = _shifted(s_out.logits, batch)
        logit_loss = kd_loss(s_logits, t_out.logits[:, :-1], labels, temperature, alpha)
        return logit_loss + hidden_weight * wrapper.hidden_loss(s_out.hidden_states,
                                                                 t_out.hidden_states)
    return loss_fn


@torch.no_grad()
def sample_continuations(model, prompts: torch.Tensor, new_tokens: int,
                         temperature: float = 1.0) -> torch.Tensor:
    """(B, P + new_tokens): ``prompts`` (B, P) continued by sampling at ``temperature`` with the
    KV cache (torch's global RNG: seed it first)."""
    was_training = model.training
    model.eval()
    out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=True, temperature=check_temperature(temperature), top_k=0,
                         top_p=1.0, pad_token_id=0)
    model.train(was_training)
    return out


def on_policy_objective(teacher, kind: str = "reverse_kl", beta: float = 0.5,
                        fraction: float = 1.0, prompt_len: int = 16, seed: int = 0):
    """GKD's loss (Agarwal et al. 2024, Algorithm 1): with probability ``fraction`` the batch is
    replaced by the student's own samples continuing its first ``prompt_len`` tokens, and the
    divergence to the teacher is taken on the generated positions (no gradient through the
    sampling); otherwise on the data batch as in supervised KD."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    coin = torch.Generator().manual_seed(seed)

    def loss_fn(student, batch):
        start = 0
        if torch.rand((), generator=coin).item() < fraction:
            batch = sample_continuations(student, batch[:, :prompt_len],
                                         batch.shape[1] - prompt_len)
            start = prompt_len - 1  # the logits that predicted a generated token
        with torch.no_grad():
            t_logits = teacher(input_ids=batch).logits[:, start:-1]
        s_logits = student(input_ids=batch).logits[:, start:-1]
        return divergence(t_logits, s_logits, kind, 1.0, beta).mean()
    return loss_fn


def repetition_rate(ids: torch.Tensor, n: int = 3) -> float:
    """Fraction of the n-grams of each row that already occurred earlier in that row."""
    repeats = total = 0
    for row in ids.tolist():
        seen = set()
        for i in range(len(row) - n + 1):
            gram = tuple(row[i:i + n])
            repeats += gram in seen
            seen.add(gram)
            total += 1
    return repeats / max(1, total)


@torch.no_grad()
def sample_quality(student, teacher, prompts: torch.Tensor, new_tokens: int = 48,
                   seed: int = 0) -> dict[str, float]:
    """A generation-quality proxy on the student's own samples (prompts continued at T = 1):
    the teacher's mean negative log-likelihood of the sampled tokens (lower: text the teacher
    would write), how often the sample equals the teacher's argmax there, and the 3-gram
    repetition rate of the generated part."""
    torch.manual_seed(seed)
    seqs = sample_continuations(student, prompts, new_tokens)
    p = prompts.shape[1]
    t_logp = teacher(input_ids=seqs).logits[:, p - 1:-1].float().log_softmax(-1)
    generated = seqs[:, p:]
    nll = -t_logp.gather(-1, generated[..., None]).mean().item()
    agree = (t_logp.argmax(-1) == generated).float().mean().item()
    return {"teacher_nll": nll, "teacher_agreement": agree,
            "repetition_rate": repetition_rate(generated)}


# --------------------------------------------------------------------------- the top-k cache


def index_bytes(vocab_size: int) -> int:
    """Bytes of the smallest signed integer that holds a token id below ``vocab_size``."""
    check_positive_int("vocab_size", vocab_size)
    return 2 if vocab_size <= 2**15 else 4


def topk_cache_bytes(tokens: int, k: int, vocab_size: int, value_bytes: int = 2) -> dict:
    """Storage of a teacher's outputs for ``tokens`` positions: the full distribution (V values
    each) vs its top-k (k values + k indices each)."""
    check_positive_int("tokens", tokens)
    check_positive_int("k", k)
    full = tokens * vocab_size * value_bytes
    top = tokens * k * (value_bytes + index_bytes(vocab_size))
    return {"full_bytes": full, "topk_bytes": top, "ratio": full / top}


@dataclass
class TopKCache:
    """A teacher's top-k logits on fixed windows: ``ids`` (N, T), ``values`` (N, T, k) fp16,
    ``indices`` (N, T, k) int16 (int32 above 32768 tokens)."""

    ids: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor

    def nbytes(self) -> int:
        """Bytes of the teacher's part (values and indices; the ids are the data itself)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices))

    def batch_fn(self, batch_size: int):
        """``finetune``'s ``batch_fn``: random rows (ids, values, indices) of the cache."""
        def draw(generator):
            rows = torch.randint(0, len(self.ids), (batch_size,), generator=generator)
            return self.ids[rows], self.values[rows], self.indices[rows]
        return draw


@torch.no_grad()
def build_topk_cache(teacher, windows: torch.Tensor, k: int = 32, batch_size: int = 8,
                     progress: bool = True) -> TopKCache:
    """Run the teacher once over ``windows`` (N, T) and keep its k largest logits per position."""
    from tqdm.auto import tqdm

    check_positive_int("k", k)
    vocab = teacher.config.vocab_size
    if k > vocab:
        raise ValueError(f"k must be at most the vocabulary size {vocab}, got {k}")
    index_dtype = torch.int16 if index_bytes(vocab) == 2 else torch.int32
    values, indices = [], []
    for batch in tqdm(windows.split(batch_size), desc=f"cache top-{k}", disable=not progress):
        top = teacher(input_ids=batch).logits.float().topk(k, dim=-1)
        values.append(top.values.half())
        indices.append(top.indices.to(index_dtype))
    return TopKCache(windows, torch.cat(values), torch.cat(indices))


def topk_forward_kl(values: torch.Tensor, indices: torch.Tensor, student_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """KL(p^k_T || q_T) per position, p^k the teacher's distribution renormalised over its
    cached top-k tokens, q_T the student's full softmax read at those tokens."""
    check_tensor("values", values, floating=True, nonempty=True)
    check_tensor("student_logits", student_logits, floating=True, nonempty=True)
    check_tensor("indices", indices)
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor of token ids, got {indices.dtype}")
    if indices.min() < 0 or indices.max() >= student_logits.shape[-1]:
        raise ValueError(f"indices must be token ids in 0..{student_logits.shape[-1] - 1}, got "
                         f"{indices.min().item()}..{indices.max().item()}")
    if values.shape != indices.shape or values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"values and indices must be (..., k) with the positions of "
                         f"student_logits {tuple(student_logits.shape[:-1])}, got "
                         f"{tuple(values.shape)} and {tuple(indices.shape)}")
    log_p = _log_probs(values, temperature)
    log_q = _log_probs(student_logits, temperature).gather(-1, indices.long())
    return _kl_from_log_probs(log_p, log_q)


def cached_kd_objective(temperature: float = 1.0, alpha: float = 0.0):
    """``loss_fn(student, (ids, values, indices))`` from a ``TopKCache``: no teacher runs."""
    def loss_fn(student, batch):
        ids, values, indices = batch
        s_logits, labels = _shifted(student(input_ids=ids).logits, ids)
        soft = topk_forward_kl(values[:, :-1], indices[:, :-1], s_logits, temperature).mean()
        soft = soft * check_temperature(temperature) ** 2
        if alpha == 0:
            return soft
        return soft + alpha * F.cross_entropy(s_logits.float().reshape(-1, s_logits.size(-1)),
                                              labels.reshape(-1))
    return loss_fn


@torch.no_grad()
def topk_error(teacher, student, windows: torch.Tensor, ks, batch_size: int = 8) -> list[dict]:
    """For each k: the teacher mass in its top k, and the relative error of the top-k KL against
    the full KL(p || q) between teacher and ``student``, over ``windows``."""
    full, kls, mass = 0.0, dict.fromkeys(ks, 0.0), dict.fromkeys(ks, 0.0)
    n = 0
    for batch in windows.split(batch_size):
        t, s = teacher(input_ids=batch).logits.float(), student(input_ids=batch).logits.float()
        full += forward_kl(t, s).sum().item()
        n += batch.numel()
        probs = t.softmax(-1)
        for k in ks:
            top = t.topk(k, dim=-1)
            kls[k] += topk_forward_kl(top.values, top.indices, s).sum().item()
            mass[k] += probs.gather(-1, top.indices).sum(-1).sum().item()
    return [{"k": k, "teacher_mass": mass[k] / n, "kl_topk": kls[k] / n, "kl_full": full / n,
             "relative_error": abs(kls[k] - full) / full} for k in ks]


# --------------------------------------------------------------------------- sequence-level KD


@torch.no_grad()
def teacher_sequences(teacher, prompts: torch.Tensor, new_tokens: int, batch_size: int = 16,
                      seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Kim & Rush's training set: each prompt continued by the teacher (sampled at T = 1, a
    cheap stand-in for their beam search), (N, P + new_tokens)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    return torch.cat([sample_continuations(teacher, b, new_tokens)
                      for b in tqdm(prompts.split(batch_size), desc="teacher text",
                                    disable=not progress)])


def even_windows(token_ids: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """``n`` non-overlapping (n, seq_len) windows spread evenly over a token stream, so that a
    fixed training set covers the whole corpus, not only its beginning."""
    from utils.data import token_windows

    windows = token_windows(token_ids, seq_len)
    if n > len(windows):
        raise ValueError(f"n must be at most {len(windows)} windows of {seq_len}, got {n}")
    return windows[torch.linspace(0, len(windows) - 1, n).long()]


def rows_batch_fn(rows: torch.Tensor, batch_size: int):
    """``finetune``'s ``batch_fn`` over fixed (N, T) rows (teacher text)."""
    def draw(generator):
        return rows[torch.randint(0, len(rows), (batch_size,), generator=generator)]
    return draw


# --------------------------------------------------------------------------- evaluation


def curve_trainer(val_ids, reference, eval_every: int, max_tokens: int = 8192, model_of=None):
    """``after_step`` that records [step, perplexity, agreement] every ``eval_every`` steps;
    ``model_of(wrapper)`` picks the model to evaluate (the student inside a wrapper)."""
    points, done = [], [0]

    def after(m):
        done[0] += 1
        if done[0] % eval_every == 0:
            target = model_of(m) if model_of else m
            target.eval()
            q = lm_quality(reference, target, val_ids, max_tokens)
            points.append([done[0], q["perplexity"], q["top1_agreement"]])
            m.train()
    return points, after


def run(model, loss_fn, steps: int, *, seed: int, val_ids, reference, eval_every: int = 50,
        max_tokens: int = 8192, model_of=None, desc: str = "distil", **train_kwargs) -> dict:
    """Train with ``finetune`` and return the curve, the final quality and the minutes taken."""
    points, after = curve_trainer(val_ids, reference, eval_every, max_tokens, model_of)
    start = time.perf_counter()
    losses = finetune(model, steps, seed=seed, loss_fn=loss_fn, after_step=after, desc=desc,
                      **train_kwargs)
    target = model_of(model) if model_of else model
    final = lm_quality(reference, target, val_ids, max_tokens)
    return {"curve": points, "final": final, "final_loss": losses[-1],
            "minutes": (time.perf_counter() - start) / 60}


def spread(values) -> dict[str, float]:
    """Mean, and half the range (max - min) / 2, of a few seeds' results."""
    values = list(values)
    return {"mean": sum(values) / len(values), "half_range": (max(values) - min(values)) / 2,
            "values": values}


# --------------------------------------------------------------------------- the recipes

STUDENT_TRAINING = dict(batch_size=8, seq_len=128, learning_rate=2e-3, warmup_steps=40,
                        weight_decay=0.1)
HEAL_TRAINING = dict(batch_size=8, seq_len=128, learning_rate=3e-4)


def _setup(max_tokens):
    from utils.metrics import reference_top1
    from utils.models import encode_split, load_course_model

    teacher, tok = load_course_model("teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    train_ids, val = encode_split("train", tok), encode_split("validation", tok)
    return teacher, tok, train_ids, val, reference_top1(teacher, val, max_tokens)


def _save(part, result):
    path = RESULTS_DIR / f"04_{part}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def students_recipe(steps: int = 300, seeds=(0, 1), eval_every: int = 50,
                    max_tokens: int = 8192, save_students: bool = True) -> dict:
    """The ``small`` student from scratch, same batches per seed: (a) cross-entropy only, (b)
    logit distillation T = 1, alpha = 0.5, (c) (b) plus hidden-state cosine distillation; then
    one seed each of (b) with the teacher truncated to its top 32, of T = 2, of T = 4 with and
    without T^2, and of (b) from a top-32 teacher cache (no teacher during training)."""
    teacher, tok, train_ids, val, ref = _setup(max_tokens)
    common = dict(val_ids=val, reference=ref, eval_every=eval_every, max_tokens=max_tokens,
                  data=train_ids, **STUDENT_TRAINING)
    variants = {
        "ce": lambda: (None, kd_objective(None)),
        "kd": lambda: (None, kd_objective(teacher, 1.0, 0.5)),
        "kd_hidden": lambda: ("hidden", hidden_kd_objective(teacher, 1.0, 0.5, 1.0)),
    }
    result = {"settings": {"steps": steps, "seeds": list(seeds), "max_tokens": max_tokens,
                           "threads": torch.get_num_threads(), **STUDENT_TRAINING},
              "runs": {}}
    for name, make in variants.items():
        for seed in seeds:
            wrap, loss_fn = make()
            student = new_student("small", seed)
            model = HiddenStateStudent(student, teacher) if wrap else student
            result["runs"][f"{name}/seed{seed}"] = run(
                model, loss_fn, steps, seed=seed, desc=f"{name} seed {seed}",
                model_of=(lambda w: w.student) if wrap else None, **common)
            if save_students and seed == seeds[0] and name in ("ce", "kd"):
                save_student(student, name)
            _save("students", result)
    for name, loss_fn in (("kd_top32", kd_objective(teacher, 1.0, 0.5, top_k=32)),
                          ("kd_T2", kd_objective(teacher, 2.0, 0.5)),
                          ("kd_T4", kd_objective(teacher, 4.0, 0.5)),
                          ("kd_T4_noT2", kd_objective(teacher, 4.0, 0.5, t_squared=False))):
        result["runs"][f"{name}/seed{seeds[0]}"] = run(new_student("small", seeds[0]), loss_fn,
                                                       steps, seed=seeds[0], desc=name, **common)
    # (b) again, the teacher replaced by its top-32 logits cached once on fixed windows, as many
    # as the run draws, spread over the whole training split
    windows = even_windows(train_ids, steps * STUDENT_TRAINING["batch_size"],
                           STUDENT_TRAINING["seq_len"])
    start = time.perf_counter()
    cache = build_topk_cache(teacher, windows, k=32)
    cache_minutes = (time.perf_counter() - start) / 60
    kw = {k: v for k, v in common.items() if k != "data"}
    r = run(new_student("small", seeds[0]), cached_kd_objective(1.0, 0.5), steps,
            seed=seeds[0], desc="kd from cache", batch_fn=cache.batch_fn(8), **kw)
    r.update(cache_minutes=cache_minutes, cache_bytes=cache.nbytes(),
             cache_tokens=windows.numel())
    result["runs"][f"kd_cache/seed{seeds[0]}"] = r
    _save("students", result)
    return result


def save_student(student, name: str):
    """Save a student as fp16 safetensors (half the bytes; loads back to fp32)."""
    out = STUDENTS_DIR / name
    copy.deepcopy(student).half().save_pretrained(out)
    return out


def load_student(name: str, dtype: torch.dtype = torch.float32):
    """A committed student (``"ce"`` or ``"kd"``) in eval mode."""
    from transformers import LlamaForCausalLM

    from utils.models import _no_loading_bar

    path = STUDENTS_DIR / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}/model.safetensors is missing: run "
                                "`python -m utils.distillation train students`")
    with _no_loading_bar():
        return LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()


def divergences_recipe(steps: int = 200, warm_steps: int = 200, eval_every: int = 50,
                       max_tokens: int = 8192, seed: int = 0, samples: int = 32) -> dict:
    """The ``tiny`` student (cannot represent the teacher), first trained ``warm_steps`` by
    cross-entropy (MiniLLM and GKD also start from a supervised student), then ``steps`` more by
    each objective from that same start: cross-entropy (the control), forward KL, reverse KL,
    JSD(0.5) on corpus text, and on-policy reverse KL (GKD, half the batches sampled by the
    student); perplexity, agreement and the sample-quality proxy of each."""
    teacher, tok, train_ids, val, ref = _setup(max_tokens)
    common = dict(val_ids=val, reference=ref, eval_every=eval_every, max_tokens=max_tokens,
                  data=train_ids, **STUDENT_TRAINING)
    from utils.data import token_windows

    prompts = token_windows(val, 64)[:samples, :16]
    start = new_student("tiny", seed)
    warm = run(start, kd_objective(None), warm_steps, seed=seed, desc="warm start", **common)
    variants = {"ce": kd_objective(None),
                "forward_kl": kd_objective(teacher, 1.0, 0.0, kind="forward_kl"),
                "reverse_kl": kd_objective(teacher, 1.0, 0.0, kind="reverse_kl"),
                "jsd": kd_objective(teacher, 1.0, 0.0, kind="jsd"),
                "on_policy_reverse_kl": on_policy_objective(teacher, "reverse_kl", fraction=0.5,
                                                            seed=seed)}
    result = {"settings": {"steps": steps, "warm_steps": warm_steps, "seed": seed,
                           "max_tokens": max_tokens, "samples": samples,
                           "threads": torch.get_num_threads(), **STUDENT_TRAINING},
              "warm_start": {**warm, "samples": sample_quality(start, teacher, prompts, seed=seed)},
              "teacher_samples": sample_quality(teacher, teacher, prompts, seed=seed), "runs": {}}
    for name, loss_fn in variants.items():
        student = copy.deepcopy(start)
        r = run(student, loss_fn, steps, seed=seed + 1, desc=name, **common)
        r["samples"] = sample_quality(student, teacher, prompts, seed=seed)
        result["runs"][name] = r
        _save("divergences", result)
    return result


def pruned_teacher(teacher, tokenizer, mlp_keep: float = 0.5):
    """Chapter 03's width-pruned teacher: half of every MLP's channels removed, chosen with
    activation-aware scores on 8 calibration sequences."""
    from utils.models import calibration_tokens
    from utils.pruning import structured_prune

    return structured_prune(teacher, mlp_keep,
                            calibration_ids=calibration_tokens(tokenizer, sequences=8,
                                                               seq_len=256))


def heal_objectives(teacher) -> dict:
    """Minitron's comparison: logit-only forward KL from the unpruned teacher (T = 1, no hard
    term, their best setting) vs plain next-token fine-tuning."""
    return {"distill": kd_objective(teacher, 1.0, 0.0), "finetune": kd_objective(None)}


def heal_recipe(steps: int = 200, seeds=(0, 1), eval_every: int = 50,
                max_tokens: int = 8192) -> dict:
    teacher, tok, train_ids, val, ref = _setup(max_tokens)
    pruned = pruned_teacher(teacher, tok)
    result = {"settings": {"steps": steps, "seeds": list(seeds), "max_tokens": max_tokens,
                           "threads": torch.get_num_threads(), "mlp_keep": 0.5, **HEAL_TRAINING},
              "teacher": lm_quality(ref, teacher, val, max_tokens),
              "before": lm_quality(ref, pruned, val, max_tokens), "runs": {}}
    for name, loss_fn in heal_objectives(teacher).items():
        for seed in seeds:
            result["runs"][f"{name}/seed{seed}"] = run(
                copy.deepcopy(pruned), loss_fn, steps, seed=seed, val_ids=val, reference=ref,
                eval_every=eval_every, max_tokens=max_tokens, data=train_ids,
                desc=f"{name} seed {seed}", **HEAL_TRAINING)
            _save("heal", result)
    return result


def sequence_recipe(steps: int = 300, sequences: int = 512, max_tokens: int = 8192,
                    seed: int = 0, eval_every: int = 50) -> dict:
    """Kim & Rush's sequence-level KD: the teacher continues ``sequences`` training prompts of 16
    tokens to 128; the small student trains on that text (cross-entropy) vs on the real text of
    the same prompts' windows, same steps."""
    teacher, tok, train_ids, val, ref = _setup(max_tokens)
    seq_len = STUDENT_TRAINING["seq_len"]
    real = even_windows(train_ids, sequences, seq_len)
    start = time.perf_counter()
    text = teacher_sequences(teacher, real[:, :16], seq_len - 16, seed=seed)
    gen_minutes = (time.perf_counter() - start) / 60
    kw = {k: v for k, v in STUDENT_TRAINING.items() if k != "seq_len"}
    result = {"settings": {"steps": steps, "sequences": sequences, "seed": seed,
                           "max_tokens": max_tokens, "threads": torch.get_num_threads(),
                           **STUDENT_TRAINING}, "generation_minutes": gen_minutes, "runs": {}}
    for name, rows in (("real_text", real), ("teacher_text", text)):
        result["runs"][name] = run(new_student("small", seed), kd_objective(None), steps,
                                   seed=seed, val_ids=val, reference=ref, eval_every=eval_every,
                                   max_tokens=max_tokens, batch_fn=rows_batch_fn(rows, 8),
                                   desc=name, **kw)
        _save("sequence", result)
    return result


RECIPES = {"students": students_recipe, "divergences": divergences_recipe, "heal": heal_recipe,
           "sequence": sequence_recipe}


def load_results(part: str) -> dict:
    check_choice("part", part, PARTS)
    path = RESULTS_DIR / f"04_{part}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m utils.distillation train {part}`")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- the chapter's table


def report_rows(quick: bool = False) -> list[dict]:
    """Teacher, the committed cross-entropy and distilled students, and chapter 03's pruned
    teacher: parameters, weight MB (fp32), decode speed-up vs the teacher (batch 1, same run),
    held-out perplexity and top-1 agreement with the teacher. ``quick``: short evaluation and
    timings."""
    from utils.metrics import reference_top1
    from utils.models import encode_split, load_course_model, model_weight_bytes
    from utils.pruning import latency_rows

    max_tokens = 512 if quick else 8192
    teacher, tok = load_course_model("teacher")
    val = encode_split("validation", tok)
    models = {"teacher": teacher, "student, cross-entropy only": load_student("ce"),
              "student, logit distillation": load_student("kd")}
    if not quick:
        models["teacher pruned 50% MLP (not healed)"] = pruned_teacher(teacher, tok)
    speed = latency_rows(models, prompt_len=16 if quick else 64,
                         decode_tokens=8 if quick else 32, min_run_time=0.05 if quick else 0.3)
    ref = reference_top1(teacher, val, max_tokens)
    rows = []
    for label, m in models.items():
        q = lm_quality(ref, m, val, max_tokens)
        rows.append({"model": label, "params_M": sum(p.numel() for p in m.parameters()) / 1e6,
                     "weight_MB": model_weight_bytes(m) / 1e6,
                     "decode_speedup": speed[label]["decode_speedup"],
                     "perplexity": q["perplexity"], "top1_agreement": q["top1_agreement"]})
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m utils.distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="a long recipe (minutes): its JSON goes under models/")
    train.add_argument("part", choices=PARTS)
    train.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    kwargs = {} if args.steps is None else {"steps": args.steps}
    print(RECIPES[args.part](**kwargs))
