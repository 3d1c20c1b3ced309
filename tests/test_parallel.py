"""Chapter 07's processes (utils.parallel): the launcher's failure handling, tensor and pipeline
parallelism of the teacher in real gloo processes against the single-process logits."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from utils import parallel as P
from utils.llama import CourseLlama
from utils.paths import MODELS_DIR

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 4096, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(ids):
    with torch.no_grad():
        return CourseLlama.from_checkpoint(MODELS_DIR / "teacher")(ids)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _record_pid_then_fail(rank, world_size, folder, bad_rank):
    (folder / f"{rank}.pid").write_text(str(os.getpid()))
    if rank == bad_rank:
        while len(list(folder.glob("*.pid"))) < world_size:  # every rank has written its pid
            time.sleep(0.05)
        time.sleep(0.2)  # and gone on into the barrier
        raise RuntimeError(f"rank {rank} was told to fail")
    dist.barrier()  # never completes: the bad rank is gone


def _pp_both(rank, world_size, ids):
    return [P.pipeline_forward(rank, world_size, ids, 2),
            P.pipeline_forward_library(rank, world_size, ids, 2),
            P.pipeline_sweep(rank, world_size, ids, [1, 4], repeats=1)]


def test_launch_returns_each_rank_result_in_order():
    out = P.launch(P._identity, 2, threads=1)
    assert [r["rank"] for r in out] == [0, 1] and all(r["sum"] == 3.0 for r in out)
    assert all(r["threads"] == 1 for r in out) and out[0]["pid"] != out[1]["pid"]


def test_a_failing_rank_is_named_and_no_process_is_left(tmp_path):
    with pytest.raises(P.RankError, match="rank 1 failed") as info:
        P.launch(_record_pid_then_fail, 3, (tmp_path, 1), timeout=60, threads=1)
    assert info.value.rank == 1 and "told to fail" in str(info.value)
    pids = [int((tmp_path / f"{r}.pid").read_text()) for r in range(3)]
    assert all(_gone(pid) for pid in pids)  # ranks 0 and 2 were blocked in a barrier: killed


def test_timeout_names_the_ranks_and_kills_them():
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\]"):
        P.launch(P._sleep, 2, (60.0,), timeout=8, threads=1)
    import multiprocessing

    assert not multiprocessing.active_children()


def test_launch_validates_its_arguments():
    with pytest.raises(ValueError, match="module-level"):
        P.launch(lambda rank, world: rank, 2)
    with pytest.raises(ValueError, match="world_size"):
        P.launch(P._identity, 0)
    with pytest.raises(TypeError, match="args"):
        P.launch(P._sleep, 2, 1.0)


def test_head_shards_follow_the_query_groups():
    assert P.head_shards(6, 2, 0, 2) == (range(0, 3), range(0, 1))
    assert P.head_shards(6, 2, 1, 2) == (range(3, 6), range(1, 2))
    assert P.head_shards(8, 1, 3, 4) == (range(6, 8), range(0, 1))  # MQA: the KV head replicated
    with pytest.raises(ValueError, match="divide"):
        P.head_shards(6, 2, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        P.head_shards(6, 2, 2, 2)


def test_tensor_parallel_teacher_equals_one_process(ids, reference):
    manual, dtensor = P.launch(P.tensor_parallel_both, 2, (ids,), timeout=120, threads=1)[0]
    for out in (manual, dtensor):
        assert torch.allclose(out["logits"], reference, atol=1e-4), \
            (out["logits"] - reference).abs().max()
    cfg = CourseLlama.from_checkpoint(MODELS_DIR / "teacher").config
    # Megatron: two all-reduces of the hidden state per layer and token
    assert manual["allreduce_bytes"] == 2 * cfg.num_layers * ids.numel() * cfg.hidden_size * 4
    embedding = cfg.vocab_size * cfg.hidden_size * 4  # replicated (tied with lm_head)
    layers = manual["full_param_bytes"] - embedding
    assert manual["param_bytes"] < embedding + layers / 2 + layers * 0.01  # norms replicated
    assert dtensor["param_bytes"] == manual["param_bytes"]


def test_pipeline_parallel_teacher_equals_one_process(ids, reference):
    out = P.launch(_pp_both, 2, (ids,), timeout=120, threads=1)
    (hand0, _, sweep0), (hand1, library1, sweep1) = out
    assert sweep0 == sweep1 and sorted(sweep0) == [1, 4]  # every rank's events, gathered
    assert [len(sweep0[m][r]) for m in (1, 4) for r in (0, 1)] == [1, 1, 4, 4]
    assert torch.allclose(hand1["logits"], reference, atol=1e-5)
    assert torch.allclose(library1["logits"], reference, atol=1e-5)
    assert len(hand0["events"]) == len(hand1["events"]) == 2
    bubble = P.bubble_from_events([hand0["events"], hand1["events"]])
    assert 0 < bubble["bubble"] < 1
    # a stage cannot start a micro-batch before the previous stage has finished it
    assert hand1["events"][0][0] >= hand0["events"][0][1]


def test_stage_layers_and_measured_bubble_arithmetic():
    assert P.stage_layers(6, 4) == [range(0, 1), range(1, 3), range(3, 4), range(4, 6)]
    with pytest.raises(ValueError, match="num_stages"):
        P.stage_layers(2, 3)
    # two stages, two micro-batches of 1 s each, perfectly overlapped: GPipe's 1/3
    events = [[(0, 1), (1, 2)], [(1, 2), (2, 3)]]
    assert P.bubble_from_events(events)["bubble"] == pytest.approx(1 / 3)


def test_collective_times_cover_every_op():
    times = P.launch(P.collective_times, 2, ([1024, 65536], P.COLLECTIVES, 3, 1), timeout=60,
                     threads=1)
    assert times[0] == times[1]  # the slowest rank's median, agreed by all-reduce
    assert set(times[0]) == set(P.COLLECTIVES)
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in times[0].values())
