"""Chapter 06's small serving engine: paged KV blocks, continuous batching, prefix caching,
chunked prefill, on the course model (``utils.llama.CourseLlama``).

- **PagedAttention** (Kwon et al. 2023, "Efficient Memory Management for Large Language Model
  Serving with PagedAttention", §4.1-4.4): the KV cache lives in fixed-size blocks of a shared
  pool; each sequence has a block table (logical block i -> physical block). A sequence holds
  only ceil(len / block) blocks, so at most one partly filled block is wasted per sequence,
  instead of the max-length reservation of contiguous caches. Sequences that share a prefix
  share its blocks (reference counts); writing into a shared block copies it first
  (copy-on-write, §4.4). ``BlockAllocator`` keeps the tables; ``PagedKVCache`` holds the pool
  and gathers each sequence's keys and values through its table.
- **Prefix caching** (vLLM's automatic prefix caching, SGLang's RadixAttention): a full block is
  named by the hash of all tokens up to its end; a new prompt whose leading blocks match reuses
  them and skips their prefill.
- **Continuous batching** (Yu et al. 2022, "Orca", §3.2 iteration-level scheduling): the
  scheduler admits and retires requests at every decode step, instead of running a fixed batch
  until its longest request ends (static batching).
- **Chunked prefill** (Agrawal et al. 2024, "Sarathi-Serve"): a long prompt is prefilled a chunk
  per step, so the running requests' next tokens are not held up by a whole prompt's prefill.

The clock of ``run_engine`` is the measured compute time of each step (it jumps ahead when the
engine is idle until the next arrival), so latencies are real CPU times on this machine.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from utils.llama import CourseLlama, causal_cache_mask
from utils.validation import check_positive, check_positive_int

CHAPTER_PART = "06"  # chapter 06's second module (utils.kvcache holds CHAPTER and the report)


# --------------------------------------------------------------------------- block tables


class BlockAllocator:
    """Block tables over ``num_blocks`` physical blocks of ``block_size`` tokens.

    ``allocate(seq, n)`` gives a new sequence the blocks for its first n tokens; ``append(seq)``
    makes room for one more token (a fresh block when the last is full; a private copy when the
    last is shared: copy-on-write, recorded in ``copies`` as (source, destination) for the cache
    to carry out); ``fork(parent, child)`` shares every block of parent with child; ``free(seq)``
    drops a sequence. Free blocks are handed out lowest number first, so a sequence of
    operations gives the same tables everywhere. Running out raises ``MemoryError``.

    ``prefix_caching``: ``allocate(seq, n, tokens)`` reuses cached full blocks whose hash (all
    tokens up to the block's end) matches, among those named by ``register_prefix``; a freed
    block stays cached until its space is needed.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        check_positive_int("num_blocks", num_blocks)
        check_positive_int("block_size", block_size)
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free_blocks = list(range(num_blocks))  # a heap
        self.ref = [0] * num_blocks
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}
        self.copies: list[tuple[int, int]] = []
        self.cached: dict[int, int] = {}  # prefix hash -> block
        self.block_hash: dict[int, int] = {}  # block -> its prefix hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, LRU
        self.hit_tokens = 0
        self.prompt_tokens = 0

    # -- queries
    def table(self, seq) -> list[int]:
        self._check_seq(seq)
        return list(self.tables[seq])

    def num_free(self) -> int:
        """Blocks a new request could take (free, or cached but unused)."""
        return len(self.free_blocks) + len(self.evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, seq, position: int) -> int:
        """Index of ``position``'s key/value in the flattened pool (block x block_size + offset)."""
        table = self.tables[seq]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # -- operations
    def allocate(self, seq, num_tokens: int, tokens: list[int] | None = None) -> int:
        """Blocks for a new sequence's first ``num_tokens`` tokens. Returns how many leading
        tokens were found in the prefix cache (their keys and values are already there)."""
        if seq in self.tables:
            raise ValueError(f"seq {seq!r} is already allocated")
        check_positive_int("num_tokens", num_tokens)
        need = self.blocks_needed(num_tokens)
        reused = []
        if self.prefix_caching and tokens is not None:
            # match full blocks of all but the last token: the last is always run, for its logits
            h = 0
            for b in range((num_tokens - 1) // self.block_size):
                h = hash((h, tuple(tokens[b * self.block_size:(b + 1) * self.block_size])))
                if h not in self.cached:
                    break
                reused.append(self.cached[h])
        if need - len(reused) > self.num_free() - sum(self.ref[b] == 0 for b in reused):
            raise MemoryError(f"out of KV blocks: {seq!r} needs {need - len(reused)}, "
                              f"{self.num_free()} free")
        for b in reused:
            if self.ref[b] == 0:
                self.evictable.pop(b)
            self.ref[b] += 1
        table = reused + [self._take() for _ in range(need - len(reused))]
        self.tables[seq], self.lengths[seq] = table, num_tokens
        hit = len(reused) * self.block_size
        if tokens is not None:
            self.hit_tokens += hit
            self.prompt_tokens += num_tokens
        return hit

    def append(self, seq) -> int:
        """Room for one more token of ``seq``; returns the block it goes into."""
        self._check_seq(seq)
        table, n = self.tables[seq], self.lengths[seq]
        if n % self.block_size == 0:  # the last block is full (or there is none)
            table.append(self._take())
        elif self.ref[table[-1]] > 1:  # shared: copy before writing
            fresh = self._take()
            self.ref[table[-1]] -= 1
            self.copies.append((table[-1], fresh))
            table[-1] = fresh
        self.lengths[seq] = n + 1
        return table[-1]

    def fork(self, parent, child) -> None:
        """``child`` shares all of ``parent``'s blocks (parallel sampling, beam search)."""
        self._check_seq(parent)
        if child in self.tables:
            raise ValueError(f"child {child!r} is already allocated")
        for b in self.tables[parent]:
            self.ref[b] += 1
        self.tables[child] = list(self.tables[parent])
        self.lengths[child] = self.lengths[parent]

    def free(self, seq) -> None:
        self._check_seq(seq)
        for b in self.tables.pop(seq):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.block_hash:
                    self.evictable[b] = None  # keep its contents for a later prompt
                else:
                    heapq.heappush(self.free_blocks, b)
        del self.lengths[seq]

    # -- internals
    def _check_seq(self, seq):
        if seq not in self.tables:
            raise KeyError(f"seq {seq!r} has no blocks (allocate it first)")

    def _take(self) -> int:
        if self.free_blocks:
            b = heapq.heappop(self.free_blocks)
        elif self.evictable:  # evict the least recently freed cached block
            b, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash.pop(b)]
        else:
            raise MemoryError(f"out of KV blocks (all {self.num_blocks} in use)")
        self.ref[b] = 1
        return b

    def register_prefix(self, seq, tokens: list[int]) -> None:
        """Name the sequence's full blocks of ``tokens`` by their prefix hash, for later prompts
        to reuse. Call it once their keys and values are written (after the prefill): a prompt
        admitted earlier must not read blocks still being filled."""
        if not self.prefix_caching:
            return
        h = 0
        for b in range(len(tokens) // self.block_size):
            h = hash((h, tuple(tokens[b * self.block_size:(b + 1) * self.block_size])))
            block = self.tables[seq][b]
            if h not in self.cached and block not in self.block_hash:
                self.cached[h], self.block_hash[block] = block, h


class PagedKVCache:
    """The course model's KV cache as a pool of blocks: keys and values of shape
    (layers, num_blocks x block_size, Hkv, D), addressed through a ``BlockAllocator``.

    Before each forward, ``bind(seqs, positions)`` names the sequences of the batch and the
    positions (B, T) their tokens take; the model's attention then writes each token's keys and
    values at its slot and reads each sequence's cache through its block table (a gather, padded
    to the longest sequence and masked), as PagedAttention's kernel does block by block."""

    def __init__(self, model: CourseLlama, num_blocks: int, block_size: int = 16,
                 prefix_caching: bool = False):
        c = model.config
        self.allocator = BlockAllocator(num_blocks, block_size, prefix_caching)
        shape = (c.num_layers, num_blocks * block_size, c.num_kv_heads, c.head_dim)
        dtype = model.embed.weight.dtype
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self._write = self._read = None

    def bytes_per_token(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def bind(self, seqs: list, positions: torch.Tensor) -> None:
        a = self.allocator
        for src, dst in a.copies:  # copy-on-write: copy whole blocks before anything is written
            bs = a.block_size
            self.k[:, dst * bs:(dst + 1) * bs] = self.k[:, src * bs:(src + 1) * bs]
            self.v[:, dst * bs:(dst + 1) * bs] = self.v[:, src * bs:(src + 1) * bs]
        a.copies.clear()
        self._write = torch.tensor([[a.slot(s, int(p)) for p in row]
                                    for s, row in zip(seqs, positions)])  # (B, T)
        length = int(positions.max()) + 1
        self._read = torch.tensor([[a.slot(s, j) if j < a.lengths[s] else 0
                                    for j in range(length)] for s in seqs])  # (B, L)

    def update(self, layer, positions, k, v):
        B, H, T, D = k.shape
        slots = self._write.reshape(-1)
        self.k[layer].index_copy_(0, slots, k.transpose(1, 2).reshape(B * T, H, D))
        self.v[layer].index_copy_(0, slots, v.transpose(1, 2).reshape(B * T, H, D))
        return (self.k[layer][self._read].transpose(1, 2),  # (B, Hkv, L, D)
                self.v[layer][self._read].transpose(1, 2))

    def mask(self, positions, length):
        return causal_cache_mask(positions, length)  # padding slots lie past every position


@torch.inference_mode()
def paged_forward(model: CourseLlama, cache: PagedKVCache, seqs: list, tokens: list[list[int]],
                  starts: list[int]) -> torch.Tensor:
    """One forward of several sequences through the paged cache: sequence i feeds ``tokens[i]``
    (all the same length T) at positions starts[i], starts[i] + 1, ...; its blocks must already
    hold those positions. Returns logits (B, T, V)."""
    T = len(tokens[0])
    positions = torch.tensor([[s + t for t in range(T)] for s in starts])  # (B, T)
    cache.bind(seqs, positions)
    return model(torch.tensor(tokens), cache, positions)


# --------------------------------------------------------------------------- workload


@dataclass
class Request:
    rid: int
    arrival: float  # seconds
    prompt: list[int]
    max_new: int
    output: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)


def corpus_prompt(length: int, offset: int = 0) -> torch.Tensor:
    """(1, length) token ids of real held-out text (the validation split), from ``offset``."""
    from utils.models import encode_split, load_tokenizer

    check_positive_int("length", length)
    ids = encode_split("validation", load_tokenizer())
    return ids[offset:offset + length].unsqueeze(0)


def poisson_workload(n: int, rate: float, seed: int = 0, prompt_range=(16, 128),
                     output_range=(8, 64), shared_prefix: int = 0) -> list[Request]:
    """``n`` requests with Poisson arrivals (exponential gaps of mean 1 / ``rate`` seconds),
    prompt and output lengths uniform in the inclusive ranges, prompts cut from held-out text at
    seeded offsets. ``shared_prefix``: every prompt starts with the same that-many tokens (a
    system prompt), then its own text."""
    from utils.models import encode_split, load_tokenizer

    check_positive_int("n", n)
    check_positive(rate=rate)
    text = encode_split("validation", load_tokenizer()).tolist()
    rng = random.Random(seed)
    system = text[:shared_prefix]
    t, out = 0.0, []
    for rid in range(n):
        t += rng.expovariate(rate)
        length = rng.randint(*prompt_range)
        start = rng.randrange(shared_prefix, len(text) - length)
        out.append(Request(rid, t, system + text[start:start + length],
                           rng.randint(*output_range)))
    return out


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (as ``utils.bench.latency_percentiles``)."""
    s = sorted(values)
    return s[max(0, math.ceil(p * len(s) / 100) - 1)]


# --------------------------------------------------------------------------- the engine


@torch.inference_mode()
def run_engine(model: CourseLlama, requests: list[Request], *, policy: str = "continuous",
               max_batch: int = 8, block_size: int = 16, num_blocks: int | None = None,
               prefix_caching: bool = False, chunk: int | None = None) -> dict:
    """Serve ``requests`` (greedy) and measure it.

    ``policy``: ``"continuous"`` admits a waiting request whenever a batch slot and its blocks
    are free and retires a request the step it ends (Orca); ``"static"`` admits a new batch only
    when the previous one has wholly finished, and its finished requests keep decoding (their
    tokens discarded) until the longest is done, as request-level batching does. ``chunk``:
    prefill at most that many prompt tokens per step (chunked prefill); None prefills each
    admitted prompt whole. Returns throughput (generated tokens per second of engine time),
    time-to-first-token and inter-token latencies (seconds, with p50/p99), the KV memory
    actually used against what a paged and a contiguous max-length cache reserve
    (time-averaged over steps), and the prefix-cache hit rate."""
    if policy not in ("continuous", "static"):
        raise ValueError(f"policy must be 'continuous' or 'static', got {policy!r}")
    check_positive_int("max_batch", max_batch)
    if chunk is not None:
        check_positive_int("chunk", chunk)
    max_len = model.cos.shape[0]
    if num_blocks is None:
        num_blocks = max_batch * -(-max_len // block_size)
    cache = PagedKVCache(model, num_blocks, block_size, prefix_caching)
    alloc = cache.allocator
    reqs = [Request(r.rid, r.arrival, list(r.prompt), r.max_new) for r in requests]
    for r in reqs:
        if len(r.prompt) + r.max_new > max_len:
            raise ValueError(f"request {r.rid}: prompt + max_new exceed {max_len} positions")
    waiting = sorted(reqs, key=lambda r: r.arrival)
    prefilling: list[list] = []  # [request, next prompt position to run]
    running: list[Request] = []  # decoding
    done_in_batch: list[Request] = []  # static: finished but still in the batch
    now, steps, used_sum, paged_sum, contiguous_sum = 0.0, 0, 0, 0, 0
    last: dict[int, int] = {}  # the token each request feeds next
    while waiting or prefilling or running:
        if not (prefilling or running) and waiting[0].arrival > now:
            now = waiting[0].arrival  # idle: jump to the next arrival
        batch_open = policy == "continuous" or not (prefilling or running or done_in_batch)
        while (batch_open and waiting and waiting[0].arrival <= now
               and len(prefilling) + len(running) + len(done_in_batch) < max_batch
               and alloc.blocks_needed(len(waiting[0].prompt)) <= alloc.num_free()):
            r = waiting.pop(0)
            hit = alloc.allocate(r.rid, len(r.prompt), r.prompt)
            prefilling.append([r, hit])
        t0 = time.perf_counter()
        budget = chunk if chunk is not None else math.inf
        finished_prefill = []
        for entry in prefilling:  # prefill, whole or by chunks
            r, pos = entry
            if budget <= 0:
                break
            stop = min(len(r.prompt), pos + budget)
            logits = paged_forward(model, cache, [r.rid], [r.prompt[pos:stop]], [pos])
            budget -= stop - pos
            entry[1] = stop
            if stop == len(r.prompt):
                alloc.register_prefix(r.rid, r.prompt)
                r.output.append(int(logits[0, -1].argmax()))
                last[r.rid] = r.output[-1]
                finished_prefill.append(entry)
        live = running + done_in_batch
        if live:  # one decode step for every request in the batch, each at its own position
            starts = [alloc.lengths[r.rid] for r in live]
            for r in live:
                alloc.append(r.rid)
            logits = paged_forward(model, cache, [r.rid for r in live],
                                   [[last[r.rid]] for r in live], starts)
            for r, row in zip(live, logits[:, -1]):
                last[r.rid] = int(row.argmax())
                if r in running:  # a finished request of a static batch only pads
                    r.output.append(last[r.rid])
        now += time.perf_counter() - t0
        steps += 1
        for r in running:
            r.token_times.append(now)
        for entry in finished_prefill:
            prefilling.remove(entry)
            entry[0].token_times.append(now)
            running.append(entry[0])
        for r in list(running):
            if len(r.output) >= r.max_new:
                running.remove(r)
                if policy == "continuous":
                    alloc.free(r.rid)
                else:
                    done_in_batch.append(r)
        if policy == "static" and not (running or prefilling) and done_in_batch:
            for r in done_in_batch:
                alloc.free(r.rid)
            done_in_batch = []
        live_now = [entry[0] for entry in prefilling] + running + done_in_batch
        used_sum += sum(alloc.lengths[r.rid] for r in live_now)
        paged_sum += sum(len(alloc.tables[r.rid]) * block_size for r in live_now)
        contiguous_sum += len(live_now) * max_len
    ttft = [r.token_times[0] - r.arrival for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(r.token_times, r.token_times[1:])]
    generated = sum(len(r.output) for r in reqs)
    return {"policy": policy, "requests": len(reqs), "steps": steps, "seconds": now,
            "generated": generated, "throughput": generated / (now - reqs[0].arrival),
            "ttft": ttft, "itl": itl,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
            "e2e_mean": statistics.fmean(r.token_times[-1] - r.arrival for r in reqs),
            "outputs": {r.rid: r.output for r in reqs},
            "memory": {"used_token_steps": used_sum,
                       "paged_waste": 1 - used_sum / paged_sum if paged_sum else 0.0,
                       "contiguous_waste": 1 - used_sum / contiguous_sum if contiguous_sum else 0.0,
                       "bytes_per_token": cache.bytes_per_token()},
            "prefix_hit_rate": alloc.hit_tokens / alloc.prompt_tokens if alloc.prompt_tokens else 0.0}
