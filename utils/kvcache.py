"""Chapter 06: the KV cache, FlashAttention's tiling, sampling and speculative decoding.

The serving engine (paged KV blocks, continuous batching, prefix caching, chunked prefill) is in
``utils.serving``; this file holds what one sequence needs.

- **KV cache** (Pope et al. 2022, §2.1): keys and values of past tokens are kept, so a decode step
  runs one token instead of the whole prefix. ``DynamicKVCache`` grows by concatenation (what
  transformers' ``DynamicCache`` does); ``utils.llama.StaticKVCache`` is allocated once, so every
  step has the same shapes (what ``torch.compile`` and CUDA graphs need).
- **FlashAttention** (Dao et al. 2022, Algorithm 1): attention over tiles of queries and keys with
  the online-softmax state (m, l, O) of chapter 01 (``utils.fusion.flash_attention_update``), so
  the T x T score matrix is never stored; with a causal mask, key tiles wholly above the diagonal
  are skipped (FlashAttention-2, Dao 2023, §3.1.1).
- **Sampling** as logits processors: temperature, top-k (Fan et al. 2018), top-p / nucleus
  (Holtzman et al. 2020, §3.1), seeded by a ``torch.Generator``.
- **Speculative decoding** (Leviathan et al. 2023; Chen et al. 2023): a cheap drafter proposes
  gamma tokens, the target scores them in one forward. Greedy: keep the longest prefix equal to
  the target's argmax. Sampling: accept draft x ~ q with probability min(1, p(x)/q(x)), else
  sample from norm(max(0, p - q)) (Leviathan §2.3, Chen Algorithm 2), which makes every emitted
  token exactly p-distributed. With acceptance rate alpha, a target call yields on average
  (1 - alpha^(gamma+1)) / (1 - alpha) tokens (Leviathan eq. 1), and the wall-clock speed-up is
  (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)) with c the drafter's cost per token over
  the target's (Leviathan Theorem 3.8). Prompt lookup (Saxena 2023) drafts by copying what
  followed the last n-gram's earlier occurrence: c ~ 0.

Reproduce the chapter's measurements::

    python -m utils.report 06
"""

from __future__ import annotations

import math
import time

import torch

from utils.fusion import flash_attention_update
from utils.llama import CourseLlama, StaticKVCache, causal_cache_mask
from utils.validation import check_positive, check_positive_int, check_tensor

CHAPTER = "06"


# --------------------------------------------------------------------------- caches, generation


class DynamicKVCache:
    """A KV cache that grows by one concatenation per layer and step (transformers'
    ``DynamicCache``): no memory reserved ahead, but every step reallocates and copies the whole
    cache and has a new shape. Tokens must arrive in order (positions 0, 1, 2, ...)."""

    def __init__(self, num_layers: int):
        check_positive_int("num_layers", num_layers)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer, positions, k, v):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)  # (B, Hkv, L + T, D)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    def mask(self, positions, length):
        return causal_cache_mask(positions, length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


def _check_generation(model, ids, new_tokens):
    if not isinstance(model, CourseLlama):
        raise TypeError(f"model must be a utils.llama.CourseLlama, got {type(model).__name__}")
    check_tensor("ids", ids)
    if ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] == 0:
        raise ValueError(f"ids must be a (B, T) long tensor with T >= 1, got "
                         f"{tuple(ids.shape)} {ids.dtype}")
    check_positive_int("new_tokens", new_tokens)
    if ids.shape[1] + new_tokens > model.cos.shape[0]:
        raise ValueError(f"prompt ({ids.shape[1]}) + new_tokens ({new_tokens}) exceed the model's "
                         f"{model.cos.shape[0]} positions")


@torch.inference_mode()
def generate(model: CourseLlama, ids: torch.Tensor, new_tokens: int, cache: str = "static",
             timings: dict | None = None) -> torch.Tensor:
    """Greedy generation of ``new_tokens`` after ``ids`` (B, T), with ``cache`` one of
    ``"none"`` (every step re-runs the whole sequence), ``"dynamic"`` (``DynamicKVCache``) or
    ``"static"`` (``StaticKVCache`` of exactly T + new_tokens positions). ``timings``, if given,
    receives ``prefill_s`` (the first forward, over the prompt) and ``decode_s`` (the rest)."""
    _check_generation(model, ids, new_tokens)
    if cache not in ("none", "dynamic", "static"):
        raise ValueError(f"cache must be 'none', 'dynamic' or 'static', got {cache!r}")
    B, T = ids.shape
    store = (None if cache == "none" else DynamicKVCache(len(model.blocks)) if cache == "dynamic"
             else StaticKVCache(model.config, B, T + new_tokens, dtype=model.embed.weight.dtype))
    t0 = time.perf_counter()
    logits = model(ids) if store is None else model(ids, store, torch.arange(T))
    out = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    t1 = time.perf_counter()
    for step in range(new_tokens - 1):
        if store is None:
            logits = model(out)  # the whole prefix, again
        else:
            logits = model(out[:, -1:], store, torch.tensor([T + step]))
        out = torch.cat([out, logits[:, -1:].argmax(-1)], dim=1)
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1)
    return out


