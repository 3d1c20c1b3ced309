"""Chapter 07's cost model of parallel inference: what the collectives measured on this 2-core
machine (``utils.parallel``) predict for GPU clusters it cannot show.

- **Alpha-beta communication model** (Hockney 1994, "The communication challenge for MPP: Intel
  Paragon and Meiko CS-2"): one message of n bytes takes ``t = alpha + n / beta``, a latency plus
  a transfer at bandwidth beta (bytes/s; the papers below write beta as seconds per byte).
  ``fit_alpha_beta`` fits the two numbers to measured times.
- **Ring collectives** (Thakur, Rabenseifner & Gropp 2005, "Optimization of collective
  communication operations in MPICH", §2 cost model and the ring algorithm; Patarasuk & Yuan
  2009, "Bandwidth optimal all-reduce algorithms for clusters of workstations", whose lower
  bound 2 (p-1)/p n the ring all-reduce meets): all-gather and reduce-scatter take p - 1 steps,
  all-reduce is a reduce-scatter followed by an all-gather, 2 (p - 1) steps.
- **Pipeline bubble** (GPipe, Huang et al. 2019, §2.2): with K stages and M micro-batches a
  fraction (K - 1) / (M + K - 1) of each stage's time is idle.
- **Tensor parallelism** (Megatron-LM, Shoeybi et al. 2019, §3): two all-reduces of the hidden
  state per layer in the forward pass. At batch-1 decode the weights are read once per token, so
  n GPUs read n times faster while the all-reduces add a cost that grows with n: the
  ``tp_decode_time`` model, fitted to gpt-fast's published tokens/s (``fit_tp_model``).
- **Memory planning**: bytes per rank of weights, KV cache and activations for a TP x PP plan
  (``memory_per_rank``), and the smallest plan that fits a device (``smallest_plan``).

Sizes are bytes, times seconds, bandwidths bytes per second throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from utils.llama import LlamaConfig
from utils.validation import check_positive, check_positive_int

CHAPTER_PART = "07"  # chapter 07's second module (utils.parallel holds CHAPTER and the report)


# --------------------------------------------------------------------------- published numbers

# memory_bytes: the datasheets' 80 GB read as 80e9 (the boards report about 80 GiB; 80e9 is the
# cautious reading).
# NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): HBM2e 2,039 GB/s; third-generation
# NVLink 600 GB/s per GPU, the total of both directions (12 links x 25 GB/s x 2), so 300 GB/s
# each way. A ring step sends and receives at once, so the ring model's beta is one direction.
A100_80GB_SXM = {"hbm_bytes_per_s": 2039e9, "memory_bytes": 80e9,
                 "nvlink_bytes_per_s": 600e9, "nvlink_bytes_per_s_per_direction": 300e9}
# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): HBM3 3.35 TB/s; fourth-generation NVLink
# 900 GB/s per GPU, both directions together (450 GB/s each way).
H100_SXM = {"hbm_bytes_per_s": 3.35e12, "memory_bytes": 80e9,
            "nvlink_bytes_per_s": 900e9, "nvlink_bytes_per_s_per_direction": 450e9}

# Llama 2 (Touvron et al. 2023), the transformers config.json of meta-llama/Llama-2-7b-hf and
# Llama-2-70b-hf (untied lm_head, no biases). The parameter counts follow from these shapes:
# 6,738,415,616 and 68,976,648,192.
LLAMA2_7B_CONFIG = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                    "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
                    "tie_word_embeddings": False}
LLAMA2_70B_CONFIG = {"num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
                     "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 32000,
                     "tie_word_embeddings": False}
LLAMA2_7B_PARAMS = 6.74e9
LLAMA2_70B_PARAMS = 68.98e9

# Tokens/s of Llama-2-7B ("Base": bf16 weights, torch.compile) under tensor parallelism, from the
# pytorch-labs/gpt-fast README, "Tensor Parallelism" table: 8x A100 80GB power-limited to 330 W,
# NVLink in a hybrid cube mesh, launched with ENABLE_INTRA_NODE_COMM=1 (PyTorch's intra-node
# all-reduce, not NCCL's ring), batch 1, a 5-token prompt. (An earlier README, before intra-node
# comm, listed 136.27 / 168.78 / 179.27 tok/s for 2 / 4 / 8 GPUs.)
GPT_FAST_LLAMA2_7B_TP = {1: 104.9, 2: 168.8, 4: 254.0, 8: 328.4}


def _check_non_negative(**values) -> None:
    """Each keyword must be a finite number >= 0 (a size or a latency may be zero)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not value >= 0 or math.isinf(value):
            raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


