"""Chapter 07: data, tensor and pipeline parallelism as real ``torch.distributed`` processes.

Every scheme here runs in separate processes (``launch``): gloo on CPU, NCCL where each rank has a
GPU. What a 2-core machine cannot show (speed-ups), the cost model in ``utils.cluster`` predicts
for a cluster from the collectives measured here.

- **Collectives**: all-reduce, all-gather, reduce-scatter, broadcast and send/recv, timed against
  message size (``collective_times``) for the alpha-beta fit of ``utils.cluster``.
- **Tensor parallelism** (Megatron-LM, Shoeybi et al. 2019, §3): in every layer q/k/v and the
  MLP's gate/up projections are split by output columns (attention by heads, each rank keeping
  the KV heads its query heads use), o_proj and down_proj by input rows, so one all-reduce after
  attention and one after the MLP restore the full hidden state (``shard_tensor_parallel``).
  The same plan with DTensor's ``ColwiseParallel`` / ``RowwiseParallel``
  (``shard_with_dtensor``) checks the hand-written one.
- **Pipeline parallelism** (GPipe, Huang et al. 2019, §2.2): consecutive layers on consecutive
  ranks, the batch cut into M micro-batches that flow through the stages; with K stages a
  fraction (K - 1) / (M + K - 1) of each rank's time is idle (the bubble). ``pipeline_forward``
  is hand-written with send/recv and records when each stage works; ``pipeline_forward_library``
  runs the same split with ``torch.distributed.pipelining``'s ``ScheduleGPipe``.
- **Data parallelism** at inference: whole replicas serving different requests. It raises
  throughput; the latency of one request stays that of one replica (``data_parallel_generate``).

Functions that run on every rank take ``(rank, world_size, ...)`` and live at module level, so
that ``launch`` can start them in fresh processes (the "spawn" start method: the same on Linux,
macOS and Windows, and safe after torch has started its threads).

Reproduce the chapter's measurements::

    python -m utils.report 07
"""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from utils.llama import CourseLlama
from utils.paths import MODELS_DIR
from utils.validation import check_callable, check_positive, check_positive_int

CHAPTER = "07"  # found by utils.report; notebooks/07_*.ipynb, solutions/lab07_*.ipynb

# --------------------------------------------------------------------------- launching processes


class RankError(RuntimeError):
    """A rank raised (or died); ``rank`` says which, the message holds its traceback."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank} failed:\n{detail}")
        self.rank = rank


def free_port() -> int:
    """A TCP port that is free now on 127.0.0.1 (for the rendezvous of one launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    """NCCL when every rank can have its own GPU, else gloo (CPU)."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _to_bytes(obj) -> bytes:
    """Results travel as bytes (torch.save), not as shared-memory tensors: a rank may exit before
    the parent has read them."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rank_main(rank, world_size, fn, args, port, backend, threads, timeout_s, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        results.put((rank, True, _to_bytes(fn(rank, world_size, *args))))
    except BaseException:  # report everything, KeyboardInterrupt included, then exit
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, world_size: int = 2, args: tuple = (), *, timeout: float = 120.0,
           backend: str | None = None, threads: int | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined in one
    process group; return the ranks' results in rank order.

    If any rank raises or dies, the others are killed and ``RankError`` names it; after
    ``timeout`` seconds ``TimeoutError`` names the ranks still running. Whatever happens (an
    interrupted kernel included), no process is left behind. ``threads``: torch threads per rank,
    by default the cores shared out (``os.cpu_count() // world_size``, at least 1)."""
    check_callable("fn", fn)
    check_positive_int("world_size", world_size)
    check_positive(timeout=timeout)
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of fn's extra arguments, got {type(args).__name__}")
    if getattr(fn, "__module__", "__main__") == "__main__" or "<locals>" in fn.__qualname__:
        raise ValueError(f"fn must be a module-level function that a new process can import "
                         f"(spawn), got {fn.__qualname__} from {fn.__module__}")
    backend = backend or default_backend()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True, name=f"rank{r}",
                         args=(r, world_size, fn, args, port, backend, threads, timeout, results))
             for r in range(world_size)]
    out: dict[int, object] = {}
    started = []
    try:
        for p in procs:
            p.start()
            started.append(p)
        deadline = time.monotonic() + timeout
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(world_size) if r not in out]
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:g} s")
            try:
                rank, ok, payload = results.get(timeout=min(left, 0.2))
            except queue_module.Empty:
                for r, p in enumerate(procs):  # died without a word (killed, segfault)
                    if r not in out and p.exitcode not in (None, 0):
                        raise RankError(r, f"the process exited with code {p.exitcode}") from None
                continue
            if not ok:
                raise RankError(rank, payload)
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        return [out[r] for r in range(world_size)]
    finally:
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        results.join_thread()


