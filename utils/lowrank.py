"""Chapter 05: low-rank factorization, and the attention variants that shrink the KV cache.

A weight W (out m x in n) of rank-r factorization W ~ A B, A = U_r S_r (m x r), B = V_r^T
(r x n), runs as two thin Linears, in -> r -> out: r (m + n) parameters and 2 r (m + n) FLOPs per
token against m n and 2 m n, so it saves only below the break-even rank r < m n / (m + n).

- Eckart-Young (1936; Mirsky 1960 for every unitarily invariant norm): the truncated SVD is the
  best rank-r approximation, with ||W - W_r||_F^2 = sum_{i > r} s_i^2 (``truncated_svd``,
  ``tail_error``).
- Activation-aware factorizations at the same rank: ASVD (Yuan et al. 2023, §3.2) scales input
  channel j by S_jj = mean|x_j|^alpha before the SVD and undoes it after; SVD-LLM (Wang et al.
  2024, §3.1) whitens by the Cholesky factor L of the input Gram matrix X^T X = L L^T, so that
  truncating W L minimises the *output* error ||(W - W') X^T||_F exactly (``factor_linear``).
- Attention cost and the KV cache (``attention_flops``, ``utils.roofline.kv_cache_bytes``);
  grouped-query and multi-query attention (Ainslie et al. 2023), made from a model's heads by
  mean-pooling its key/value heads (§2.1, ``pool_kv_heads``).
- Multi-head latent attention (DeepSeek-V2, 2024, §2.1): keys and values decompressed from one
  cached latent c = x W_DKV of width d_c; with the up-projections absorbed into the query and the
  output projection the latent is attended to directly (``LatentAttention``).
- LoRA (Hu et al. 2021, §4.1): W + (alpha / r) B A merged into W costs nothing at inference;
  unmerged it costs two thin GEMMs per adapted layer (``LoRALinear``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from utils.models import collect_hessians, collect_input_stats, find_linears, replace_module
from utils.pruning import linear_param_count
from utils.validation import check_choice, check_positive_int, check_tensor

CHAPTER = "05"
METHODS = ("svd", "asvd", "svd-llm")

# SVD-LLM (Wang et al. 2024), Table 1: LLaMA-7B, 20% of the parameters removed, WikiText-2
# perplexity with no fine-tuning.
PUBLISHED_LLAMA_7B_20PCT = {"dense": 5.68, "SVD": 20061, "ASVD": 11.14, "SVD-LLM": 7.94}
# Ainslie et al. 2023, Table 1: T5-XXL uptrained with 5% of pre-training compute; inference time
# per sample (s) and average score over summarisation and translation tasks.
PUBLISHED_T5_XXL = {"MHA": (1.51, 47.2), "GQA-8": (0.28, 47.1), "MQA": (0.24, 46.6)}
# Published attention shapes (layers, attention heads, KV heads, head dim) for the cache table.
PUBLISHED_CONFIGS = {"Llama-2-7B (MHA)": (32, 32, 32, 128), "Llama-3-8B (GQA-8)": (32, 32, 8, 128),
                     "Llama-3-8B as MQA": (32, 32, 1, 128)}
# DeepSeek-V2 (§2.1.2-2.1.3): 60 layers, 128 heads of 128; latent d_c = 4 d_h = 512 plus a
# decoupled RoPE key of d_h / 2 = 64 per token and layer.
DEEPSEEK_V2 = {"layers": 60, "heads": 128, "head_dim": 128, "latent": 512, "rope_dim": 64}


# --------------------------------------------------------------------------- SVD and its error


def _check_matrix(name, w):
    check_tensor(name, w, floating=True, nonempty=True)
    if w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(w.shape)}")
    return w


def _check_rank(rank, w):
    check_positive_int("rank", rank)
    if rank > min(w.shape):
        raise ValueError(f"rank must be at most min(m, n) = {min(w.shape)}, got {rank}")
    return rank


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A = U_r diag(s_r) (m x r) and B = V_r^T (r x n): A @ B is the best rank-r
    approximation of ``weight`` (Eckart-Young). Computed in float64."""
    _check_matrix("weight", weight)
    _check_rank(rank, weight)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(weight.dtype), vh[:rank].to(weight.dtype)