# --------------------------------------------------------------------------- alpha-beta model

def fit_alpha_beta(nbytes, seconds) -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) of ``t = alpha + n / beta`` by least squares over measured
    (message size, time) pairs, e.g. one collective of ``utils.parallel.collective_times``.

    The intercept alpha can come out slightly negative when latency is small next to the noise;
    it is returned as fitted. A slope <= 0 (time not growing with size) has no bandwidth and
    raises ValueError."""
    sizes = np.asarray(nbytes, dtype=np.float64).ravel()
    times = np.asarray(seconds, dtype=np.float64).ravel()
    if sizes.size != times.size:
        raise ValueError(f"nbytes and seconds must have the same length, got {sizes.size} and "
                         f"{times.size}")
    if sizes.size < 2 or np.unique(sizes).size < 2:
        raise ValueError(f"nbytes must hold at least 2 different sizes to fit a line, got "
                         f"{sizes.tolist()}")
    if not (np.isfinite(sizes).all() and np.isfinite(times).all()) or (sizes < 0).any():
        raise ValueError("nbytes must be finite and >= 0 and seconds finite")
    slope, alpha = np.polyfit(sizes, times, 1)
    if not slope > 0:
        raise ValueError(f"seconds must grow with nbytes to give a bandwidth, fitted slope "
                         f"{slope:.3g} s/byte")
    return float(alpha), float(1.0 / slope)


def p2p_time(nbytes, alpha, beta) -> float:
    """Seconds for one point-to-point message of ``nbytes``: alpha + n / beta (Hockney)."""
    _check_non_negative(nbytes=nbytes, alpha=alpha)
    check_positive(beta=beta)
    return alpha + nbytes / beta


# --------------------------------------------------------------------------- ring collectives

def _check_collective(nbytes, p) -> None:
    _check_non_negative(nbytes=nbytes)
    check_positive_int("p", p)


def ring_allreduce_bytes(nbytes, p: int) -> float:
    """Bytes each rank sends in a ring all-reduce of an ``nbytes`` vector over p ranks:
    reduce-scatter then all-gather, each p - 1 chunks of n / p, so 2 (p - 1) / p * n (the
    Patarasuk-Yuan lower bound: it does not grow with p)."""
    _check_collective(nbytes, p)
    return 2 * (p - 1) / p * nbytes


def ring_allgather_bytes(nbytes, p: int) -> float:
    """Bytes each rank sends in a ring all-gather whose *gathered* result is ``nbytes``: p - 1
    steps each forwarding one n / p block, (p - 1) / p * n."""
    _check_collective(nbytes, p)
    return (p - 1) / p * nbytes


def ring_reduce_scatter_bytes(nbytes, p: int) -> float:
    """Bytes each rank sends in a ring reduce-scatter of an ``nbytes`` input: (p - 1) / p * n."""
    _check_collective(nbytes, p)
    return (p - 1) / p * nbytes


def allreduce_time(nbytes, p: int, alpha, beta) -> float:
    """Ring all-reduce seconds: 2 (p - 1) alpha + 2 (p - 1) / p * n / beta (Thakur et al. 2005:
    2 (p - 1) steps, each a latency and one n / p chunk). 0 for p = 1."""
    return 2 * (p - 1) * alpha + ring_allreduce_bytes(nbytes, p) / _beta(alpha, beta)


def allgather_time(nbytes, p: int, alpha, beta) -> float:
    """Ring all-gather seconds, n the gathered size: (p - 1) alpha + (p - 1) / p * n / beta."""
    return (p - 1) * alpha + ring_allgather_bytes(nbytes, p) / _beta(alpha, beta)


def reduce_scatter_time(nbytes, p: int, alpha, beta) -> float:
    """Ring reduce-scatter seconds: (p - 1) alpha + (p - 1) / p * n / beta."""
    return (p - 1) * alpha + ring_reduce_scatter_bytes(nbytes, p) / _beta(alpha, beta)


def _beta(alpha, beta) -> float:
    _check_non_negative(alpha=alpha)
    check_positive(beta=beta)
    return beta


# --------------------------------------------------------------------------- pipeline bubble

def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of a GPipe schedule, (K - 1) / (M + K - 1) (Huang et al. 2019, §2.2): the
    first stage waits K - 1 slots at the end, the last K - 1 at the start, of M + K - 1."""
    check_positive_int("stages", stages)
    check_positive_int("microbatches", microbatches)
    return (stages - 1) / (microbatches + stages - 1)