# --------------------------------------------------------------------------- collectives

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv")


def _collective(op: str, rank: int, world_size: int, numel: int) -> Callable[[], None]:
    """One call of ``op`` on a float32 message of ``numel`` elements (the whole message: the
    gathered / scattered tensor is that size)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    full = torch.ones(numel, device=device)
    part = torch.ones(numel // world_size, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full)
    whole = full[: part.numel() * world_size]
    # torch 2.13 names these all_gather_single / reduce_scatter_single (the *_tensor names of
    # earlier versions are deprecated)
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    if op == "all_gather":
        return lambda: gather(whole, part)
    if op == "reduce_scatter":
        return lambda: scatter(part, whole)
    if op == "broadcast":
        return lambda: dist.broadcast(full, src=0)
    if op == "send_recv":  # ping-pong between ranks 0 and 1: half a round trip per message
        def ping_pong():
            if rank == 0:
                dist.send(full, 1)
                dist.recv(full, 1)
            elif rank == 1:
                dist.recv(full, 0)
                dist.send(full, 0)
        return ping_pong
    raise ValueError(f"op must be one of {COLLECTIVES}, got {op!r}")


def collective_times(rank: int, world_size: int, sizes_bytes: list[int],
                     ops: tuple[str, ...] = COLLECTIVES, repeats: int = 10,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Median seconds per call of each collective at each message size (run under ``launch``).

    Each repeat starts after a barrier and ends when this rank's call returns; the slowest
    rank's time counts (all-reduced with MAX), since a collective is done when all are.
    send/recv is a ping-pong, reported per one-way message."""
    gpu = dist.get_backend() == "nccl"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    out = {op: [] for op in ops}
    for op in ops:
        for size in sizes_bytes:
            call = _collective(op, rank, world_size, max(world_size, size // 4))
            times = []
            for i in range(warmup + repeats):
                dist.barrier()
                t0 = time.perf_counter()
                call()
                sync()
                times.append(time.perf_counter() - t0)
            slowest = torch.tensor(sorted(times[warmup:])[repeats // 2], dtype=torch.float64,
                                   device="cuda" if gpu else "cpu")
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            out[op].append(slowest.item() / (2 if op == "send_recv" else 1))
    return out


# --------------------------------------------------------------------------- tensor parallelism

def _linear_rows(linear: nn.Linear, rows: slice) -> nn.Linear:
    """A Linear keeping output features ``rows`` (a column-parallel shard: its W rows)."""
    out = nn.Linear(linear.in_features, rows.stop - rows.start, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[rows])
    return out


class RowParallelLinear(nn.Module):
    """This rank's slice ``cols`` of a Linear's input features; the partial products of all
    ranks are summed by one all-reduce (a bias, if any, is added once, after it).
    ``bytes_reduced`` counts the payload all-reduced, to check the formula."""

    def __init__(self, linear: nn.Linear, cols: slice, group=None):
        super().__init__()
        self.linear = nn.Linear(cols.stop - cols.start, linear.out_features, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight[:, cols])
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.group, self.bytes_reduced = group, 0

    def forward(self, x):
        y = self.linear(x)
        dist.all_reduce(y, group=self.group)
        self.bytes_reduced += y.numel() * y.element_size()
        return y if self.bias is None else y + self.bias


def head_shards(heads: int, kv_heads: int, rank: int, world_size: int) -> tuple[range, range]:
    """The query heads and KV heads rank ``rank`` holds under ``world_size``-way tensor
    parallelism: an equal share of the query heads and every KV head they read (query head h
    reads KV head h // (heads / kv_heads)). With fewer KV heads than ranks, KV heads are
    replicated on several ranks."""
    check_positive_int("world_size", world_size)
    if heads % world_size:
        raise ValueError(f"world_size ({world_size}) must divide the number of heads ({heads})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    per, group = heads // world_size, heads // kv_heads
    q = range(rank * per, (rank + 1) * per)
    kv = range(q.start // group, (q.stop - 1) // group + 1)
    if per % len(kv) or any((h - q.start) // (per // len(kv)) != h // group - kv.start for h in q):
        raise ValueError(f"{heads} heads over {kv_heads} KV heads cannot be split {world_size} "
                         f"ways with every rank's query groups equal")
    return q, kv


def shard_tensor_parallel(model: CourseLlama, rank: int, world_size: int, group=None):
    """Megatron-LM's split of every decoder layer, in place (Shoeybi et al. 2019, §3, Fig. 3):
    q/k/v by heads and gate/up by intermediate columns (no communication), o_proj and down_proj
    by input rows with an all-reduce each. Embedding, norms and lm_head stay replicated (Megatron
    also splits the vocabulary; at this size it would not pay)."""
    for block in model.blocks:
        q, kv = head_shards(block.heads, block.kv_heads, rank, world_size)
        d = block.head_dim
        block.q_proj = _linear_rows(block.q_proj, slice(q.start * d, q.stop * d))
        block.k_proj = _linear_rows(block.k_proj, slice(kv.start * d, kv.stop * d))
        block.v_proj = _linear_rows(block.v_proj, slice(kv.start * d, kv.stop * d))
        block.o_proj = RowParallelLinear(block.o_proj, slice(q.start * d, q.stop * d), group)
        inter = block.gate_proj.out_features
        if inter % world_size:
            raise ValueError(f"world_size ({world_size}) must divide intermediate_size ({inter})")
        cols = slice(rank * inter // world_size, (rank + 1) * inter // world_size)
        block.gate_proj = _linear_rows(block.gate_proj, cols)
        block.up_proj = _linear_rows(block.up_proj, cols)
        block.down_proj = RowParallelLinear(block.down_proj, cols, group)
        block.heads, block.kv_heads, block.shard_width = len(q), len(kv), len(q) * d
    return model


def shard_with_dtensor(model: CourseLlama, world_size: int):
    """The same plan with PyTorch's DTensor tensor parallelism: ``ColwiseParallel`` for q/k/v and
    gate/up, ``RowwiseParallel`` (which all-reduces its output) for o_proj and down_proj, on a
    1-D device mesh over the default process group. Needs kv_heads divisible by world_size."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world_size,))
    plan = {**{n: ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                "up_proj")},
            **{n: RowwiseParallel() for n in ("o_proj", "down_proj")}}
    for block in model.blocks:
        if block.kv_heads % world_size:
            raise ValueError(f"DTensor's even split needs world_size ({world_size}) to divide "
                             f"the KV heads ({block.kv_heads})")
        parallelize_module(block, mesh, plan)
        block.heads, block.kv_heads = block.heads // world_size, block.kv_heads // world_size
        block.shard_width = block.heads * block.head_dim
    return model


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (a DTensor counts its local shard)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())


def tensor_parallel_forward(rank: int, world_size: int, ids: torch.Tensor,
                            checkpoint: str = "teacher", method: str = "manual",
                            repeats: int = 0) -> dict:
    """One full forward of a course model under ``world_size``-way tensor parallelism (run under
    ``launch``). Rank 0 returns the logits; every rank its parameter bytes and the payload it
    all-reduced in that forward. ``repeats`` > 0: also the median seconds of that many more
    forwards (``forward_s``)."""
    if method not in ("manual", "dtensor"):
        raise ValueError(f"method must be 'manual' or 'dtensor', got {method!r}")
    model = CourseLlama.from_checkpoint(MODELS_DIR / checkpoint)
    full_bytes = local_parameter_bytes(model)
    if method == "manual":
        shard_tensor_parallel(model, rank, world_size)
    else:
        shard_with_dtensor(model, world_size)
    with torch.no_grad():
        logits = model(ids)
        reduced = sum(m.bytes_reduced for m in model.modules()
                      if isinstance(m, RowParallelLinear))
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return {"logits": logits if rank == 0 else None, "param_bytes": local_parameter_bytes(model),
            "full_param_bytes": full_bytes, "allreduce_bytes": reduced if method == "manual"
            else None, "forward_s": sorted(times)[len(times) // 2] if times else None}


def tensor_parallel_both(rank: int, world_size: int, ids: torch.Tensor,
                         checkpoint: str = "teacher", repeats: int = 0) -> list[dict]:
    """``tensor_parallel_forward`` by hand, then with DTensor, in the same processes."""
    return [tensor_parallel_forward(rank, world_size, ids, checkpoint, m, repeats)
            for m in ("manual", "dtensor")]


# --------------------------------------------------------------------------- pipeline parallelism

def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive layers per stage, as equal as possible (the first stages take the extra)."""
    check_positive_int("num_stages", num_stages)
    if num_stages > num_layers:
        raise ValueError(f"num_stages ({num_stages}) must be at most num_layers ({num_layers})")
    bounds = [i * num_layers // num_stages for i in range(num_stages + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class PipelineStage(nn.Module):
    """Stage ``index`` of ``num_stages``: the embedding (first stage), its layers, the final
    norm and lm_head (last stage). Takes token ids (first) or hidden states, full sequences."""

    def __init__(self, model: CourseLlama, index: int, num_stages: int):
        super().__init__()
        self.first, self.last = index == 0, index == num_stages - 1
        self.hidden_size = model.config.hidden_size
        layers = stage_layers(len(model.blocks), num_stages)[index]
        self.embed = model.embed if self.first else None
        self.blocks = nn.ModuleList(model.blocks[i] for i in layers)
        self.norm = model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self.register_buffer("cos", model.cos, persistent=False)
        self.register_buffer("sin", model.sin, persistent=False)

    def forward(self, x):
        x = self.embed(x) if self.first else x
        T = x.shape[1]
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T])
        return self.lm_head(self.norm(x)) if self.last else x


def pipeline_forward(rank: int, world_size: int, ids: torch.Tensor, microbatches: int,
                     checkpoint: str = "teacher") -> dict:
    """GPipe's forward (Huang et al. 2019, §2.2), hand-written (run under ``launch``): ``ids``
    cut into ``microbatches`` along the batch; stage r receives each micro-batch's hidden
    states from r - 1, runs its layers and sends the result to r + 1 without waiting
    (``isend``). Returns, per rank, the (start, end) time of each micro-batch's compute, and on
    the last rank the logits."""
    stage = PipelineStage(CourseLlama.from_checkpoint(MODELS_DIR / checkpoint), rank, world_size)
    return _run_stage(stage, rank, ids, microbatches)


def _run_stage(stage: PipelineStage, rank: int, ids: torch.Tensor, microbatches: int) -> dict:
    check_positive_int("microbatches", microbatches)
    if microbatches > ids.shape[0]:
        raise ValueError(f"microbatches ({microbatches}) must be at most the batch "
                         f"({ids.shape[0]})")
    events, outputs, sends = [], [], []
    with torch.no_grad():
        for chunk in ids.tensor_split(microbatches, 0):
            x = chunk
            if not stage.first:
                x = torch.empty(chunk.shape[0], chunk.shape[1], stage.hidden_size)
                dist.recv(x, rank - 1)
            t0 = time.perf_counter()
            y = stage(x)
            events.append((t0, time.perf_counter()))
            if stage.last:
                outputs.append(y)
            else:
                sends.append((dist.isend(y, rank + 1), y))  # keep y alive until sent
        for work, _ in sends:
            work.wait()
    return {"events": events, "logits": torch.cat(outputs) if stage.last else None}


def pipeline_sweep(rank: int, world_size: int, ids: torch.Tensor, microbatch_counts: list[int],
                   checkpoint: str = "teacher", repeats: int = 3) -> dict[int, list]:
    """``pipeline_forward``'s events for each micro-batch count M (run under ``launch``), the
    median-span run of ``repeats`` after one warm-up, so one set of processes serves a sweep."""
    stage = PipelineStage(CourseLlama.from_checkpoint(MODELS_DIR / checkpoint), rank, world_size)
    out = {}
    for m in microbatch_counts:
        _run_stage(stage, rank, ids, m)  # warm-up
        runs = []
        for _ in range(repeats):
            dist.barrier()
            events = _run_stage(stage, rank, ids, m)["events"]
            everyone = [None] * world_size
            dist.all_gather_object(everyone, events)
            runs.append(everyone)
        runs.sort(key=lambda r: bubble_from_events(r)["span_s"])
        out[m] = runs[len(runs) // 2]
    return out


def pipeline_forward_library(rank: int, world_size: int, ids: torch.Tensor, microbatches: int,
                             checkpoint: str = "teacher") -> dict:
    """The same stages under ``torch.distributed.pipelining``'s ``ScheduleGPipe`` (run under
    ``launch``); the last rank returns the logits."""
    from torch.distributed.pipelining import PipelineStage as LibraryStage
    from torch.distributed.pipelining import ScheduleGPipe

    model = CourseLlama.from_checkpoint(MODELS_DIR / checkpoint)
    stage = PipelineStage(model, rank, world_size)
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    schedule = ScheduleGPipe(LibraryStage(stage.to(device), rank, world_size, device),
                             microbatches)
    with torch.no_grad():
        out = schedule.step(ids.to(device)) if rank == 0 else schedule.step()
    return {"logits": out.cpu() if stage.last else None}


def bubble_from_events(events_per_rank: list[list[tuple[float, float]]]) -> dict:
    """The measured bubble: over the span from the first stage's first start to the last
    stage's last end, the fraction of time the ranks did not compute (on average). It includes
    what the formula leaves out: communication and unequal stages."""
    start = min(e[0] for events in events_per_rank for e in events)
    end = max(e[1] for events in events_per_rank for e in events)
    busy = [sum(b - a for a, b in events) for events in events_per_rank]
    span = end - start
    return {"span_s": span, "busy_s": busy, "bubble": 1 - sum(busy) / (len(busy) * span)}


# --------------------------------------------------------------------------- data parallelism

def data_parallel_generate(rank: int, world_size: int, prompts: torch.Tensor, new_tokens: int,
                           checkpoint: str = "teacher") -> dict:
    """Each rank a whole replica, serving every ``world_size``-th request (run under
    ``launch``), one request at a time with a static KV cache. Returns each of its requests'
    latency and the rank's start/end time."""
    from utils.kvcache import generate

    model = CourseLlama.from_checkpoint(MODELS_DIR / checkpoint)
    mine = prompts[rank::world_size]
    generate(model, mine[:1], 2, "static")  # warm-up
    dist.barrier()
    start, latencies = time.perf_counter(), []
    for prompt in mine:
        t0 = time.perf_counter()
        generate(model, prompt[None], new_tokens, "static")
        latencies.append(time.perf_counter() - t0)
    return {"start": start, "end": time.perf_counter(), "latencies": latencies,
            "tokens": len(mine) * new_tokens, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- report

def report_rows(quick: bool = False) -> list[dict]:
    """Chapter 07's headline figures (``python -m utils.report 07``): the alpha-beta fit of
    send/recv between two gloo processes, a 16 MiB all-reduce, TP = 2 and PP = 2 of the teacher
    against one process (max |logit difference|) and the measured bubble at M = 4 against
    GPipe's formula. ``quick``: smaller messages and batch."""
    from utils import cluster

    rows = []

    def add(measurement, value, unit, conditions):
        rows.append({"measurement": measurement, "value": float(value), "unit": unit,
                     "conditions": conditions})

    sizes = [2 ** k for k in range(16 if quick else 10, 23 if quick else 25, 2)]  # quick: 64 KiB+
    times = launch(collective_times, 2, (sizes, ("all_reduce", "send_recv"), 5 if quick else 20,
                                         2 if quick else 5), timeout=300)[0]
    alpha, beta = cluster.fit_alpha_beta(sizes, times["send_recv"])
    cond = f"2 {default_backend()} processes, {max(1, (os.cpu_count() or 1) // 2)} thread(s) each"
    add("send/recv latency alpha", alpha * 1e6, "us", cond)
    add("send/recv bandwidth beta", beta / 1e9, "GB/s", cond)
    add(f"all-reduce of {sizes[-1] // 2**10} KiB", times["all_reduce"][-1] * 1e3, "ms", cond)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (4 if quick else 8, 32 if quick else 64), generator=g)
    with torch.no_grad():
        reference = CourseLlama.from_checkpoint(MODELS_DIR / "teacher")(ids)
    tp = launch(tensor_parallel_forward, 2, (ids,), timeout=300)[0]
    add("TP = 2 vs one process, max |logit diff|", (tp["logits"] - reference).abs().max(), "",
        f"teacher fp32, batch {ids.shape[0]} x {ids.shape[1]}")
    sweep = launch(pipeline_sweep, 2, (ids, [4], "teacher", 1 if quick else 3), timeout=300)[0]
    add("pipeline bubble, K = 2, M = 4", bubble_from_events(sweep[4])["bubble"], "fraction",
        f"formula {cluster.bubble_fraction(2, 4):.2f}; teacher, batch {ids.shape[0]}")
    return rows


# --------------------------------------------------------------------------- small workers (notebook, tests)

def _sleep(rank: int, world_size: int, seconds: float) -> int:
    time.sleep(seconds)
    return rank


def _identity(rank: int, world_size: int) -> dict:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world_size": world_size, "sum": t.item(), "pid": os.getpid(),
            "threads": torch.get_num_threads()}