def tail_error(singular_values: torch.Tensor, rank: int) -> float:
    """sqrt(sum_{i > rank} s_i^2): the Frobenius error of the best rank-``rank`` approximation."""
    check_tensor("singular_values", singular_values, floating=True, nonempty=True)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= len(singular_values):
        raise ValueError(f"rank must be an integer in 0..{len(singular_values)}, got {rank!r}")
    return singular_values.double()[rank:].pow(2).sum().sqrt().item()


def smallest_rank_for_error(singular_values: torch.Tensor, relative_error: float) -> int:
    """The smallest r whose best rank-r approximation has ||W - W_r||_F / ||W||_F <= the
    budget (from the spectrum alone)."""
    check_tensor("singular_values", singular_values, floating=True, nonempty=True)
    if isinstance(relative_error, bool) or not isinstance(relative_error, (int, float)) or \
            not 0 <= relative_error < 1:
        raise ValueError(f"relative_error must be a number in [0, 1), got {relative_error!r}")
    energy = singular_values.double().pow(2)
    if energy.sum() == 0:
        raise ValueError("singular_values must not all be zero (the relative error is undefined)")
    tails = (energy.flip(0).cumsum(0).flip(0) / energy.sum()).sqrt()  # tails[r] = error of rank r
    tails = torch.cat([tails, tails.new_zeros(1)])
    return int((tails <= relative_error + 1e-12).nonzero()[0].item())


def lowrank_params(m: int, n: int, rank: int) -> int:
    """Parameters of the factored layer: r (m + n) (A is m x r, B is r x n)."""
    check_positive_int("m", m)
    check_positive_int("n", n)
    check_positive_int("rank", rank)
    return rank * (m + n)


def break_even_rank(m: int, n: int) -> int:
    """The largest rank that still saves parameters and FLOPs: r (m + n) < m n."""
    check_positive_int("m", m)
    check_positive_int("n", n)
    return (m * n - 1) // (m + n)  # exact in integers


def rank_for_reduction(m: int, n: int, reduction: float) -> int:
    """The rank that removes the fraction ``reduction`` of an m x n layer's parameters (rounded
    down, at least 1): r = (1 - reduction) m n / (m + n)."""
    check_positive_int("m", m)
    check_positive_int("n", n)
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or \
            not 0 <= reduction < 1:
        raise ValueError(f"reduction must be a number in [0, 1), got {reduction!r}")
    return max(1, int((1 - reduction) * m * n / (m + n)))


# --------------------------------------------------------------------------- factored layers


class LowRankLinear(nn.Module):
    """y = up(down(x)): ``down`` (in -> r, no bias), ``up`` (r -> out, the original bias)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.down = nn.Linear(b.shape[1], b.shape[0], bias=False, dtype=b.dtype)
        self.up = nn.Linear(a.shape[1], a.shape[0], bias=bias is not None, dtype=a.dtype)
        with torch.no_grad():
            self.down.weight.copy_(b)
            self.up.weight.copy_(a)
            if bias is not None:
                self.up.bias.copy_(bias)
        self.in_features, self.out_features, self.rank = b.shape[1], a.shape[0], b.shape[0]

    def forward(self, x):
        return self.up(self.down(x))


def whitening_factor(hessian: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """Lower-triangular L with L L^T = H + damp * mean(diag H) * I (H proportional to X^T X):
    SVD-LLM's whitening matrix; the damping keeps Cholesky defined for dead input channels."""
    _check_matrix("hessian", hessian)
    h = hessian.double()
    h = h + damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    return torch.linalg.cholesky(h)


def whitened_svd(weight: torch.Tensor, hessian: torch.Tensor, rank: int):
    """SVD-LLM's truncation: (A, B) = the rank-r SVD of W L, then B L^-1, with L L^T = H; A @ B
    is the rank-r matrix of least output error ||(W - W') X^T||_F."""
    chol = whitening_factor(hessian)
    a, b = truncated_svd(weight.double() @ chol, rank)
    return a, torch.linalg.solve_triangular(chol, b, upper=False, left=False)  # B L^-1