# --------------------------------------------------------------------------- tensor parallelism

def tp_allreduce_bytes_per_token(num_layers: int, hidden_size: int, dtype_bytes=2) -> float:
    """Payload all-reduced per token by Megatron tensor parallelism: two all-reduces of the
    hidden state per layer in the forward pass, after attention's o_proj and after the MLP's
    down_proj (Shoeybi et al. 2019, §3), so 2 * layers * hidden * dtype_bytes."""
    check_positive_int("num_layers", num_layers)
    check_positive_int("hidden_size", hidden_size)
    check_positive(dtype_bytes=dtype_bytes)
    return 2 * num_layers * hidden_size * dtype_bytes


def tp_bytes_sent_per_rank_per_token(num_layers: int, hidden_size: int, tp: int,
                                     dtype_bytes=2) -> float:
    """Bytes each TP rank sends per token when its all-reduces run as rings: 2 (tp - 1) / tp of
    the payload (``ring_allreduce_bytes``). Nearly flat in tp: links do not relieve TP."""
    check_positive_int("tp", tp)
    return ring_allreduce_bytes(tp_allreduce_bytes_per_token(num_layers, hidden_size,
                                                             dtype_bytes), tp)


def tp_decode_time(weight_bytes, n_gpus: int, hbm_bytes_per_s, num_layers: int, hidden_size: int,
                   *, link_alpha_s, link_bytes_per_s, batch: int = 1, dtype_bytes=2,
                   efficiency=1.0, allreduce_overhead_s=0.0) -> float:
    """Seconds per decode step (every sequence of the batch gains a token) with tensor
    parallelism over ``n_gpus``:

        weight_bytes / (n * hbm * efficiency)
        + 2 * num_layers * (allreduce_overhead_s + allreduce_time(batch * hidden * dtype, n))

    Each GPU reads its 1/n of the weights (memory-bound decode: the roofline of chapter 00);
    ``efficiency`` is the fraction of peak HBM bandwidth reached. ``allreduce_overhead_s`` is a
    fixed cost per all-reduce call beyond its ring steps (launch, synchronisation: NCCL's own
    tuning model, src/graph/tuning.cc, has such a base latency plus a per-step latency); 0 gives
    the plain ring model. Ignored: compute, KV-cache reads (short contexts), the embedding and
    lm_head being vocab-sharded rather than read whole, and overlap of communication with work."""
    check_positive(weight_bytes=weight_bytes, hbm_bytes_per_s=hbm_bytes_per_s,
                   efficiency=efficiency)
    check_positive_int("n_gpus", n_gpus)
    check_positive_int("batch", batch)
    _check_non_negative(allreduce_overhead_s=allreduce_overhead_s)
    if efficiency > 1:
        raise ValueError(f"efficiency must be in (0, 1] (a fraction of peak), got {efficiency!r}")
    check_positive_int("num_layers", num_layers)
    check_positive_int("hidden_size", hidden_size)
    check_positive(dtype_bytes=dtype_bytes)
    read = weight_bytes / (n_gpus * hbm_bytes_per_s * efficiency)
    message = batch * hidden_size * dtype_bytes
    per_allreduce = allreduce_time(message, n_gpus, link_alpha_s, link_bytes_per_s)
    if n_gpus > 1:
        per_allreduce += allreduce_overhead_s
    return read + 2 * num_layers * per_allreduce


