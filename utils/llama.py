"""The course's Llama in one readable file: config, RMSNorm, RoPE, decoder block, model, KV cache.

The same computation as transformers' ``LlamaForCausalLM`` (RMSNorm, grouped-query attention with
rotary position embeddings, SwiGLU MLP, tied ``lm_head``) in plain PyTorch with no
data-dependent Python, so ``torch.fx.symbolic_trace`` and ``torch.compile`` capture it whole.
Chapters that rewrite the model (fusion, low-rank, KV cache, parallelism, Triton, capstone) work
on this file; ``tests/test_llama.py`` checks it against transformers' logits.

References: Touvron et al. 2023, "LLaMA" (§2.2: pre-normalisation with RMSNorm, SwiGLU, rotary
embeddings); Zhang and Sennrich 2019 (RMSNorm); Su et al. 2021, "RoFormer" (§3.4.2, rotary
embeddings); Ainslie et al. 2023, "GQA" (§2, grouped-query attention).

Shapes: B batch, T tokens in this call, L cache length, C hidden, H query heads, Hkv key/value
heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.validation import check_positive_int


@dataclass(frozen=True)
class LlamaConfig:
    """The numbers that define a course Llama (the fields of transformers' ``LlamaConfig`` the
    computation uses)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_positions"):
            check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads "
                             f"({self.num_heads}) and num_heads by num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim (hidden_size / num_heads) must be even for RoPE, got "
                             f"{self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config) -> "LlamaConfig":
        """From a transformers ``LlamaConfig`` (or its ``config.json`` as a dict)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        rope = get("rope_parameters") or {}
        return cls(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                   num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                   num_kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
                   intermediate_size=get("intermediate_size"),
                   max_positions=get("max_position_embeddings"),
                   rms_norm_eps=get("rms_norm_eps", 1e-5),
                   rope_theta=rope.get("rope_theta") or get("rope_theta", 10000.0))


def speed_model_config(hidden_size: int = 1536, num_layers: int = 12) -> LlamaConfig:
    """The course architecture at a realistic size for *speed* studies (random weights: speed
    does not depend on their values; quality stays on the trained course models). At the default
    size, 351M parameters (1.4 GB in fp32, 0.7 GB in bf16): batch-1 decode reads far more than
    any CPU cache holds, so it is memory-bound as in a real LLM. Build it with
    ``CourseLlama.from_config(speed_model_config())`` (a few seconds)."""
    check_positive_int("hidden_size", hidden_size)
    if hidden_size % 128:
        raise ValueError(f"hidden_size must be a multiple of 128 (heads of 128), got {hidden_size}")
    heads = hidden_size // 128
    return LlamaConfig(vocab_size=32000, hidden_size=hidden_size, num_layers=num_layers,
                       num_heads=heads, num_kv_heads=max(1, heads // 3) if heads % 3 == 0 else 1,
                       intermediate_size=hidden_size * 8 // 3 // 256 * 256 or 256,
                       max_positions=2048)


# --------------------------------------------------------------------------- RMSNorm


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang and Sennrich 2019, eq. 4) written as transformers writes it: five
    operators (cast, square, mean, rsqrt, two multiplies)."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps))


class CourseRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return rms_norm_reference(x, self.weight, self.eps)


# --------------------------------------------------------------------------- RoPE


def rope_tables(head_dim: int, max_positions: int, base: float = 10000.0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (max_positions, head_dim) of rotary embeddings, computed once:
    theta_i = base^(-2i / head_dim), angle(p, i) = p theta_i (RoFormer §3.4.2), in the
    half-split layout that transformers' Llama uses (the frequencies repeated for both halves)."""
    check_positive_int("head_dim", head_dim)
    check_positive_int("max_positions", max_positions)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base}")
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)  # (P, D/2)
    emb = torch.cat([angles, angles], dim=-1)  # (P, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by tables cos, sin (T, D): x cos + rotate_half(x) sin."""
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------- static KV cache


def causal_cache_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """True where a query may look: key slot j holds position j, and a query at position p sees
    keys j <= p. ``positions`` (T,) gives a (T, L) mask shared by the batch; (B, T), one row of
    positions per sequence (sequences of different lengths in one batch), gives (B, 1, T, L)."""
    keys = torch.arange(length, device=positions.device)
    mask = keys <= positions.unsqueeze(-1)  # (T, L) or (B, T, L)
    return mask if positions.dim() == 1 else mask.unsqueeze(1)