def factor_linear(linear: nn.Linear, rank: int, method: str = "svd", *,
                  hessian: torch.Tensor | None = None, absmean: torch.Tensor | None = None,
                  alpha: float = 0.5) -> LowRankLinear:
    """A rank-``rank`` ``LowRankLinear`` for ``linear`` (weight W, m x n):

    * ``"svd"``: the truncated SVD of W (best for ||W - W'||_F, blind to the inputs);
    * ``"asvd"``: SVD of W S with S = diag(absmean^alpha) (ASVD), then B S^-1;
    * ``"svd-llm"``: SVD of W L with L L^T = H the input Gram matrix (SVD-LLM), then B L^-1,
      which minimises ||(W - W') X^T||_F over rank-r W'.
    """
    check_choice("method", method, METHODS)
    w = linear.weight.detach().double()
    _check_rank(rank, w)
    if method == "svd":
        a, b = truncated_svd(w, rank)
    elif method == "asvd":
        if absmean is None:
            raise ValueError("method 'asvd' needs absmean (mean |x_j| of the layer's inputs)")
        s = absmean.double().clamp_min(1e-6).pow(alpha)
        a, b = truncated_svd(w * s, rank)
        b = b / s
    else:
        if hessian is None:
            raise ValueError("method 'svd-llm' needs hessian (the layer's input Gram matrix)")
        a, b = whitened_svd(w, hessian, rank)
    bias = None if linear.bias is None else linear.bias.detach()
    return LowRankLinear(a.to(linear.weight.dtype), b.to(linear.weight.dtype), bias)


def output_error(weight: torch.Tensor, approx: torch.Tensor, inputs: torch.Tensor) -> float:
    """||(W - W') X^T||_F / ||W X^T||_F on real inputs X (tokens, n)."""
    x = inputs.double().reshape(-1, weight.shape[1])
    return ((x @ (weight.double() - approx.double()).T).norm() / (x @ weight.double().T).norm()).item()


def calibration_statistics(model, calibration_ids, method: str, skip=("lm_head",)) -> dict:
    """What ``method`` reads from the layers' inputs: nothing (svd), per-channel mean |x| (asvd),
    the Gram matrices (svd-llm). One pass; reuse it for every budget."""
    check_choice("method", method, METHODS)
    if method == "svd":
        return {}
    if calibration_ids is None:
        raise ValueError(f"method {method!r} needs calibration_ids")
    if method == "asvd":
        return {n: {"absmean": st["absmean"]}
                for n, st in collect_input_stats(model, calibration_ids, skip).items()}
    return {n: {"hessian": h} for n, h in collect_hessians(model, calibration_ids, skip).items()}


def compress_model(model, reduction: float, method: str = "svd", calibration_ids=None,
                   skip=("lm_head",), statistics: dict | None = None):
    """A copy of ``model`` whose every decoder Linear is factored at the rank that removes the
    fraction ``reduction`` of its parameters (the same budget for every method). ``asvd`` and
    ``svd-llm`` read their statistics from one calibration pass over ``calibration_ids`` (or take
    ``statistics`` from ``calibration_statistics``). Every layer is factored from the
    uncompressed model's inputs (one pass, not SVD-LLM's sequential update)."""
    check_choice("method", method, METHODS)
    if statistics is None:
        statistics = calibration_statistics(model, calibration_ids, method, skip)
    compressed = copy.deepcopy(model).eval()
    targets = find_linears(compressed, skip)
    for name, linear in targets.items():
        rank = rank_for_reduction(linear.out_features, linear.in_features, reduction)
        new = factor_linear(linear, rank, method, **statistics.get(name, {}))
        replace_module(compressed, name, new)
    return compressed


# The decoder's Linear parameters: chapter 03's count, which also sees the ``down`` and ``up``
# Linears inside every LowRankLinear.
linear_params = linear_param_count