def _nonnegative_lstsq(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a latency cannot be negative): the best of
    the unconstrained fits over each subset of columns whose coefficients all come out >= 0."""
    n_cols = design.shape[1]
    best, best_residual = np.zeros(n_cols), float(np.sum(target ** 2))
    for mask in range(1, 2 ** n_cols):
        cols = [c for c in range(n_cols) if mask >> c & 1]
        coef, *_ = np.linalg.lstsq(design[:, cols], target, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(n_cols)
        full[cols] = coef
        residual = float(np.sum((design @ full - target) ** 2))
        if residual < best_residual:
            best, best_residual = full, residual
    return best


def fit_tp_model(published: dict | None = None, *, weight_bytes=LLAMA2_7B_PARAMS * 2,
                 hbm_bytes_per_s=A100_80GB_SXM["hbm_bytes_per_s"], num_layers: int = 32,
                 hidden_size: int = 4096, batch: int = 1, dtype_bytes=2,
                 link_bytes_per_s=A100_80GB_SXM["nvlink_bytes_per_s_per_direction"],
                 fit_overhead: bool = True) -> dict:
    """Fit ``tp_decode_time`` to published tokens/s per GPU count (default: gpt-fast's Llama-2-7B
    on A100s, ``GPT_FAST_LLAMA2_7B_TP``).

    ``efficiency`` comes from n = 1 alone (no communication there). The latencies come from all
    n > 1 at once, by least squares on relative errors (each n weighs the same in percent), kept
    >= 0: ``link_alpha_s`` per ring step and, with ``fit_overhead``, ``allreduce_overhead_s`` per
    all-reduce call. Without the overhead term the ring model grows as n - 1 and cannot follow
    a cost that is already large at n = 2 (misses gpt-fast by 15-20%). Returns the parameters,
    ``predicted`` tokens/s per n and ``relative_error`` per n (predicted / published - 1)."""
    published = GPT_FAST_LLAMA2_7B_TP if published is None else published
    if not isinstance(published, dict) or 1 not in published:
        raise ValueError(f"published must be a dict {{n_gpus: tokens/s}} including n_gpus = 1, "
                         f"got {published!r}")
    for n, rate in published.items():
        check_positive_int("published n_gpus", n)
        check_positive(**{f"published[{n}]": rate})
    multi = sorted(n for n in published if n > 1)
    if len(multi) < (2 if fit_overhead else 1):
        raise ValueError(f"published must hold at least {2 if fit_overhead else 1} GPU counts "
                         f"above 1 to fit the latencies, got {sorted(published)}")
    check_positive_int("batch", batch)
    step = {n: batch / rate for n, rate in published.items()}  # seconds per decode step
    efficiency = weight_bytes / (hbm_bytes_per_s * step[1])
    if efficiency > 1:
        raise ValueError(f"published[1] = {published[1]} tok/s beats the HBM bound "
                         f"{batch * hbm_bytes_per_s / weight_bytes:.1f}: check weight_bytes")

    def model(n, alpha, overhead):
        return tp_decode_time(weight_bytes, n, hbm_bytes_per_s, num_layers, hidden_size,
                              link_alpha_s=alpha, link_bytes_per_s=link_bytes_per_s,
                              batch=batch, dtype_bytes=dtype_bytes, efficiency=efficiency,
                              allreduce_overhead_s=overhead)

    # step(n) - model(n, 0, 0) = 2 L * 2 (n - 1) * alpha + 2 L * overhead: linear in both.
    rows, target = [], []
    for n in multi:
        columns = [2 * num_layers * 2 * (n - 1)] + ([2 * num_layers] if fit_overhead else [])
        rows.append([c / step[n] for c in columns])
        target.append((step[n] - model(n, 0.0, 0.0)) / step[n])
    coef = _nonnegative_lstsq(np.array(rows), np.array(target))
    alpha = float(coef[0])
    overhead = float(coef[1]) if fit_overhead else 0.0
    predicted = {n: batch / model(n, alpha, overhead) for n in sorted(published)}
    return {"efficiency": efficiency, "link_alpha_s": alpha, "allreduce_overhead_s": overhead,
            "link_bytes_per_s": link_bytes_per_s, "hbm_bytes_per_s": hbm_bytes_per_s,
            "weight_bytes": weight_bytes, "predicted": predicted,
            "relative_error": {n: predicted[n] / published[n] - 1 for n in predicted}}


def published_tp_table(published: dict | None = None, **fit_kwargs) -> list[dict]:
    """gpt-fast's tokens/s next to the fitted model's and the HBM-only bound (n GPUs reading the
    weights at full peak bandwidth, no communication): how far from linear TP scales, and why."""
    published = GPT_FAST_LLAMA2_7B_TP if published is None else published
    fit = fit_tp_model(published, **fit_kwargs)
    batch = fit_kwargs.get("batch", 1)
    return [{"gpus": n, "published tok/s": published[n],
             "predicted tok/s": round(fit["predicted"][n], 1),
             "bound tok/s (HBM only)": round(batch * n * fit["hbm_bytes_per_s"]
                                             / fit["weight_bytes"], 1)}
            for n in sorted(published)]


# --------------------------------------------------------------------------- pipeline parallelism

def pp_decode_time(weight_bytes, n_stages: int, hbm_bytes_per_s, hidden_size: int, *,
                   link_alpha_s, link_bytes_per_s, batch: int = 1, dtype_bytes=2,
                   efficiency=1.0) -> float:
    """Seconds per token of one request under pipeline parallelism over K stages:

        weight_bytes / (hbm * efficiency) + (K - 1) * p2p_time(batch * hidden * dtype_bytes)

    A token passes every stage in turn, and each stage reads its 1/K of the weights, so the
    reading adds up to one GPU's: latency does not fall with K; each hop adds a message.
    Ignored: compute, KV-cache reads, returning the sampled token to the first stage."""
    check_positive(weight_bytes=weight_bytes, hbm_bytes_per_s=hbm_bytes_per_s,
                   efficiency=efficiency)
    check_positive_int("n_stages", n_stages)
    check_positive_int("hidden_size", hidden_size)
    check_positive_int("batch", batch)
    check_positive(dtype_bytes=dtype_bytes)
    if efficiency > 1:
        raise ValueError(f"efficiency must be in (0, 1] (a fraction of peak), got {efficiency!r}")
    hop = p2p_time(batch * hidden_size * dtype_bytes, link_alpha_s, link_bytes_per_s)
    return weight_bytes / (hbm_bytes_per_s * efficiency) + (n_stages - 1) * hop


def pp_throughput(weight_bytes, n_stages: int, hbm_bytes_per_s, hidden_size: int, *,
                  in_flight: int, link_alpha_s, link_bytes_per_s, batch: int = 1,
                  dtype_bytes=2, efficiency=1.0) -> float:
    """Tokens/s with ``in_flight`` micro-batches (of ``batch`` sequences) cycling through K
    stages: batch * min(M, K) / ``pp_decode_time``. Each micro-batch's next token needs its
    previous one, so at most K are in different stages at once: throughput rises with M up to
    K-fold, then stays. Ignored: as ``pp_decode_time``, and uneven stages."""
    check_positive_int("in_flight", in_flight)
    per_token = pp_decode_time(weight_bytes, n_stages, hbm_bytes_per_s, hidden_size,
                               link_alpha_s=link_alpha_s, link_bytes_per_s=link_bytes_per_s,
                               batch=batch, dtype_bytes=dtype_bytes, efficiency=efficiency)
    return batch * min(in_flight, n_stages) / per_token


# --------------------------------------------------------------------------- memory planning

@dataclass(frozen=True)
class _Shape:
    """The sizes memory planning needs, whatever config they came from."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool


