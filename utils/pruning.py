"""Chapter 03: pruning, from magnitude to Wanda and SparseGPT, and why only structure buys speed.

Masks are boolean tensors of the weight's shape, ``True`` where a weight is **kept**; a
"sparsity" is the fraction of weights set to zero.

- Magnitude pruning (Han et al. 2015, "Learning both Weights and Connections", §3): zero the
  weights of smallest |w|, per layer (``magnitude_mask``) or with one threshold over all layers
  (``global_magnitude_masks``). Exact counts: ``round(sparsity * numel)`` weights go, ties broken
  by position.
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", §3, Eq. 1):
  score S_ij = |W_ij| * ||X_j||_2 (the norm of input feature j over the calibration tokens),
  compared within each output row (``wanda_scores``, ``row_mask``).
- SparseGPT (Frantar & Alistarh 2023, §3-4, Algorithm 1): prune columns left to right and
  update the remaining weights of each row with the inverse Hessian of the layer input,
  H = 2 X X^T, the optimal brain surgeon step, the mask chosen per block of columns by
  w^2 / [H^-1]_jj^2 (``sparsegpt_prune``).
- N:M sparsity (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", §2): in every
  group of M consecutive weights along the input dimension keep N (``nm_mask``); 2:4 is what
  NVIDIA's sparse tensor cores run at up to 2x (``torch.sparse.to_sparse_semi_structured``,
  CUDA only).
- Structured pruning: remove whole MLP channels and whole grouped-query attention groups, so the
  matrices really shrink (``prune_mlp_channels``, ``prune_attention_groups``,
  ``structured_prune``), hand-written and checked against torch-pruning's dependency graph
  (``torch_pruning_mlp``, Fang et al. 2023, "DepGraph").
- ``sparse_matmul_sweep``: dense vs CSR matmul time against sparsity (the break-even point).
- ``sensitivity_scan`` / ``allocate_sparsity``: prune one layer at a time, rank the damage, and
  spend a fixed sparsity budget where it hurts least.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn as nn

from utils.models import collect_hessians, find_linears, finetune
from utils.validation import check_positive_int, check_tensor

CHAPTER = "03"

# Published LLaMA-2-7B WikiText-2 perplexities (Wanda README, Sun et al. 2023, Table 3 setting:
# 128 C4 calibration sequences of 2048 tokens, one-shot, no fine-tuning).
PUBLISHED_LLAMA2_7B = {
    "dense": 5.12,
    "50% unstructured": {"magnitude": 14.89, "SparseGPT": 6.51, "Wanda": 6.42},
    "2:4": {"magnitude": 54.59, "SparseGPT": 10.17, "Wanda": 11.02},
}
# Torch-Pruning's examples/LLMs: Llama-2-7B at 50% width (hidden size, heads and MLP channels),
# magnitude importance, no retraining: WikiText-2 perplexity 8479.
PUBLISHED_TORCH_PRUNING_LLAMA2_7B_WIDTH50 = 8479.07


# --------------------------------------------------------------------------- checks


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or \
            not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_n_m(n, m) -> tuple[int, int]:
    check_positive_int("n", n), check_positive_int("m", m)
    if n > m:
        raise ValueError(f"n must be <= m (keep n of every m weights), got n={n}, m={m}")
    return n, m


def sparsity_of(mask_or_weight: torch.Tensor) -> float:
    """Fraction of zeros: of a weight, or of ``False`` entries of a keep-mask."""
    return 1 - mask_or_weight.count_nonzero().item() / mask_or_weight.numel()


# --------------------------------------------------------------------------- unstructured masks


def _keep_largest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask of a 1-D score vector with exactly ``n_prune`` smallest entries removed; among
    equal scores the earlier position is removed first (a stable sort)."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        order = torch.sort(scores, stable=True).indices
        mask[order[:n_prune]] = False
    return mask


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing exactly ``round(sparsity * numel)`` weights of smallest |w|."""
    check_tensor("weight", weight, floating=True)
    sparsity = check_sparsity(sparsity)
    flat = weight.detach().abs().flatten()
    return _keep_largest(flat, round(sparsity * flat.numel())).view(weight.shape)