def factored_latency(m: int, n: int, ranks, tokens: int, min_run_time: float = 0.2,
                     seed: int = 0) -> list[dict]:
    """Median time of x @ W^T (W m x n, x tokens x n) against (x @ B^T) @ A^T for each rank,
    measured side by side (``utils.bench.compare``), fp32."""
    from utils.bench import compare

    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(tokens, n, generator=g), torch.randn(m, n, generator=g)
    fns = {"dense": lambda: x @ w.T}
    for r in ranks:
        a, b = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
        fns[f"rank {r}"] = (lambda a=a, b=b: (x @ b.T) @ a.T)
    with torch.inference_mode():
        res = compare(fns, min_run_time=min_run_time)
    return [{"rank": r, "dense_ms": res["dense"]["median_ms"],
             "factored_ms": res[f"rank {r}"]["median_ms"],
             "speedup": res["dense"]["median_ms"] / res[f"rank {r}"]["median_ms"]} for r in ranks]


def measured_break_even(rows) -> int | None:
    """The largest rank of a sweep at which the factored layer is still faster than dense."""
    faster = [r["rank"] for r in rows if r["speedup"] > 1]
    return max(faster) if faster else None


# --------------------------------------------------------------------------- attention cost


def attention_flops(seq_len: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                    intermediate: int) -> dict[str, int]:
    """Forward FLOPs of one Llama block over a causal prefill of ``seq_len`` tokens (a multiply
    and an add count 2): the projections (q, k, v, o), the attention scores and the weighted
    sum (QK^T and PV, each 2 T^2 heads head_dim, halved by the causal mask), the SwiGLU MLP."""
    for k, v in dict(seq_len=seq_len, hidden=hidden, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, intermediate=intermediate).items():
        check_positive_int(k, v)
    t = seq_len
    proj = 2 * t * hidden * head_dim * (2 * heads + 2 * kv_heads)
    scores = 2 * (2 * t * t * heads * head_dim) // 2  # QK^T and PV, causal: half the pairs
    mlp = 2 * t * 3 * hidden * intermediate
    return {"projections": proj, "attention": scores, "mlp": mlp}


def attention_overtakes_mlp(hidden: int, heads: int, head_dim: int, intermediate: int) -> float:
    """Sequence length where causal attention's T^2 FLOPs equal the MLP's: 2 T^2 h d = 6 T C I
    gives T = 3 C I / (h d)."""
    return 3 * hidden * intermediate / (heads * head_dim)


def mla_cache_bytes(num_layers: int, latent: int, rope_dim: int, seq_len: int,
                    batch_size: int = 1, bytes_per_value: float = 2) -> float:
    """MLA caches per token and layer one latent of width d_c and one shared RoPE key of width
    d_R: (d_c + d_R) x layers x seq_len x batch x bytes (no factor 2: K and V share it)."""
    for k, v in dict(num_layers=num_layers, latent=latent, seq_len=seq_len,
                     batch_size=batch_size).items():
        check_positive_int(k, v)
    if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim < 0:
        raise ValueError(f"rope_dim must be an integer >= 0, got {rope_dim!r}")
    if isinstance(bytes_per_value, bool) or not bytes_per_value > 0:
        raise ValueError(f"bytes_per_value must be > 0, got {bytes_per_value!r}")
    return (latent + rope_dim) * num_layers * seq_len * batch_size * bytes_per_value


# --------------------------------------------------------------------------- GQA / MQA


