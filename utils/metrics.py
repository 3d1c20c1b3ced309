"""Quality metrics shared by every chapter.

- ``perplexity``: exp of the mean next-token negative log-likelihood on held-out tokens
  (Jelinek et al. 1977), over non-overlapping windows of ``context_length`` tokens.
- ``compare_next_token``: how closely an optimised model follows a reference one: top-1
  agreement and the mean KL(P_reference || P_candidate) of their next-token distributions.
- ``lm_quality`` / ``reference_top1``: perplexity and agreement with a reference in one forward
  pass per window, the reference's argmax computed once for a whole table of variants.
- ``cosine_similarity``: row-wise cosine of two embedding matrices (MiniLM chapters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils.data import token_windows


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch.to(device)).logits.float()  # (B, T, V)


@torch.inference_mode()
def perplexity(model, token_ids: torch.Tensor, context_length: int = 256,
               max_tokens: int | None = None, batch_size: int = 8) -> float:
    """Perplexity of a causal LM on a 1-D token stream, in non-overlapping windows.

    Each window predicts its tokens 2..T from the ones before it, so the first token of every
    window is scored by no one; the mean is over all predicted tokens.
    """
    windows = token_windows(token_ids, context_length, max_tokens)
    total_nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = _logits(model, batch)[:, :-1]  # (B, T-1, V)
        targets = batch[:, 1:].to(logits.device)  # (B, T-1)
        total_nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                     reduction="sum").item()
        count += targets.numel()
    return math.exp(total_nll / count)


@torch.inference_mode()
def compare_next_token(reference, candidate, token_ids: torch.Tensor, context_length: int = 256,
                       max_tokens: int | None = 4096, batch_size: int = 8) -> dict[str, float]:
    """Top-1 agreement and mean KL(P_ref || P_cand) (nats/token) over the same windows."""
    windows = token_windows(token_ids, context_length, max_tokens)
    agree, kl_sum, count = 0, 0.0, 0
    for batch in windows.split(batch_size):
        ref, cand = _logits(reference, batch), _logits(candidate, batch).to(
            next(reference.parameters()).device)
        ref_logp, cand_logp = ref.log_softmax(-1), cand.log_softmax(-1)
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        kl_sum += (ref_logp.exp() * (ref_logp - cand_logp)).sum().item()
        count += batch.numel()
    return {"top1_agreement": agree / count, "kl": kl_sum / count}


@torch.inference_mode()
def lm_quality(reference, candidate, val_ids: torch.Tensor, max_tokens: int = 8192,
               context_length: int = 256, batch_size: int = 8) -> dict[str, float]:
    """Perplexity of ``candidate`` on the first ``max_tokens`` held-out tokens, and its top-1
    next-token agreement with ``reference`` there. ``reference`` may be a model or the
    ``reference_top1(...)`` tensor of a model (computed once, so that a table of many variants
    runs the float model once). Same windows and formula as ``utils.metrics.perplexity``, in the
    same forward pass as the agreement."""

    windows = token_windows(val_ids, context_length, max_tokens)  # (N, T)
    ref_top1 = reference if isinstance(reference, torch.Tensor) else reference_top1(
        reference, val_ids, max_tokens, context_length, batch_size)
    nll, count, agree = 0.0, 0, 0
    for batch, ref in zip(windows.split(batch_size), ref_top1.split(batch_size)):
        logits = candidate(input_ids=batch).logits.float()  # (B, T, V)
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                               batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
        agree += (logits.argmax(-1) == ref).sum().item()
    return {"perplexity": math.exp(nll / count), "top1_agreement": agree / ref_top1.numel()}


@torch.inference_mode()
def reference_top1(model, val_ids: torch.Tensor, max_tokens: int = 8192,
                   context_length: int = 256, batch_size: int = 8) -> torch.Tensor:
    """The argmax next token of ``model`` at every position of the evaluation windows (N, T)."""

    windows = token_windows(val_ids, context_length, max_tokens)
    return torch.cat([model(input_ids=b).logits.argmax(-1) for b in windows.split(batch_size)])


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two ``(N, D)`` matrices; returns ``(N,)``."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be (N, D) with the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1)