def global_magnitude_masks(weights: dict[str, torch.Tensor],
                           sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all ``weights``: exactly ``round(sparsity * total)`` smallest |w|
    go, wherever they are; layers with many small weights lose more."""
    sparsity = check_sparsity(sparsity)
    if not weights:
        raise ValueError("weights must be a non-empty dict of name -> tensor")
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _keep_largest(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start:start + w.numel()].view(w.shape)
        start += w.numel()
    return out


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``round(sparsity * cols)`` lowest scores of every row (Wanda's
    per-output comparison group)."""
    check_tensor("scores", scores, floating=True)
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out, in), got shape {tuple(scores.shape)}")
    sparsity = check_sparsity(sparsity)
    k = round(sparsity * scores.shape[1])
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive entries of the last dimension keep the
    ``n`` of highest score (ties: the earlier one is kept)."""
    check_tensor("scores", scores, floating=True)
    n, m = check_n_m(n, m)
    if scores.dim() < 1 or scores.shape[-1] % m:
        raise ValueError(f"the last dimension of scores ({tuple(scores.shape)}) must be a "
                         f"multiple of m={m}")
    groups = scores.reshape(-1, m)  # (G, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return mask.view(scores.shape)


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """S = |W| * ||X_j||_2 (Sun et al. 2023, Eq. 1): W (out, in), ``input_norm`` (in,)."""
    check_tensor("weight", weight, floating=True)
    check_tensor("input_norm", input_norm, floating=True)
    if weight.dim() != 2 or input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm must have shape ({weight.shape[-1]},) for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(input_norm.shape)}")
    return weight.detach().abs() * input_norm.reshape(1, -1)


def input_norms_from_hessian(hessian: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
    """||X_j||_2 from H = 2 X^T X / n: sqrt(diag(H) * n / 2) (any positive factor leaves Wanda's
    per-row ranking unchanged, so ``n_tokens=None`` returns sqrt(diag(H)))."""
    d = hessian.diagonal().clamp(min=0)
    return (d * (n_tokens / 2 if n_tokens else 1.0)).sqrt()


# --------------------------------------------------------------------------- SparseGPT


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    n: int | None = None, m: int | None = None, block_size: int = 128,
                    percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) on W (out, in) with H (in, in).

    Columns are visited left to right in blocks of ``block_size``. Within a block the mask is
    chosen once (unstructured: the ``sparsity`` fraction of the block with the lowest
    w^2 / [H^-1]_jj^2; N:M: per group of ``m`` columns, when its first column is reached), then
    each column j is pruned and the error e = (w_j - q_j) / [H^-1]_jj is spread over the
    columns to its right: W[:, j:] -= e [H^-1]_{j, j:} (H^-1 through its upper Cholesky
    factor, as in GPTQ). Returns the pruned weight (zeros where pruned)."""
    check_tensor("weight", weight, floating=True)
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"hessian must be ({weight.shape[-1]}, {weight.shape[-1]}) for a weight "
                         f"of shape {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    structured = n is not None or m is not None
    if structured:
        n, m = check_n_m(n, m)
        if weight.shape[1] % m:
            raise ValueError(f"in_features {weight.shape[1]} must be a multiple of m={m}")
    else:
        sparsity = check_sparsity(sparsity)
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * H.diagonal().mean() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = Hinv1.diagonal()
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if not structured:
            saliency = (W1 ** 2 / d.reshape(1, -1) ** 2).flatten()
            pruned = ~_keep_largest(saliency, round(sparsity * saliency.numel())).view(W1.shape)
        for i in range(i2 - i1):
            if structured and i % m == 0:
                sal = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                pruned[:, i:i + m] = ~nm_mask(sal, n, m)
            w = W1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)


# --------------------------------------------------------------------------- whole-model pruning


def decoder_layers(model) -> list[nn.Module]:
    """The decoder blocks of a transformers causal LM (``model.model.layers``)."""
    try:
        return list(model.model.layers)
    except AttributeError as err:
        raise TypeError("model must be a transformers causal LM with model.model.layers "
                        f"(a LlamaForCausalLM), got {type(model).__name__}") from err


def layer_linears(model, index: int) -> dict[str, nn.Linear]:
    """Full names -> Linear of decoder block ``index`` (q, k, v, o, gate, up, down)."""
    prefix = f"model.layers.{index}."
    return {n: m for n, m in find_linears(model).items() if n.startswith(prefix)}