def pool_kv_heads(weight: torch.Tensor, kv_heads: int, head_dim: int, groups: int) -> torch.Tensor:
    """Mean-pool a k or v projection's ``kv_heads`` heads (rows of ``head_dim``) into ``groups``
    heads, each the mean of kv_heads / groups consecutive heads (Ainslie et al. 2023, §2.1)."""
    _check_matrix("weight", weight)
    check_positive_int("kv_heads", kv_heads)
    check_positive_int("head_dim", head_dim)
    check_positive_int("groups", groups)
    if kv_heads % groups:
        raise ValueError(f"groups must divide kv_heads={kv_heads}, got {groups}")
    if weight.shape[0] != kv_heads * head_dim:
        raise ValueError(f"weight must have kv_heads x head_dim = {kv_heads * head_dim} rows, got "
                         f"{weight.shape[0]}")
    w = weight.reshape(groups, kv_heads // groups, head_dim, weight.shape[1])
    return w.mean(1).reshape(groups * head_dim, weight.shape[1])


def convert_kv_heads(model, groups: int = 1):
    """A copy of a Llama causal LM with ``groups`` KV heads (1: multi-query attention), every
    layer's k and v projections mean-pooled; the query heads are unchanged."""
    cfg = model.config
    kv = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    converted = copy.deepcopy(model).eval()
    for layer in converted.model.layers:
        attn = layer.self_attn
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            new = nn.Linear(old.in_features, groups * head_dim, bias=old.bias is not None)
            with torch.no_grad():
                new.weight.copy_(pool_kv_heads(old.weight.detach(), kv, head_dim, groups))
                if old.bias is not None:
                    new.bias.copy_(pool_kv_heads(old.bias.detach()[:, None], kv, head_dim,
                                                 groups)[:, 0])
            setattr(attn, name, new)
        attn.num_key_value_groups = cfg.num_attention_heads // groups
    converted.config.num_key_value_heads = groups
    converted.config.head_dim = head_dim
    return converted


# --------------------------------------------------------------------------- MLA


def latent_kv(model, latent: int, hessians: dict | None = None):
    """A copy of a Llama causal LM whose k and v projections share one down-projection to
    ``latent`` values per token: the rank-``latent`` SVD of the stacked [W_K; W_V] (whitened by
    the attention input's Gram matrix when ``hessians`` of the k projections are given), so
    that a cache of c = x W_DKV, ``latent`` values per token and layer, would hold everything K
    and V are made of (MLA's joint compression; RoPE is applied after the up-projection here, so
    this cache would be decompressed each step rather than absorbed)."""
    converted = copy.deepcopy(model).eval()
    for i, layer in enumerate(converted.model.layers):
        attn = layer.self_attn
        k, v = attn.k_proj.weight.detach(), attn.v_proj.weight.detach()
        stacked = torch.cat([k, v]).double()  # (2 kv d, hidden)
        _check_rank(latent, stacked)
        h = None if hessians is None else hessians[f"model.layers.{i}.self_attn.k_proj"]
        a, b = truncated_svd(stacked, latent) if h is None else whitened_svd(stacked, h, latent)
        a, b = a.to(k.dtype), b.to(k.dtype)
        attn.k_proj = LowRankLinear(a[:len(k)], b)
        attn.v_proj = LowRankLinear(a[len(k):], b)
    return converted



class LatentAttention(nn.Module):
    """Multi-head latent attention without RoPE (DeepSeek-V2 §2.1.2): c = x W_DKV (d_c per token,
    the only thing cached), K = c W_UK, V = c W_UV per head. ``forward(x, absorbed=False)``
    decompresses K and V; ``absorbed=True`` attends to the latent directly with q W_UK^T and folds
    W_UV into the output projection: the same result, with no per-head K or V ever formed.
    DeepSeek-V2 adds a separate small RoPE key (§2.1.3) because a rotation between q and W_UK
    would stop W_UK from being absorbed."""

    def __init__(self, hidden: int, heads: int, head_dim: int, latent: int):
        super().__init__()
        self.heads, self.head_dim, self.latent = heads, head_dim, latent
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.down_kv = nn.Linear(hidden, latent, bias=False)  # W_DKV
        self.up_k = nn.Linear(latent, heads * head_dim, bias=False)  # W_UK
        self.up_v = nn.Linear(latent, heads * head_dim, bias=False)  # W_UV
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, absorbed: bool = False) -> torch.Tensor:
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.q(x).view(b, t, h, d).transpose(1, 2)  # (B, H, T, d)
        c = self.down_kv(x)  # (B, T, d_c): the cache
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if not absorbed:
            k = self.up_k(c).view(b, t, h, d).transpose(1, 2)
            v = self.up_v(c).view(b, t, h, d).transpose(1, 2)
            att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
            out = att.softmax(-1) @ v  # (B, H, T, d)
            return self.o(out.transpose(1, 2).reshape(b, t, h * d))
        w_uk = self.up_k.weight.view(h, d, self.latent)  # k_h = c @ w_uk[h].T
        q_latent = q @ w_uk  # (B, H, T, d_c): q_h W_UK,h absorbed into the query
        att = (q_latent @ c[:, None].transpose(-1, -2) / math.sqrt(d)).masked_fill(
            ~mask, float("-inf"))
        ctx = att.softmax(-1) @ c[:, None]  # (B, H, T, d_c): attention over the latent
        w_uv = self.up_v.weight.view(h, d, self.latent)
        w_o = self.o.weight.view(-1, h, d)  # (hidden, H, d)
        w_ov = torch.einsum("chd,hdl->hlc", w_o, w_uv)  # W_UV folded into W_O: (H, d_c, hidden)
        return torch.einsum("bhtl,hlc->btc", ctx, w_ov)

    def cache_values_per_token(self) -> dict[str, int]:
        """Values cached per token: the latent, against MHA's K and V of every head."""
        return {"mla": self.latent, "mha": 2 * self.heads * self.head_dim}