_HF_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
            "vocab_size")


def _shape(config) -> _Shape:
    """From a course ``LlamaConfig`` (its lm_head is tied, as in ``CourseLlama``), a transformers
    ``PretrainedConfig`` or a dict of its config.json keys (untied unless it says so)."""
    if isinstance(config, LlamaConfig):
        return _Shape(config.num_layers, config.hidden_size, config.num_heads,
                      config.num_kv_heads, config.head_dim, config.intermediate_size,
                      config.vocab_size, True)
    if isinstance(config, dict):
        get = config.get
    elif hasattr(config, "num_hidden_layers"):
        def get(key, default=None):
            return getattr(config, key, default)
    else:
        raise TypeError(f"config must be a utils.llama.LlamaConfig, a transformers "
                        f"PretrainedConfig or a dict of its keys, got {type(config).__name__}")
    missing = [key for key in _HF_KEYS if get(key) is None]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}")
    for key in _HF_KEYS:
        check_positive_int(key, get(key))
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or get("hidden_size") // heads
    return _Shape(get("num_hidden_layers"), get("hidden_size"), heads,
                  check_positive_int("num_key_value_heads", kv_heads),
                  check_positive_int("head_dim", head_dim), get("intermediate_size"),
                  get("vocab_size"), bool(get("tie_word_embeddings", False)))