def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight whose mask entry is False (in place)."""
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_submodule(name).weight.mul_(mask)


METHODS = ("magnitude", "wanda", "sparsegpt")


@torch.no_grad()
def prune_unstructured(model, method: str = "magnitude", sparsity: float = 0.5,
                       n_m: tuple[int, int] | None = None, calibration_ids=None,
                       scope: str = "local") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A pruned copy of ``model`` (every decoder Linear; the tied embedding / output head is
    kept) and its keep-masks.

    ``method``: ``magnitude`` (``scope`` ``local``: per layer, ``global``: one threshold),
    ``wanda`` or ``sparsegpt``; ``n_m=(2, 4)`` gives N:M instead of a ``sparsity``. Wanda and
    SparseGPT go block by block: the calibration statistics of block i come from a forward pass
    of the copy whose blocks 0..i-1 are already pruned, as in both papers' reference code."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scope not in ("local", "global"):
        raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
    if n_m is not None:
        check_n_m(*n_m)
    else:
        check_sparsity(sparsity)
    if method != "magnitude" and calibration_ids is None:
        raise ValueError(f"method={method!r} needs calibration_ids (sequences, tokens)")
    pruned = copy.deepcopy(model).eval()
    linears = find_linears(pruned)
    if method == "magnitude":
        weights = {n: m.weight for n, m in linears.items()}
        if n_m is not None:
            masks = {n: nm_mask(w.abs(), *n_m) for n, w in weights.items()}
        elif scope == "global":
            masks = global_magnitude_masks(weights, sparsity)
        else:
            masks = {n: magnitude_mask(w, sparsity) for n, w in weights.items()}
        apply_masks(pruned, masks)
        return pruned, masks
    masks = {}
    for i in range(len(decoder_layers(pruned))):
        block = layer_linears(pruned, i)
        hessians = collect_hessians(pruned, calibration_ids, names=list(block))
        for name, lin in block.items():
            H = hessians[name]
            if method == "wanda":
                scores = wanda_scores(lin.weight, input_norms_from_hessian(H))
                mask = nm_mask(scores, *n_m) if n_m else row_mask(scores, sparsity)
                lin.weight.mul_(mask)
            else:
                lin.weight.copy_(sparsegpt_prune(lin.weight, H, sparsity,
                                                 *(n_m or (None, None))))
                mask = lin.weight != 0
            masks[name] = mask
    return pruned, masks


def per_layer_sparsity(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: sparsity_of(mask) for name, mask in masks.items()}


def masked_finetune(model, masks: dict[str, torch.Tensor], steps: int, **kwargs) -> list[float]:
    """``utils.models.finetune`` that keeps pruned weights at zero (re-applied after every
    step, so AdamW's updates cannot revive them)."""
    return finetune(model, steps, after_step=lambda m: apply_masks(m, masks), **kwargs)


def cubic_schedule(final_sparsity: float, stages: int) -> list[float]:
    """Zhu & Gupta 2017 ("To prune, or not to prune", Eq. 1): s_t = s_f (1 - (1 - t/n)^3),
    t = 1..n: prune fast while many redundant weights remain, gently near the end."""
    final_sparsity = check_sparsity(final_sparsity)
    check_positive_int("stages", stages)
    return [final_sparsity * (1 - (1 - t / stages) ** 3) for t in range(1, stages + 1)]


def iterative_prune_finetune(model, final_sparsity: float, stages: int, steps_per_stage: int,
                             **finetune_kwargs) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Gradual magnitude pruning: at each stage of ``cubic_schedule`` prune to that sparsity
    (per layer, among the still-kept weights and their grown values), then fine-tune with the
    mask held for ``steps_per_stage`` steps."""
    pruned = copy.deepcopy(model)
    masks = {}
    for stage, target in enumerate(cubic_schedule(final_sparsity, stages)):
        masks = {n: magnitude_mask(m.weight, target) for n, m in find_linears(pruned).items()}
        apply_masks(pruned, masks)
        masked_finetune(pruned, masks, steps_per_stage, seed=stage,
                        desc=f"stage {stage + 1}/{stages}: {target:.0%}", **finetune_kwargs)
    return pruned, masks


# --------------------------------------------------------------------------- structured pruning


def _sliced_linear(linear: nn.Linear, out_idx=None, in_idx=None) -> nn.Linear:
    w = linear.weight.detach()
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach() if out_idx is None else linear.bias[out_idx])
    return new


def keep_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted indices of the ``keep`` highest scores (ties: the earlier index)."""
    check_tensor("scores", scores, floating=True)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    check_positive_int("keep", keep)
    if keep > scores.numel():
        raise ValueError(f"keep must be <= the number of channels ({scores.numel()}), got {keep}")
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def mlp_channel_scores(mlp, down_input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each intermediate channel c of a SwiGLU MLP (gate, up: (I, C); down:
    (C, I)). Without activations: the squared L2 norm of everything channel c touches, ||gate_c||^2
    + ||up_c||^2 + ||down_:,c||^2 (torch-pruning's group magnitude). With ``down_input_norm``
    (||h_c|| over calibration tokens, h the input of down_proj): ||down_:,c|| * ||h_c||, the size
    of what channel c adds to the output (the structured form of Wanda's score)."""
    down = mlp.down_proj.weight.detach()
    if down_input_norm is not None:
        return down.norm(dim=0) * down_input_norm
    return (mlp.gate_proj.weight.detach().pow(2).sum(1) + mlp.up_proj.weight.detach().pow(2).sum(1)
            + down.pow(2).sum(0))


def prune_mlp_channels(mlp, keep_idx: torch.Tensor) -> None:
    """Keep only the intermediate channels ``keep_idx`` of a SwiGLU MLP, in place: rows of gate
    and up, the matching columns of down. On the kept channels the function is unchanged."""
    mlp.gate_proj = _sliced_linear(mlp.gate_proj, out_idx=keep_idx)
    mlp.up_proj = _sliced_linear(mlp.up_proj, out_idx=keep_idx)
    mlp.down_proj = _sliced_linear(mlp.down_proj, in_idx=keep_idx)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep_idx)


def attention_group_scores(attn, head_dim: int, q_per_kv: int,
                           o_input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """(kv_groups, q_per_kv) importance of every query head: ||o_proj columns of the head|| times
    the norm of its attention output (``o_input_norm``, (heads * head_dim,)), or without
    activations the squared norms of its q rows and o columns."""
    o = attn.o_proj.weight.detach()  # (C, H * d)
    if o_input_norm is not None:
        per_col = o.norm(dim=0) * o_input_norm
    else:
        q = attn.q_proj.weight.detach()  # (H * d, C)
        per_col = o.pow(2).sum(0) + q.pow(2).sum(1)
    return per_col.view(-1, q_per_kv, head_dim).sum(-1)  # (G, q_per_kv)


def prune_attention_groups(attn, head_dim: int, q_per_kv: int, keep_groups: torch.Tensor,
                           keep_q: torch.Tensor) -> None:
    """Grouped-query attention keeps its shape only if every kept KV head has the same number of
    query heads: keep KV groups ``keep_groups`` and, in each, the query heads ``keep_q[g]``
    (a (len(keep_groups), q_kept) index tensor, positions within the group). Slices q, k, v
    rows and o columns in place."""
    def rows(heads):  # head indices -> the rows of their head_dim slices
        return (heads.reshape(-1, 1) * head_dim + torch.arange(head_dim)).reshape(-1)

    q_heads = (keep_groups.reshape(-1, 1) * q_per_kv + keep_q).reshape(-1)
    q_rows, kv_rows = rows(q_heads), rows(keep_groups)
    attn.q_proj = _sliced_linear(attn.q_proj, out_idx=q_rows)
    attn.k_proj = _sliced_linear(attn.k_proj, out_idx=kv_rows)
    attn.v_proj = _sliced_linear(attn.v_proj, out_idx=kv_rows)
    attn.o_proj = _sliced_linear(attn.o_proj, in_idx=q_rows)
    attn.num_key_value_groups = keep_q.shape[1]


def input_norms(model, calibration_ids, names) -> dict[str, torch.Tensor]:
    """||X_j||_2 (up to one positive factor) of the inputs of the Linears ``names``, from one
    calibration pass (``collect_hessians``' diagonal)."""
    hessians = collect_hessians(model, calibration_ids, names=names)
    return {n: input_norms_from_hessian(h) for n, h in hessians.items()}


def _mlp_keep_count(config, mlp_keep: float) -> int:
    return max(1, round(mlp_keep * config.intermediate_size))


@torch.no_grad()
def structured_prune(model, mlp_keep: float = 0.5, kv_groups_keep: int | None = None,
                     q_per_kv_keep: int | None = None, calibration_ids=None):
    """A physically smaller copy of a Llama causal LM: every block keeps ``mlp_keep`` of its MLP
    channels, ``kv_groups_keep`` KV groups and ``q_per_kv_keep`` query heads per group (None:
    all), chosen by ``mlp_channel_scores`` / ``attention_group_scores`` (activation-aware when
    ``calibration_ids`` are given). The config is updated, so the result generates, saves with
    ``save_pretrained`` and reloads with ``from_pretrained``."""
    if not 0 < mlp_keep <= 1:
        raise ValueError(f"mlp_keep must be in (0, 1], got {mlp_keep!r}")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    groups, q_per_kv = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    kv_keep = groups if kv_groups_keep is None else kv_groups_keep
    q_keep = q_per_kv if q_per_kv_keep is None else q_per_kv_keep
    if not (1 <= kv_keep <= groups and 1 <= q_keep <= q_per_kv):
        raise ValueError(f"kv_groups_keep must be in 1..{groups} and q_per_kv_keep in "
                         f"1..{q_per_kv}, got {kv_groups_keep}, {q_per_kv_keep}")
    keep = _mlp_keep_count(cfg, mlp_keep)
    pruned = copy.deepcopy(model).eval()
    for i, layer in enumerate(decoder_layers(pruned)):
        down_norm = o_norm = None
        if calibration_ids is not None:  # stats from the copy, earlier blocks already pruned
            p = f"model.layers.{i}."
            norms = input_norms(pruned, calibration_ids,
                                [p + "mlp.down_proj", p + "self_attn.o_proj"])
            down_norm, o_norm = norms[p + "mlp.down_proj"], norms[p + "self_attn.o_proj"]
        prune_mlp_channels(layer.mlp, keep_channels(mlp_channel_scores(layer.mlp, down_norm),
                                                    keep))
        if (kv_keep, q_keep) != (groups, q_per_kv):
            scores = attention_group_scores(layer.self_attn, head_dim, q_per_kv, o_norm)
            keep_groups = keep_channels(scores.sum(1), kv_keep)
            keep_q = torch.stack([keep_channels(scores[g], q_keep) for g in keep_groups])
            prune_attention_groups(layer.self_attn, head_dim, q_per_kv, keep_groups, keep_q)
    cfg = pruned.config
    cfg.head_dim = head_dim
    cfg.intermediate_size = keep
    cfg.num_key_value_heads = kv_keep
    cfg.num_attention_heads = kv_keep * q_keep
    return pruned


def mlp_keep_indices(model, mlp_keep: float = 0.5) -> list[torch.Tensor]:
    """Per block, the MLP channels ``structured_prune`` keeps by weight magnitude."""
    keep = _mlp_keep_count(model.config, mlp_keep)
    return [keep_channels(mlp_channel_scores(layer.mlp), keep) for layer in decoder_layers(model)]


def torch_pruning_mlp(model, keep_indices: list[torch.Tensor], example_ids: torch.Tensor):
    """The same MLP-channel pruning done by torch-pruning's dependency graph (Fang et al. 2023):
    pruning gate_proj's output channels pulls up_proj's outputs and down_proj's inputs with it.
    Returns a pruned copy with its config updated."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    with warnings.catch_warnings():  # the RMSNorm weights it lists are on the hidden size,
        warnings.simplefilter("ignore")  # which no group here touches
        graph = tp.DependencyGraph().build_dependency(
            pruned, example_inputs={"input_ids": example_ids},
            output_transform=lambda out: out.logits)
    for layer, keep in zip(decoder_layers(pruned), keep_indices):
        drop = sorted(set(range(layer.mlp.gate_proj.out_features)) - set(keep.tolist()))
        group = graph.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels,
                                        idxs=drop)
        group.prune()
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features
    pruned.config.intermediate_size = decoder_layers(pruned)[0].mlp.gate_proj.out_features
    return pruned


def csr_bytes(weight: torch.Tensor, index_bytes: int = 8) -> int:
    """Bytes of ``weight`` in CSR: values (its dtype), column indices and row pointers
    (``index_bytes`` each: int64, what torch's ``to_sparse_csr`` stores). At 50% sparsity an
    fp32 CSR matrix with int32 indices (``index_bytes=4``) is as large as the dense one."""
    nnz = int(weight.count_nonzero())
    return nnz * (weight.element_size() + index_bytes) + (weight.shape[0] + 1) * index_bytes


def linear_param_count(model) -> int:
    """Parameters of the decoder's Linear layers (the tied embedding / head left out)."""
    return sum(m.weight.numel() for m in find_linears(model).values())


def nonzero_linear_params(model) -> int:
    return sum(m.weight.count_nonzero().item() for m in find_linears(model).values())


# --------------------------------------------------------------------------- speed


def sparse_matmul_sweep(out_features: int, in_features: int, tokens: int,
                        sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
                        min_run_time: float = 0.2, seed: int = 0) -> list[dict]:
    """Time y = W x with W (out, in) dense against W stored as CSR (``torch.sparse.mm``) for x
    (in, tokens), at each sparsity (random magnitude-style masks), side by side in one run. Rows:
    sparsity, dense and CSR medians (ms), ``csr_speedup`` = dense / CSR (above 1: CSR wins)."""
    from utils.bench import compare

    check_positive_int("out_features", out_features), check_positive_int("in_features", in_features)
    check_positive_int("tokens", tokens)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(in_features, tokens, generator=g)
    rows = []
    with torch.inference_mode():
        for s in sparsities:
            w = torch.randn(out_features, in_features, generator=g)
            w = w * magnitude_mask(w, s)
            with warnings.catch_warnings():  # "CSR support is in beta"
                warnings.simplefilter("ignore")
                w_csr = w.to_sparse_csr()
            t = compare({"dense": lambda w=w: w @ x,
                         "csr": lambda w=w_csr: torch.sparse.mm(w, x)},
                        min_run_time=min_run_time)
            rows.append({"sparsity": s, "dense_ms": t["dense"]["median_ms"],
                         "csr_ms": t["csr"]["median_ms"], "csr_speedup": t["csr"]["speedup"]})
    return rows


def break_even_sparsity(sparsities, dense_s, sparse_s) -> float | None:
    """The sparsity where the sparse time crosses the dense one, interpolated linearly between
    the two measured points around the first crossing (``None`` if sparse never wins; the first
    sparsity if it always does)."""
    s, d, c = list(sparsities), list(dense_s), list(sparse_s)
    if not (len(s) == len(d) == len(c)) or len(s) < 1:
        raise ValueError("sparsities, dense_s and sparse_s must be non-empty and of equal length")
    if any(b <= a for a, b in zip(s, s[1:])):
        raise ValueError("sparsities must be strictly increasing")
    if any(not (t > 0) for t in d + c):
        raise ValueError("timings must be positive")
    ratio = [math.log(ci / di) for ci, di in zip(c, d)]  # > 0: sparse slower
    if ratio[0] <= 0:
        return s[0]
    for i in range(1, len(s)):
        if ratio[i] <= 0:
            return s[i - 1] + (s[i] - s[i - 1]) * ratio[i - 1] / (ratio[i - 1] - ratio[i])
    return None


def latency_rows(models: dict[str, nn.Module], prompt_len: int = 256, decode_tokens: int = 32,
                 min_run_time: float = 0.3, seed: int = 0) -> dict[str, dict[str, float]]:
    """Prefill (batch 1, ``prompt_len`` tokens, last-position logits only, as a server computes
    them) and decode (``decode_tokens`` greedy steps with the KV cache, batch 1) median times for
    each model, measured side by side; speed-ups are against the first model."""
    from utils.bench import compare

    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed))

    def prefill(m):
        return lambda: m(input_ids=ids, logits_to_keep=1)

    def decode(m):
        return lambda: m.generate(ids[:, :8], max_new_tokens=decode_tokens,
                                  min_new_tokens=decode_tokens, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        pre = compare({k: prefill(m) for k, m in models.items()}, min_run_time=min_run_time)
        dec = compare({k: decode(m) for k, m in models.items()}, min_run_time=min_run_time)
    return {k: {"prefill_ms": pre[k]["median_ms"], "prefill_speedup": pre[k]["speedup"],
                "decode_ms_per_token": dec[k]["median_ms"] / decode_tokens,
                "decode_speedup": dec[k]["speedup"]}
            for k in models}


# --------------------------------------------------------------------------- sensitivity


@torch.no_grad()
def sensitivity_scan(model, eval_ids: torch.Tensor, sparsity: float = 0.8,
                     max_tokens: int = 2048, progress: bool = True) -> dict[str, float]:
    """Perplexity after magnitude-pruning one Linear alone to ``sparsity`` (every other layer
    dense), for every decoder Linear: the damage each layer takes (Han et al. 2015, §4's
    per-layer sensitivity curves)."""
    from tqdm.auto import tqdm

    from utils.metrics import perplexity

    sparsity = check_sparsity(sparsity)
    out = {}
    for name, lin in tqdm(find_linears(model).items(), desc="sensitivity", disable=not progress):
        original = lin.weight.detach().clone()
        lin.weight.mul_(magnitude_mask(lin.weight, sparsity))
        try:
            out[name] = perplexity(model, eval_ids, max_tokens=max_tokens)
        finally:
            lin.weight.copy_(original)
    return out


def allocate_sparsity(sensitivity: dict[str, float], sizes: dict[str, int], target: float,
                      spread: float = 0.2) -> dict[str, float]:
    """Non-uniform per-layer sparsities with the same total as a uniform ``target``: layers rank
    by damage, the least sensitive get up to ``target + spread``, the most sensitive down to
    ``target - spread`` (linear in rank, like OWL's outlier-weighted allocation, Yin et al.
    2024), then all shift by one constant so the parameter-weighted mean is exactly ``target``
    (clipped to [0, 0.99])."""
    target = check_sparsity(target)
    if set(sensitivity) != set(sizes):
        raise ValueError("sensitivity and sizes must name the same layers")
    names = sorted(sensitivity, key=lambda n: sensitivity[n])  # least damage first
    k = len(names)
    raw = {n: target + spread * (1 - 2 * i / max(1, k - 1)) for i, n in enumerate(names)}
    total = sum(sizes.values())
    lo, hi = -1.0, 1.0
    for _ in range(60):  # bisect the shift that restores the weighted mean after clipping
        mid = (lo + hi) / 2
        mean = sum(min(0.99, max(0.0, raw[n] + mid)) * sizes[n] for n in names) / total
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return {n: min(0.99, max(0.0, raw[n] + (lo + hi) / 2)) for n in sensitivity}


def prune_with_allocation(model, allocation: dict[str, float]):
    """Magnitude-prune each Linear to its own sparsity; returns (copy, masks)."""
    pruned = copy.deepcopy(model).eval()
    masks = {n: magnitude_mask(pruned.get_submodule(n).weight, s) for n, s in allocation.items()}
    apply_masks(pruned, masks)
    return pruned, masks


# --------------------------------------------------------------------------- the chapter's table


def report_rows(quick: bool = False) -> list[dict]:
    """Method, pattern, kept Linear parameters, weight MB (what the dense format stores: masked
    weights still cost their zeros), prefill and decode speed-up vs dense in the same run,
    perplexity and top-1 agreement with the dense model. ``quick``: the small model, short
    evaluation and timings."""
    from utils.metrics import lm_quality, reference_top1
    from utils.models import calibration_tokens, encode_split, load_course_model, model_weight_bytes

    name = "small" if quick else "teacher"
    max_tokens = 512 if quick else 8192
    model, tok = load_course_model(name)
    val = encode_split("validation", tok)
    calib = calibration_tokens(tok, sequences=2 if quick else 16, seq_len=128 if quick else 256)
    variants = {"dense": (model, "-")}
    for method in METHODS:
        variants[f"{method} 50%"] = (prune_unstructured(model, method, 0.5,
                                                        calibration_ids=calib)[0], "50% unstructured")
        if not quick:
            variants[f"{method} 2:4"] = (prune_unstructured(model, method, n_m=(2, 4),
                                                            calibration_ids=calib)[0], "2:4")
    variants["structured MLP 50%"] = (structured_prune(model, 0.5, calibration_ids=calib),
                                      "50% MLP channels")
    cfg = model.config
    variants["structured MLP 50% + heads 50%"] = (
        structured_prune(model, 0.5, kv_groups_keep=max(1, cfg.num_key_value_heads // 2),
                         calibration_ids=calib), "50% MLP channels, half the KV groups")
    speed_models = {k: v[0] for k, v in variants.items()
                    if k in ("dense", "wanda 50%", "structured MLP 50%",
                             "structured MLP 50% + heads 50%")}
    speed = latency_rows(speed_models, prompt_len=64 if quick else 256,
                         decode_tokens=8 if quick else 32,
                         min_run_time=0.05 if quick else 0.3)
    ref = reference_top1(model, val, max_tokens)
    rows = []
    for label, (m, pattern) in variants.items():
        quality = lm_quality(ref, m, val, max_tokens)
        rows.append({"model": name, "method": label, "pattern": pattern,
                     "linear_params_kept": nonzero_linear_params(m),
                     "weight_MB": model_weight_bytes(m) / 1e6,
                     "prefill_speedup": speed.get(label, {}).get("prefill_speedup"),
                     "decode_speedup": speed.get(label, {}).get("decode_speedup"),
                     "perplexity": quality["perplexity"],
                     "top1_agreement": quality["top1_agreement"]})
    return rows


# --------------------------------------------------------------------------- the long recipe

RECOVERY_RESULTS = "results/03_pruning_recovery.json"  # under models/, committed


def recovery_recipe(steps: int = 300, stages: int = 4, sparsity: float = 0.7,
                    mlp_keep: float = 0.5, batch_size: int = 8, seq_len: int = 128,
                    learning_rate: float = 3e-4, eval_every: int = 25, max_tokens: int = 8192,
                    out=None) -> dict:
    """What the notebook runs briefly, run long (``python -m utils.pruning recovery``): on the
    teacher, (a) one-shot magnitude pruning to ``sparsity`` then ``steps`` masked fine-tuning
    steps, (b) gradual pruning over ``stages`` (``cubic_schedule``) with the same total steps,
    (c) structured pruning to ``mlp_keep`` of the MLP channels then ``steps`` steps. Perplexity
    curves every ``eval_every`` steps; saved as JSON under ``models/``."""
    import json
    import time

    from utils.metrics import perplexity
    from utils.models import calibration_tokens, encode_split, load_course_model
    from utils.paths import MODELS_DIR

    model, tok = load_course_model("teacher")
    train_ids, val = encode_split("train", tok), encode_split("validation", tok)
    kw = dict(batch_size=batch_size, seq_len=seq_len, learning_rate=learning_rate, data=train_ids)
    start = time.perf_counter()

    def curve(m, masks, n, desc):  # one optimizer and schedule; perplexity every eval_every
        points, done = [], [0]

        def after(x):
            if masks:
                apply_masks(x, masks)
            done[0] += 1
            if done[0] % eval_every == 0 or done[0] == n:
                x.eval()
                points.append([done[0], perplexity(x, val, max_tokens=max_tokens)])
                x.train()

        finetune(m, n, seed=0, desc=desc, after_step=after, **kw)
        return points

    result = {"dense": perplexity(model, val, max_tokens=max_tokens),
              "settings": {"steps": steps, "stages": stages, "sparsity": sparsity,
                           "mlp_keep": mlp_keep, "batch_size": batch_size, "seq_len": seq_len,
                           "learning_rate": learning_rate, "max_tokens": max_tokens,
                           "threads": torch.get_num_threads()}}
    one, masks = prune_unstructured(model, "magnitude", sparsity)
    result["one_shot"] = {"before": perplexity(one, val, max_tokens=max_tokens),
                          "curve": curve(one, masks, steps, "one-shot")}
    gradual, masks = iterative_prune_finetune(model, sparsity, stages, steps // stages, **kw)
    result["gradual"] = {"after": perplexity(gradual, val, max_tokens=max_tokens)}
    calib = calibration_tokens(tok, sequences=8, seq_len=256)
    small = structured_prune(model, mlp_keep, calibration_ids=calib)
    result["structured"] = {"before": perplexity(small, val, max_tokens=max_tokens),
                            "curve": curve(small, None, steps, "structured")}
    result["minutes"] = (time.perf_counter() - start) / 60
    path = MODELS_DIR / (out or RECOVERY_RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def load_recovery_results() -> dict:
    import json

    from utils.paths import MODELS_DIR

    path = MODELS_DIR / RECOVERY_RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m utils.pruning recovery`")
    return json.loads(path.read_text())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m utils.pruning")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("recovery", help="the long prune-and-fine-tune recipe (minutes)")
    rec.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(recovery_recipe(steps=args.steps))