def recompute_flops(num_params: int, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """Matmul FLOPs of the weights (2 x parameters per token, Kaplan et al. 2020, §2.1) for
    generating ``new_tokens`` after ``prompt_len``: (without a cache, with a cache). Without a
    cache step s re-runs prompt_len + s tokens: a sum that grows with the square of the length."""
    check_positive_int("num_params", num_params)
    check_positive_int("prompt_len", prompt_len)
    check_positive_int("new_tokens", new_tokens)
    tokens_without = sum(prompt_len + s for s in range(new_tokens))
    tokens_with = prompt_len + new_tokens - 1
    return 2 * num_params * tokens_without, 2 * num_params * tokens_with


# --------------------------------------------------------------------------- FlashAttention


def attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the whole (Tq, Tk) score matrix in memory (Dao et al.
    2022, Algorithm 0). ``causal``: key j masked for query i when j > i (top-left, as SDPA)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(s, dim=-1) @ v


def flash_attention_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 64,
                          block_k: int = 64, causal: bool = False) -> torch.Tensor:
    """Attention computed FlashAttention's way, one (block_q x block_k) tile at a time: for each
    query tile, the running (m, l, O) of ``utils.fusion.flash_attention_update`` over its key
    tiles. The largest intermediate is one tile of scores, so memory is O(T d), not O(T^2).
    ``causal``: key tiles that start after the query tile's last row are skipped (their scores
    are all masked), and only diagonal tiles are masked element by element. q (..., Tq, D),
    k (..., Tk, D), v (..., Tk, Dv), as ``scaled_dot_product_attention``."""
    for name, value in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, value)
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    if q.dim() < 2 or k.shape[-1] != q.shape[-1] or v.shape[-2] != k.shape[-2]:
        raise ValueError(f"need q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    t_q, t_k = q.shape[-2], k.shape[-2]
    batch = q.shape[:-2]
    out = torch.empty((*batch, t_q, v.shape[-1]), dtype=q.dtype)
    for qs in range(0, t_q, block_q):
        qe = min(t_q, qs + block_q)
        m = torch.full((*batch, qe - qs), -math.inf, dtype=q.dtype)
        l = torch.zeros((*batch, qe - qs), dtype=q.dtype)
        o = torch.zeros((*batch, qe - qs, v.shape[-1]), dtype=q.dtype)
        last_key = min(t_k, qe) if causal else t_k  # causal: keys after row qe - 1 never count
        for ks in range(0, last_key, block_k):
            ke = min(t_k, ks + block_k)
            s = (q[..., qs:qe, :] @ k[..., ks:ke, :].transpose(-1, -2)) * scale
            if causal and ke - 1 > qs:  # a diagonal tile: mask key j > query i inside it
                rows = torch.arange(qs, qe).unsqueeze(-1)
                s = s.masked_fill(torch.arange(ks, ke) > rows, -math.inf)
            m, l, o = flash_attention_update(m, l, o, s, v[..., ks:ke, :])
        out[..., qs:qe, :] = o
    return out


def attention_tiles(seq_len: int, block_q: int = 64, block_k: int = 64,
                    causal: bool = False) -> tuple[int, int]:
    """(tiles computed, tiles in the full grid) of ``flash_attention_tiled`` on a square T x T
    problem: the causal skip computes about half (plus the diagonal)."""
    check_positive_int("seq_len", seq_len)
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    n_k = -(-seq_len // block_k)
    total, computed = 0, 0
    for qs in range(0, seq_len, block_q):
        qe = min(seq_len, qs + block_q)
        total += n_k
        computed += -(-min(seq_len, qe) // block_k) if causal else n_k
    return computed, total


def attention_flops(seq_q: int, seq_k: int, head_dim: int) -> int:
    """Matmul FLOPs of one head's attention: QK^T and PV, 2 x 2 Tq Tk d. Tiling changes where
    the scores live, not this count."""
    check_positive_int("seq_q", seq_q)
    check_positive_int("seq_k", seq_k)
    check_positive_int("head_dim", head_dim)
    return 4 * seq_q * seq_k * head_dim


# --------------------------------------------------------------------------- sampling


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T: T < 1 sharpens, T > 1 flattens; T -> 0 is greedy."""
    check_positive(temperature=temperature)
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row, set the rest to -inf (ties at the k-th value are
    kept, as transformers' ``TopKLogitsWarper``)."""
    check_positive_int("k", k)
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, §3.1): keep the smallest set of most likely
    tokens whose probabilities sum to at least p; the most likely token is always kept."""
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens strictly more likely than this one
    drop_sorted = (before >= p) & (p < 1)  # p = 1 keeps all: rounding puts before ~ 1
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the order of transformers' ``generate``."""
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_token(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from a probability vector (V,), reproducible with ``generator``."""
    return int(torch.multinomial(probs, 1, generator=generator))


# --------------------------------------------------------------------------- speculative decoding


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Tokens a target forward yields on average with gamma drafts each accepted with
    probability alpha, independently: (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al.
    2023, eq. 1); gamma + 1 when alpha = 1."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 0:
        raise ValueError(f"gamma must be an integer >= 0, got {gamma!r}")
    return float(gamma + 1) if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def speculative_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Expected wall-clock speed-up over plain decoding, (1 - alpha^(gamma+1)) /
    ((1 - alpha)(gamma c + 1)) (Leviathan et al. 2023, Theorem 3.8): a round costs gamma draft
    steps (c each, in target steps) plus one target forward, which costs one step because
    scoring gamma + 1 tokens is as memory-bound as scoring one."""
    if cost_ratio < 0:
        raise ValueError(f"cost_ratio must be >= 0, got {cost_ratio}")
    return expected_tokens_per_call(alpha, gamma) / (gamma * cost_ratio + 1)


def optimal_draft_length(alpha: float, cost_ratio: float, max_gamma: int = 32) -> int:
    """The gamma in 1..max_gamma with the largest ``speculative_speedup`` (the smallest on
    ties)."""
    check_positive_int("max_gamma", max_gamma)
    return max(range(1, max_gamma + 1),
               key=lambda g: (speculative_speedup(alpha, g, cost_ratio), -g))


def acceptance_probability(p: torch.Tensor, q: torch.Tensor) -> float:
    """beta = sum_x min(p(x), q(x)): the chance a draft x ~ q is accepted (Leviathan §3.1)."""
    return float(torch.minimum(p, q).sum())


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int,
                       generator: torch.Generator) -> tuple[int, bool]:
    """Leviathan et al.'s rule for one draft ``token`` ~ q, target distribution p (both (V,)):
    accept with probability min(1, p/q); else draw from the residual max(0, p - q) normalised.
    Returns (the emitted token, whether the draft was accepted); the emitted token is exactly
    p-distributed (Leviathan Appendix A.1)."""
    u = float(torch.rand((), generator=generator))
    if q[token] > 0 and u < min(1.0, float(p[token] / q[token])):
        return token, True
    residual = (p - q).clamp_min(0)
    if not residual.sum() > 0:  # p == q: rejection has probability 0; fall back to p
        residual = p
    return sample_token(residual / residual.sum(), generator), False


def verify_greedy(target_logits: torch.Tensor, drafts: list[int]) -> list[int]:
    """The tokens a greedy round emits: drafts while they equal the target's argmax, then the
    target's own token (a correction, or the bonus token after gamma accepts).
    ``target_logits`` (gamma + 1, V): row i scores the position of draft i."""
    best = target_logits.argmax(-1).tolist()
    out = []
    for i, d in enumerate(drafts):
        if d != best[i]:
            break
        out.append(d)
    return out + [best[len(out)]]


def verify_sampled(p_rows: torch.Tensor, q_rows: torch.Tensor, drafts: list[int],
                   generator: torch.Generator) -> list[int]:
    """The tokens a sampling round emits: each draft through ``accept_or_resample`` until the
    first rejection (its resampled token ends the round); after gamma accepts, a bonus token
    from p's last row. ``p_rows`` (gamma + 1, V), ``q_rows`` (gamma, V) probabilities."""
    out = []
    for i, d in enumerate(drafts):
        token, accepted = accept_or_resample(p_rows[i], q_rows[i], d, generator)
        out.append(token)
        if not accepted:
            return out
    return out + [sample_token(p_rows[len(drafts)], generator)]


def prompt_lookup_draft(tokens: list[int], gamma: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup drafting (Saxena 2023): find the last n tokens (n = max_ngram down to 1)
    earlier in ``tokens`` (latest occurrence first) and propose the up to ``gamma`` tokens that
    followed it. No model, no cost; [] if no n-gram recurs."""
    check_positive_int("gamma", gamma)
    check_positive_int("max_ngram", max_ngram)
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + gamma]
    return []


class _CachedModel:
    """A course model with a static cache and the count of positions already in it."""

    def __init__(self, model, length):
        self.model, self.filled = model, 0
        self.cache = StaticKVCache(model.config, 1, length, dtype=model.embed.weight.dtype)

    def run(self, tokens: list[int], start: int) -> torch.Tensor:
        """Feed ``tokens`` at positions start, start + 1, ...; returns their logits (T, V)."""
        ids = torch.tensor([tokens])
        logits = self.model(ids, self.cache, torch.arange(start, start + len(tokens)))
        self.filled = start + len(tokens)
        return logits[0]


@torch.inference_mode()
def speculative_generate(target: CourseLlama, ids: torch.Tensor, new_tokens: int, gamma: int = 4,
                         draft: CourseLlama | None = None, *, sampling: dict | None = None,
                         generator: torch.Generator | None = None,
                         max_ngram: int = 3) -> tuple[torch.Tensor, dict]:
    """Speculative decoding of ``new_tokens`` after ``ids`` (1, T).

    ``draft``: a small model that drafts ``gamma`` tokens per round (None: prompt lookup,
    ``prompt_lookup_draft``). ``sampling``: None for greedy (output identical to the target's
    greedy decoding), or ``process_logits`` arguments (``temperature``, ``top_k``, ``top_p``)
    applied to target and drafter alike, with ``generator`` for the draws. Both models keep a
    static cache; rejected positions are simply overwritten next round (a query never looks past
    its own position). Returns (ids (1, T + new_tokens), stats: rounds, target_calls,
    draft_calls, proposed, accepted, rejections, alpha = accepted / (accepted + rejections),
    beta = mean sum(min(p, q)) over scored drafts (sampling with a model drafter))."""
    _check_generation(target, ids, new_tokens)
    check_positive_int("gamma", gamma)
    if ids.shape[0] != 1:
        raise ValueError(f"ids must hold one sequence (1, T), got {tuple(ids.shape)}")
    if sampling is not None and generator is None:
        raise ValueError("generator must be a torch.Generator when sampling")
    tokens = ids[0].tolist()
    goal = len(tokens) + new_tokens
    length = goal + gamma + 1
    tgt = _CachedModel(target, length)
    drf = _CachedModel(draft, length) if draft is not None else None

    def probs(logits):
        return torch.softmax(process_logits(logits.float(), **sampling), dim=-1)

    if len(tokens) > 1:  # invariant: each cache holds every token but the last
        tgt.run(tokens[:-1], 0)
        if drf is not None:
            drf.run(tokens[:-1], 0)
    stats = dict(rounds=0, target_calls=0, draft_calls=0, proposed=0, accepted=0, rejections=0)
    betas = []
    while len(tokens) < goal:
        n = len(tokens)
        g = min(gamma, goal - n)
        q_rows = []
        if drf is None:
            drafts = prompt_lookup_draft(tokens, g, max_ngram)
            q_rows = [torch.nn.functional.one_hot(torch.tensor(d), target.config.vocab_size)
                      .float() for d in drafts]
        else:
            drafts, feed, start = [], tokens[drf.filled:], drf.filled
            for _ in range(g):
                logits = drf.run(feed, start)[-1]
                stats["draft_calls"] += 1
                if sampling is None:
                    d = int(logits.argmax())
                else:
                    q_rows.append(probs(logits))
                    d = sample_token(q_rows[-1], generator)
                drafts.append(d)
                feed, start = [d], drf.filled
        logits = tgt.run([tokens[-1], *drafts], n - 1)  # (len(drafts) + 1, V): one call
        stats["target_calls"] += 1
        if sampling is None:
            emitted = verify_greedy(logits, drafts)
        else:
            p_rows = probs(logits)
            q_stack = torch.stack(q_rows) if q_rows else p_rows[:0]
            emitted = verify_sampled(p_rows, q_stack, drafts, generator)
            if drf is not None:  # the drafts scored: those accepted and the first rejected
                betas += [acceptance_probability(p_rows[i], q_stack[i])
                          for i in range(min(len(drafts), len(emitted)))]
        accepted = len(emitted) - 1
        stats["rounds"] += 1
        stats["proposed"] += len(drafts)
        stats["accepted"] += accepted
        stats["rejections"] += int(accepted < len(drafts))
        tokens += emitted
        tgt.filled = n + accepted  # every token but the last is in the target's cache
        if drf is not None:  # drafts d_1 .. d_(g-1) were fed; keep those that were accepted
            drf.filled = min(drf.filled, n + accepted)
    scored = stats["accepted"] + stats["rejections"]
    stats["alpha"] = stats["accepted"] / scored if scored else float("nan")
    stats["beta"] = sum(betas) / len(betas) if betas else float("nan")
    return torch.tensor([tokens[:goal]]), stats


@torch.inference_mode()
def sample_generate(model: CourseLlama, ids: torch.Tensor, new_tokens: int, *, sampling: dict,
                    generator: torch.Generator) -> torch.Tensor:
    """Plain autoregressive sampling with ``process_logits(**sampling)`` and a static cache:
    the reference distribution that speculative sampling must reproduce."""
    _check_generation(model, ids, new_tokens)
    tokens = ids[0].tolist()
    run = _CachedModel(model, len(tokens) + new_tokens)
    logits = run.run(tokens, 0)[-1]
    for _ in range(new_tokens):
        tokens.append(sample_token(torch.softmax(process_logits(logits.float(), **sampling), -1),
                                   generator))
        if len(tokens) < run.cache.max_length:
            logits = run.run(tokens[-1:], len(tokens) - 1)[-1]
    return torch.tensor([tokens])


def chi_square_pvalue(counts: list[int], probs: list[float]) -> float:
    """Pearson's chi-square goodness-of-fit p-value of observed ``counts`` against ``probs``;
    categories with expected count below 5 are pooled into one (the usual validity rule)."""
    from scipy.stats import chi2

    n = sum(counts)
    if n == 0 or len(counts) != len(probs):
        raise ValueError("counts must be non-empty and as long as probs")
    total = sum(probs)
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for c, p in zip(counts, probs):
        e = n * p / total
        if e < 5:
            pool_o, pool_e = pool_o + c, pool_e + e
        else:
            obs.append(c)
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    if len(obs) < 2:
        raise ValueError("need at least two categories with expected count >= 5")
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return float(chi2.sf(stat, len(obs) - 1))


# --------------------------------------------------------------------------- report


def report_rows(quick: bool = False) -> list[dict]:
    """Chapter 06's headline figures (``python -m utils.report 06``): generation with and without
    the cache, the continuous vs static batching throughput, paged vs contiguous KV waste and
    greedy speculative decoding with the small model and prompt lookup. ``quick``: the small
    model and short runs."""
    from utils import serving
    from utils.bench import compare

    from utils.paths import MODELS_DIR

    name = "small" if quick else "teacher"
    model = CourseLlama.from_checkpoint(MODELS_DIR / name)
    threads = torch.get_num_threads()
    prompt, new = (16, 16) if quick else (64, 256)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(0))
    rows = []

    def add(measurement, value, unit, conditions):
        rows.append({"measurement": measurement, "value": float(value), "unit": unit,
                     "conditions": conditions})

    res = compare({"recompute": lambda: generate(model, ids, new, "none"),
                   "static cache": lambda: generate(model, ids, new, "static")},
                  rounds=1, warmup=0 if not quick else 1, min_run_time=0.05)
    cond = f"{name} fp32, batch 1, prompt {prompt}, {new} new tokens, cpu, {threads} threads"
    add("generation speed-up of the KV cache", res["static cache"]["speedup"], "x", cond)
    workload = serving.poisson_workload(8 if quick else 32, rate=50.0, seed=0,
                                        prompt_range=(8, 64), output_range=(4, 32 if quick else 96))
    results = {policy: serving.run_engine(model, workload, policy=policy, max_batch=8)
               for policy in ("static", "continuous")}
    add("continuous / static batching throughput",
        results["continuous"]["throughput"] / results["static"]["throughput"], "x",
        f"{name}, {len(workload)} Poisson requests, max batch 8, {threads} threads")
    waste = results["continuous"]["memory"]
    add("KV bytes wasted, contiguous max-length", waste["contiguous_waste"], "fraction",
        "reserved but unused, time-averaged")
    add("KV bytes wasted, paged (16-token blocks)", waste["paged_waste"], "fraction",
        "reserved but unused, time-averaged")
    drafter = CourseLlama.from_checkpoint(MODELS_DIR / "small")
    text_ids = serving.corpus_prompt(prompt)
    _, stats = speculative_generate(model, text_ids, 32 if quick else 128, 4, drafter)
    add("speculative decoding acceptance rate, small drafts", stats["alpha"], "fraction",
        f"greedy, gamma 4, {name} target")
    _, stats = speculative_generate(model, text_ids, 32 if quick else 128, 4, None)
    add("prompt-lookup acceptance rate", stats["alpha"], "fraction", f"greedy, gamma 4, {name}")
    return rows