class StaticKVCache(nn.Module):
    """Keys and values of every layer in buffers allocated once, (layers, B, Hkv, L, D) each.

    A decode step writes its token's keys and values in place at ``positions`` and attends over
    the whole length ``L`` with a mask, so every step has the same shapes: what lets a compiled
    model (``torch.compile(mode="reduce-overhead")``, CUDA graphs) replay one graph per step, as
    gpt-fast does. Size: 2 * layers * Hkv * D * L * B * bytes per value (Pope et al. 2022, §2.1).
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_length: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        check_positive_int("batch_size", batch_size)
        max_length = config.max_positions if max_length is None else max_length
        check_positive_int("max_length", max_length)
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at ``positions`` (T,); return the layer's whole cache."""
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer], self.v[layer]  # (B, Hkv, L, D)

    def mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Which of the ``length`` cached keys each query at ``positions`` may attend to."""
        return causal_cache_mask(positions, length)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


# --------------------------------------------------------------------------- model


class CourseDecoderBlock(nn.Module):
    """One Llama decoder layer (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP) in plain
    PyTorch. Without a cache it attends causally over its T tokens; with a ``StaticKVCache`` it
    attends over the cache with a mask built from ``positions``."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int,
                 eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}) and heads by "
                             f"kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.shard_width = None  # tensor parallelism (chapter 07) sets this rank's heads x head_dim
        d = self.head_dim
        self.input_norm = CourseRMSNorm(hidden, eps)
        self.q_proj = nn.Linear(hidden, heads * d, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * d, bias=False)
        self.o_proj = nn.Linear(heads * d, hidden, bias=False)
        self.attn_dropout = nn.Dropout(dropout)  # identity at inference: a pass removes it
        self.post_norm = CourseRMSNorm(hidden, eps)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    @classmethod
    def from_llama_layer(cls, layer: nn.Module, config) -> "CourseDecoderBlock":
        """A copy of a transformers ``LlamaDecoderLayer``'s weights."""
        att, mlp = layer.self_attn, layer.mlp
        block = cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                    config.intermediate_size, config.rms_norm_eps, config.attention_dropout)
        with torch.no_grad():
            block.input_norm.weight.copy_(layer.input_layernorm.weight)
            block.post_norm.weight.copy_(layer.post_attention_layernorm.weight)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(block, name).weight.copy_(getattr(att, name).weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(block, name).weight.copy_(getattr(mlp, name).weight)
        return block.eval()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal attention over the block's own T tokens, no cache (what ``symbolic_trace``
        captures)."""
        return self.attention_and_mlp(x, cos, sin)

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       cache: StaticKVCache, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """The tokens at ``positions`` (T,) attend over the layer's cache, masked to the keys
        at or before their own position."""
        return self.attention_and_mlp(x, cos, sin, cache, layer, positions)

    def attention_and_mlp(self, x, cos, sin, cache=None, layer=0, positions=None):
        B, T, C = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B,Hkv,T,D)
        v = self.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            k, v = cache.update(layer, positions, k, v)  # (B, Hkv, L, D)
            mask = cache.mask(positions, k.shape[2])  # True where a query may look
        groups = self.heads // self.kv_heads
        k = k.repeat_interleave(groups, dim=1)  # (B, H, T or L, D): each KV head serves a group
        v = v.repeat_interleave(groups, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        width = C if self.shard_width is None else self.shard_width  # (a constant when traced)
        att = self.attn_dropout(att.transpose(1, 2).contiguous().view(B, T, width))  # (B, T, C)
        x = x + self.o_proj(att)
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class CourseLlama(nn.Module):
    """Embedding, ``CourseDecoderBlock``s, final RMSNorm and tied ``lm_head``.

    ``model(ids)`` is a full causal forward without a cache; ``model(ids, cache, positions)``
    runs the tokens at ``positions`` against a cache (prefill and decode). A cache is any object
    with ``update(layer, positions, k, v) -> (keys, values)`` and ``mask(positions, length)``:
    ``StaticKVCache`` here, the growing and paged caches of chapter 06 (``utils.kvcache``,
    ``utils.serving``). ``positions`` is (T,) for a batch at the same positions, or (B, T) for
    sequences at different positions (continuous batching)."""

    def __init__(self, embed: nn.Embedding, blocks, norm: CourseRMSNorm, lm_head: nn.Linear,
                 rope_base: float, max_positions: int):
        super().__init__()
        self.embed, self.blocks = embed, nn.ModuleList(blocks)
        self.norm, self.lm_head = norm, lm_head
        cos, sin = rope_tables(blocks[0].head_dim, max_positions, rope_base)
        self.register_buffer("cos", cos, persistent=False)  # precomputed once, (P, D)
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def from_config(cls, config: LlamaConfig) -> "CourseLlama":
        """Randomly initialised weights (std 0.02, as transformers' Llama): for speed studies,
        where the values do not matter, at any size."""
        blocks = [CourseDecoderBlock(config.hidden_size, config.num_heads, config.num_kv_heads,
                                     config.intermediate_size, config.rms_norm_eps)
                  for _ in range(config.num_layers)]
        embed = nn.Embedding(config.vocab_size, config.hidden_size)
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        lm_head.weight = embed.weight  # tied, as the course checkpoints
        model = cls(embed, blocks, CourseRMSNorm(config.hidden_size, config.rms_norm_eps),
                    lm_head, config.rope_theta, config.max_positions)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)
        return model.eval()

    @classmethod
    def from_llama(cls, model: nn.Module) -> "CourseLlama":
        """Sharing the weights of a transformers ``LlamaForCausalLM`` (blocks copy theirs)."""
        cfg = model.config
        blocks = [CourseDecoderBlock.from_llama_layer(layer, cfg) for layer in model.model.layers]
        norm = CourseRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        with torch.no_grad():
            norm.weight.copy_(model.model.norm.weight)
        conf = LlamaConfig.from_hf(cfg)
        return cls(model.model.embed_tokens, blocks, norm, model.lm_head, conf.rope_theta,
                   conf.max_positions).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "CourseLlama":
        """Load a course checkpoint folder (``config.json`` + ``model.safetensors``) directly,
        without transformers: the key names are those of transformers' Llama."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"path must be a checkpoint folder with config.json, got "
                                    f"{path}")
        config = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
        model = cls.from_config(config)
        state = load_file(str(path / "model.safetensors"))
        renames = {"model.embed_tokens.": "embed.", "model.norm.": "norm.", "model.layers.":
                   "blocks.", "self_attn.": "", "mlp.": "", "input_layernorm": "input_norm",
                   "post_attention_layernorm": "post_norm"}
        ours = {}
        for key, tensor in state.items():
            for old, new in renames.items():
                key = key.replace(old, new)
            ours[key] = tensor
        ours.setdefault("lm_head.weight", ours["embed.weight"])  # tied embeddings
        model.load_state_dict(ours, strict=True)
        return model.eval()

    @property
    def config(self) -> LlamaConfig:
        b = self.blocks[0]
        return LlamaConfig(vocab_size=self.embed.num_embeddings, hidden_size=b.heads * b.head_dim,
                           num_layers=len(self.blocks), num_heads=b.heads,
                           num_kv_heads=b.kv_heads, intermediate_size=b.gate_proj.out_features,
                           max_positions=self.cos.shape[0], rms_norm_eps=b.input_norm.eps)

    def forward(self, ids: torch.Tensor, cache: StaticKVCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        T = ids.shape[1]
        if cache is None:
            if T > self.cos.shape[0]:
                raise ValueError(f"sequence length {T} exceeds the RoPE table "
                                 f"({self.cos.shape[0]})")
            cos, sin = self.cos[:T], self.sin[:T]  # (T, D)
        else:
            if positions is None or positions.shape not in ((T,), (ids.shape[0], T)):
                raise ValueError(f"positions must be a ({T},) or ({ids.shape[0]}, {T}) tensor of "
                                 f"token positions when a cache is given, got {positions}")
            cos, sin = self.cos[positions], self.sin[positions]  # (T, D) or (B, T, D)
            if positions.dim() == 2:  # one row of positions per sequence: broadcast over heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        x = self.embed(ids)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin) if cache is None else \
                block.forward_cached(x, cos, sin, cache, i, positions)
        return self.lm_head(self.norm(x))  # (B, T, V)


@torch.inference_mode()
def generate_with_cache(model: CourseLlama, ids: torch.Tensor, new_tokens: int,
                        cache: StaticKVCache | None = None) -> torch.Tensor:
    """Greedy generation with a static KV cache: one prefill of the prompt, then one token per
    forward. ``model`` may be compiled (the step shapes never change)."""
    check_positive_int("new_tokens", new_tokens)
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, T), got shape {tuple(ids.shape)}")
    B, T = ids.shape
    base = getattr(model, "_orig_mod", model)
    if cache is None:
        cache = StaticKVCache(base.config, B, T + new_tokens, device=ids.device)
    if T + new_tokens > cache.max_length:
        raise ValueError(f"prompt ({T}) + new_tokens ({new_tokens}) exceed the cache length "
                         f"({cache.max_length})")
    positions = torch.arange(T, device=ids.device)
    logits = model(ids, cache, positions)
    out = [ids, logits[:, -1:].argmax(-1)]
    for step in range(new_tokens - 1):
        positions = torch.tensor([T + step], device=ids.device)
        logits = model(out[-1], cache, positions)
        out.append(logits[:, -1:].argmax(-1))
    return torch.cat(out, dim=1)