def _plan_error(shape: _Shape, tp, pp) -> str | None:
    """Why (tp, pp) cannot split this model, or None."""
    if shape.num_heads % tp:
        return f"tp must divide num_attention_heads ({shape.num_heads}), got {tp}"
    kv = shape.num_kv_heads
    if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
        return (f"tp must divide num_key_value_heads ({kv}) or be a multiple of it (then KV "
                f"heads are replicated), got {tp}")
    if pp > shape.num_layers:
        return f"pp must be at most num_hidden_layers ({shape.num_layers}), got {pp}"
    return None


def parameter_count(config) -> int:
    """Parameters of a Llama-style model (no biases): embedding, per layer q/k/v/o, gate/up/down
    and two RMSNorms, the final norm, and lm_head unless tied."""
    s = _shape(config)
    attention = 2 * s.hidden_size * s.num_heads * s.head_dim \
        + 2 * s.hidden_size * s.num_kv_heads * s.head_dim
    layer = attention + 3 * s.hidden_size * s.intermediate_size + 2 * s.hidden_size
    embeddings = s.vocab_size * s.hidden_size * (1 if s.tied_embeddings else 2)
    return s.num_layers * layer + embeddings + s.hidden_size


def memory_per_rank(config, tp: int = 1, pp: int = 1, batch: int = 1, seq_len: int = 2048,
                    weight_bytes=2, kv_bytes=2, activation_bytes=2) -> dict:
    """Bytes one rank holds under tensor parallelism ``tp`` x pipeline parallelism ``pp``, for
    the rank of the largest stage (a plan fits only if its fullest device does).

    - weights: per layer, q/o split by query heads, k/v by KV heads (a rank keeps at least one:
      max(1, kv_heads // tp), replicated when tp > kv_heads), gate/up/down by intermediate
      columns (Megatron §3); RMSNorms replicated. Embedding and lm_head split by vocabulary
      (Megatron's vocab-parallel embedding), the embedding on the first stage, final norm and
      lm_head on the last (a tied lm_head is a second copy there when pp > 1). Stages get
      layers // pp layers, the first layers % pp stages one more.
    - kv_cache: 2 (K and V) * layers on the stage * KV heads per rank * head_dim * seq_len
      * batch * kv_bytes.
    - activations: the live buffers of one forward of batch x seq_len inside a layer (nothing is
      kept between layers at inference): the residual stream and its normed copy (hidden-sized,
      full on every TP rank) and the MLP's gate and up outputs (intermediate / tp each), at
      ``activation_bytes``; plus fp32 logits of the last position on the last stage. Attention
      scores are not counted (fused SDPA / FlashAttention, Dao et al. 2022, never holds them).
    """
    s = _shape(config)
    check_positive_int("tp", tp)
    check_positive_int("pp", pp)
    check_positive_int("batch", batch)
    check_positive_int("seq_len", seq_len)
    check_positive(weight_bytes=weight_bytes, kv_bytes=kv_bytes,
                   activation_bytes=activation_bytes)
    error = _plan_error(s, tp, pp)
    if error:
        raise ValueError(error)
    heads, kv_heads = s.num_heads // tp, max(1, s.num_kv_heads // tp)
    inter, vocab = math.ceil(s.intermediate_size / tp), math.ceil(s.vocab_size / tp)
    layer_params = 2 * s.hidden_size * heads * s.head_dim \
        + 2 * s.hidden_size * kv_heads * s.head_dim + 3 * s.hidden_size * inter \
        + 2 * s.hidden_size
    layers = [s.num_layers // pp + (stage < s.num_layers % pp) for stage in range(pp)]
    stages = []
    for stage, n_layers in enumerate(layers):
        first, last = stage == 0, stage == pp - 1
        params = n_layers * layer_params + first * vocab * s.hidden_size
        if last:
            params += s.hidden_size + (vocab * s.hidden_size
                                       if not s.tied_embeddings or pp > 1 else 0)
        activations = batch * seq_len * (2 * s.hidden_size + 2 * inter) * activation_bytes \
            + last * batch * s.vocab_size * 4
        kv_cache = 2 * n_layers * kv_heads * s.head_dim * seq_len * batch * kv_bytes
        weights = params * weight_bytes
        stages.append({"weights": weights, "kv_cache": kv_cache, "activations": activations,
                       "total": weights + kv_cache + activations})
    largest = max(range(pp), key=lambda stage: stages[stage]["total"])
    return {**stages[largest],
            "plan": {"tp": tp, "pp": pp, "devices": tp * pp, "stage": largest,
                     "layers_per_stage": layers, "kv_heads_per_rank": kv_heads,
                     "batch": batch, "seq_len": seq_len, "weight_bytes": weight_bytes,
                     "kv_bytes": kv_bytes, "activation_bytes": activation_bytes}}


def fits(config, device_bytes, **plan) -> bool:
    """Whether every rank of the plan (``memory_per_rank``'s keywords) fits ``device_bytes``.
    Leave headroom yourself: pass the memory left after the framework's own use."""
    check_positive(device_bytes=device_bytes)
    return memory_per_rank(config, **plan)["total"] <= device_bytes


def smallest_plan(config, device_bytes, n_devices_max: int = 8, *, gpus_per_node: int = 8,
                  **memory_kwargs) -> dict | None:
    """The plan with the fewest devices (tp * pp <= ``n_devices_max``) whose largest rank fits
    ``device_bytes``, or None. Among plans of one size, the widest TP that stays within a node
    comes first (its two all-reduces per layer want NVLink; PP's one message per stage crosses
    nodes well), then narrower TP with more stages, then TP across nodes. ``memory_kwargs``:
    batch, seq_len, weight_bytes, kv_bytes, activation_bytes. Returns {"tp", "pp", "devices",
    "memory"} (memory: ``memory_per_rank``'s dict)."""
    s = _shape(config)
    check_positive(device_bytes=device_bytes)
    check_positive_int("n_devices_max", n_devices_max)
    check_positive_int("gpus_per_node", gpus_per_node)
    for key in ("tp", "pp"):
        if key in memory_kwargs:
            raise TypeError(f"smallest_plan chooses {key} itself; pass only batch, seq_len, "
                            f"weight_bytes, kv_bytes, activation_bytes")
    for devices in range(1, n_devices_max + 1):
        widths = [tp for tp in range(devices, 0, -1) if devices % tp == 0]
        widths.sort(key=lambda tp: tp > gpus_per_node)  # stable: within a node first
        for tp in widths:
            pp = devices // tp
            if _plan_error(s, tp, pp):
                continue
            memory = memory_per_rank(config, tp=tp, pp=pp, **memory_kwargs)
            if memory["total"] <= device_bytes:
                return {"tp": tp, "pp": pp, "devices": devices, "memory": memory}
    return None