# --------------------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """A frozen base Linear plus a low-rank update: y = base(x) + (alpha / r) (x A^T) B^T, with A
    (r x in) random and B (out x r) zero at the start (Hu et al. 2021, §4.1). ``merged()`` gives
    one Linear with W + (alpha / r) B A: the same outputs at no extra cost."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0, seed: int = 0):
        super().__init__()
        check_positive_int("rank", rank)
        self.base, self.scale = base, alpha / rank
        g = torch.Generator().manual_seed(seed)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=g) /
                                   math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_a.T) @ self.lora_b.T

    def delta(self) -> torch.Tensor:
        return self.scale * self.lora_b @ self.lora_a

    def merged(self) -> nn.Linear:
        out = copy.deepcopy(self.base)
        with torch.no_grad():
            out.weight.add_(self.delta())
        return out


def multi_adapter_forward(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, adapter_ids: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """One batch, one base weight, a different LoRA per row (as multi-adapter servers such as
    S-LoRA and Punica batch them): x (B, T, in), lora_a (N, r, in), lora_b (N, out, r),
    ``adapter_ids`` (B,). The base GEMM is shared; each row adds its own two thin GEMMs."""
    base = x @ weight.T
    a, b = lora_a[adapter_ids], lora_b[adapter_ids]  # (B, r, in), (B, out, r)
    return base + scale * (x @ a.transpose(1, 2)) @ b.transpose(1, 2)


# --------------------------------------------------------------------------- the chapter's table


def report_rows(quick: bool = False) -> list[dict]:
    """Plain SVD, ASVD and SVD-LLM at a 20% Linear-parameter reduction, and MQA conversion, on the
    teacher (``quick``: the small model, 512 tokens): Linear parameters, KV cache bytes at 256
    tokens, perplexity and top-1 agreement with the uncompressed model."""
    from utils.metrics import lm_quality, reference_top1
    from utils.models import calibration_tokens, encode_split, load_course_model
    from utils.roofline import model_kv_cache_bytes

    name = "small" if quick else "teacher"
    max_tokens = 512 if quick else 8192
    model, tok = load_course_model(name)
    val = encode_split("validation", tok)
    calib = calibration_tokens(tok, sequences=2 if quick else 16, seq_len=128 if quick else 256)
    variants = {"dense": model}
    for method in METHODS:
        variants[f"{method} 20%"] = compress_model(model, 0.2, method, calib)
    variants["MQA (pooled KV heads)"] = convert_kv_heads(model, 1)
    ref = reference_top1(model, val, max_tokens)
    rows = []
    for label, m in variants.items():
        q = lm_quality(ref, m, val, max_tokens)
        rows.append({"model": name, "variant": label, "linear_params_M": linear_params(m) / 1e6,
                     "kv_cache_KB_256_tokens": model_kv_cache_bytes(m, 256) / 1e3,
                     "perplexity": q["perplexity"], "top1_agreement": q["top1_agreement"]})
    return rows
