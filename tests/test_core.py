"""Unit tests of the shared utils: measurement, device handling, metrics, data, report."""

import json
import math
import subprocess
import sys

import pytest
import torch

from utils import bench, device, metrics, plots, report
from utils.data import load_corpus, sample_sentences
from utils.paths import REPO_ROOT


# --------------------------------------------------------------------------- bench

class FakeClock:
    """Advances by the next listed duration each time a call runs, so latencies are exact."""

    def __init__(self, durations):
        self.durations, self.now, self.i = list(durations), 0.0, 0

    def clock(self):
        return self.now

    def work(self):
        self.now += self.durations[self.i]
        self.i += 1


def test_latency_percentiles_nearest_rank_on_fake_clock():
    # 2 warm-up calls (slow), then 1..100 ms: p50 = 50 ms, p90 = 90 ms, p99 = 99 ms exactly
    fake = FakeClock([1.0, 0.5] + [i / 1000 for i in range(100, 0, -1)])
    result = bench.latency_percentiles(fake.work, n=100, warmup=2, clock=fake.clock)
    assert result["p50"] == pytest.approx(0.050)
    assert result["p90"] == pytest.approx(0.090)
    assert result["p99"] == pytest.approx(0.099)
    assert result["first"] == pytest.approx(1.0)
    assert result["mean"] == pytest.approx(0.0505)


def test_time_fn_measures_a_known_sleep():
    import time

    timing = bench.time_fn(lambda: time.sleep(0.01), warmup=1, min_run_time=0.1)
    assert 0.0099 < timing.median_s < 1.0  # a sleep can only run long (a busy machine)
    assert timing.runs >= 1 and timing.threads >= 1
    assert "median" in str(timing)


def test_compare_reports_speedup_relative_to_first():
    import time

    result = bench.compare({"slow": lambda: time.sleep(0.02), "fast": lambda: time.sleep(0.001)},
                           min_run_time=0.1, rounds=1, warmup=1)
    assert result["slow"]["speedup"] == 1.0
    assert result["fast"]["speedup"] > 1.5  # 20x by design: holds with 10 ms of scheduling noise


@pytest.mark.parametrize("call, message", [
    (lambda: bench.time_fn(42), "fn must be callable"),
    (lambda: bench.time_fn(lambda: None, min_run_time=0), "min_run_time"),
    (lambda: bench.time_fn(lambda: None, warmup=-1), "warmup"),
    (lambda: bench.latency_percentiles(lambda: None, n=0), "n must be"),
    (lambda: bench.latency_percentiles(lambda: None, percentiles=(0,)), "percentiles"),
    (lambda: bench.compare({}), "at least one"),
    (lambda: bench.tokens_per_second(10, 0), "seconds > 0"),
])
def test_bench_rejects_bad_input(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_tokens_per_second():
    assert bench.tokens_per_second(100, 0.5) == 200


def test_peak_memory_sees_a_large_allocation():
    n_bytes = 200 * 2**20
    peak = bench.peak_memory_bytes(lambda: torch.ones(n_bytes // 4).sum())
    assert 0.5 * n_bytes < peak < 3 * n_bytes


def test_machine_info_names_cpu_threads_and_versions():
    info = bench.machine_info()
    for key in ("cpu", "logical_cores", "torch_threads", "isa", "gpu", "torch", "transformers"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert "torch_threads" in bench.format_machine_info(info)


# --------------------------------------------------------------------------- device

def test_pick_device_matches_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.pick_device().type == expected
    assert device.pick_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="prefer"):
        device.pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_require_cuda_names_the_step_on_cpu():
    with pytest.raises(device.MissingGPUError, match="TensorRT engine build needs a CUDA GPU"):
        device.require_cuda("TensorRT engine build")
    with pytest.raises(device.MissingGPUError):
        device.pick_device("cuda")


def test_require_package_gives_the_install_command():
    assert device.require_package("math", "arithmetic") is math
    with pytest.raises(device.MissingPackageError, match="pip install no-such-pkg"):
        device.require_package("no_such_pkg_xyz", "this step", pip_name="no-such-pkg")


# --------------------------------------------------------------------------- metrics

class TableLM(torch.nn.Module):
    """A 'language model' whose next-token logits depend only on the current token."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = TableLM(torch.zeros(7, 7))
    ids = torch.randint(0, 7, (100,), generator=torch.Generator().manual_seed(0))
    assert metrics.perplexity(model, ids, context_length=10) == pytest.approx(7.0)


def test_perplexity_of_a_perfect_model_is_one():
    table = torch.full((5, 5), -1e4)
    for t in range(5):
        table[t, (t + 1) % 5] = 0.0
    ids = torch.arange(40) % 5
    assert metrics.perplexity(TableLM(table), ids, context_length=8) == pytest.approx(1.0)


def test_compare_next_token_identical_and_different_models():
    torch.manual_seed(0)
    a = TableLM(torch.randn(6, 6))
    ids = torch.randint(0, 6, (64,))
    same = metrics.compare_next_token(a, a, ids, context_length=8)
    assert same["top1_agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    b = TableLM(-a.table.detach().clone())
    diff = metrics.compare_next_token(a, b, ids, context_length=8)
    assert diff["top1_agreement"] < 0.5 and diff["kl"] > 0.1


def test_metrics_reject_bad_input():
    model = TableLM(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="1-D tensor"):
        metrics.perplexity(model, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least context_length"):
        metrics.perplexity(model, torch.zeros(5, dtype=torch.long), context_length=10)
    with pytest.raises(ValueError, match="same shape"):
        metrics.cosine_similarity(torch.ones(2, 3), torch.ones(3, 3))


def test_cosine_similarity():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0]])
    assert metrics.cosine_similarity(a, b).tolist() == pytest.approx([1.0, -1.0])


# --------------------------------------------------------------------------- plots, data, report

def test_plots_return_axes_and_reject_mismatched_series():
    fig, ax = plots.line_plot([1, 2], {"a": [1, 2]}, xlabel="x", ylabel="y")
    assert ax.get_xlabel() == "x"
    with pytest.raises(ValueError, match="has 1 points"):
        plots.line_plot([1, 2], {"a": [1]}, xlabel="x", ylabel="y")
    fig, ax = plots.roofline_plot(1e11, 1e10, {"gemv": (0.5, 4e9)})
    assert len(ax.get_lines()) >= 3
    import matplotlib.pyplot as plt

    plt.close("all")


def test_corpus_split_is_disjoint_and_covers_every_chapter():
    train, validation = load_corpus("train"), load_corpus("validation")
    train_chapters, val_chapters = set(train.split("\n\n")), set(validation.split("\n\n"))
    assert not train_chapters & val_chapters
    assert len(train_chapters) + len(val_chapters) == 1189  # chapters in the KJV
    assert 0.04 < len(validation) / (len(train) + len(validation)) < 0.07
    assert len(sample_sentences(5)) == 5
    with pytest.raises(ValueError, match="split must be one of"):
        load_corpus("test")


def test_report_cli_rejects_unknown_chapter():
    out = subprocess.run([sys.executable, "-m", "utils.report", "nonsense"], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown chapter 'nonsense'" in out.stderr
