"""Chapter 07's cost model (utils.cluster): the alpha-beta fit, ring collective bytes and times,
the pipeline bubble, the TP decode model against gpt-fast's published numbers, and memory plans
for Llama-2-7B / 70B."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from utils import cluster as C
from utils.llama import speed_model_config

GB = 1e9


# --------------------------------------------------------------------------- alpha-beta

def test_fit_alpha_beta_recovers_exact_and_noisy_parameters():
    sizes = np.array([1e3, 1e4, 1e5, 1e6, 1e7])
    alpha, beta = 20e-6, 5e9
    fitted_alpha, fitted_beta = C.fit_alpha_beta(sizes, alpha + sizes / beta)
    assert fitted_alpha == pytest.approx(alpha, rel=1e-9)
    assert fitted_beta == pytest.approx(beta, rel=1e-9)

    rng = np.random.default_rng(0)
    sizes = np.geomspace(1e3, 1e7, 20)
    noisy = (alpha + sizes / beta) * (1 + 0.01 * rng.standard_normal(sizes.size))
    fitted_alpha, fitted_beta = C.fit_alpha_beta(sizes, noisy)
    assert fitted_beta == pytest.approx(beta, rel=0.02)
    assert fitted_alpha == pytest.approx(alpha, abs=5e-6)
    assert C.p2p_time(1e6, alpha, beta) == pytest.approx(alpha + 1e6 / beta)


def test_fit_alpha_beta_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        C.fit_alpha_beta([1e3], [1e-5])
    with pytest.raises(ValueError, match="same length"):
        C.fit_alpha_beta([1e3, 1e4], [1e-5])
    with pytest.raises(ValueError, match="slope"):
        C.fit_alpha_beta([1e3, 1e4, 1e5], [3e-5, 2e-5, 1e-5])
    with pytest.raises(ValueError, match="beta"):
        C.p2p_time(10, 1e-6, 0)


# --------------------------------------------------------------------------- ring collectives

@pytest.mark.parametrize("p, allreduce, gather", [(1, 0, 0), (2, 1000, 500), (4, 1500, 750)])
def test_ring_bytes_by_hand(p, allreduce, gather):
    n = 1000
    assert C.ring_allreduce_bytes(n, p) == pytest.approx(allreduce)  # 2 (p-1)/p n
    assert C.ring_allgather_bytes(n, p) == pytest.approx(gather)  # (p-1)/p n
    assert C.ring_reduce_scatter_bytes(n, p) == pytest.approx(gather)


def test_collective_times_by_hand_and_monotone():
    alpha, beta = 1e-5, 1e9
    assert C.allreduce_time(1e6, 1, alpha, beta) == 0
    assert C.allgather_time(1e6, 1, alpha, beta) == 0
    # p = 4: 6 alpha + 1.5 n / beta; all-gather 3 alpha + 0.75 n / beta.
    assert C.allreduce_time(1e6, 4, alpha, beta) == pytest.approx(6e-5 + 1.5e-3)
    assert C.allgather_time(1e6, 4, alpha, beta) == pytest.approx(3e-5 + 0.75e-3)
    assert C.reduce_scatter_time(1e6, 4, alpha, beta) == pytest.approx(3e-5 + 0.75e-3)
    by_size = [C.allreduce_time(n, 4, alpha, beta) for n in (1e3, 1e5, 1e7)]
    by_ranks = [C.allreduce_time(1e6, p, alpha, beta) for p in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(by_size, by_size[1:]))
    assert all(a < b for a, b in zip(by_ranks, by_ranks[1:]))
    with pytest.raises(ValueError, match="p must be a positive integer"):
        C.allreduce_time(1e6, 0, alpha, beta)
    with pytest.raises(ValueError, match="nbytes"):
        C.ring_allgather_bytes(-1, 2)


# --------------------------------------------------------------------------- pipeline

def test_bubble_fraction_examples():
    assert C.bubble_fraction(2, 1) == pytest.approx(0.5)
    assert C.bubble_fraction(4, 12) == pytest.approx(0.2)
    assert C.bubble_fraction(1, 5) == 0
    with pytest.raises(ValueError, match="microbatches"):
        C.bubble_fraction(4, 0)


def test_pp_latency_does_not_fall_and_throughput_rises_up_to_k_fold():
    kwargs = dict(link_alpha_s=5e-6, link_bytes_per_s=300e9)
    weights, hbm, hidden = 13.48e9, 2039e9, 4096
    one = C.pp_decode_time(weights, 1, hbm, hidden, **kwargs)
    four = C.pp_decode_time(weights, 4, hbm, hidden, **kwargs)
    assert one == pytest.approx(weights / hbm)
    assert four == pytest.approx(one + 3 * (5e-6 + hidden * 2 / 300e9))
    rates = [C.pp_throughput(weights, 4, hbm, hidden, in_flight=m, **kwargs) for m in (1, 2, 4, 8)]
    assert rates[1] == pytest.approx(2 * rates[0]) and rates[2] == pytest.approx(4 * rates[0])
    assert rates[3] == pytest.approx(rates[2])
    with pytest.raises(ValueError, match="in_flight"):
        C.pp_throughput(weights, 4, hbm, hidden, in_flight=0, **kwargs)


# --------------------------------------------------------------------------- tensor parallelism

def test_tp_bytes_per_token():
    payload = C.tp_allreduce_bytes_per_token(32, 4096, 2)
    assert payload == 2 * 32 * 4096 * 2  # 512 KiB per token for Llama-2-7B in fp16
    assert C.tp_bytes_sent_per_rank_per_token(32, 4096, 4, 2) == pytest.approx(1.5 * payload)
    assert C.tp_bytes_sent_per_rank_per_token(32, 4096, 1, 2) == 0


def test_tp_decode_time_one_gpu_is_the_hbm_read():
    t = C.tp_decode_time(13.48e9, 1, 2039e9, 32, 4096, link_alpha_s=1e-5, link_bytes_per_s=3e11,
                         efficiency=0.5, allreduce_overhead_s=1e-5)
    assert t == pytest.approx(13.48e9 / (2039e9 * 0.5))
    with pytest.raises(ValueError, match="efficiency"):
        C.tp_decode_time(1e9, 2, 1e12, 32, 4096, link_alpha_s=0, link_bytes_per_s=1e11,
                         efficiency=1.5)
    with pytest.raises(ValueError, match="n_gpus"):
        C.tp_decode_time(1e9, 0, 1e12, 32, 4096, link_alpha_s=0, link_bytes_per_s=1e11)


def test_fitted_tp_model_reproduces_gpt_fast_within_15_percent():
    fit = C.fit_tp_model()
    assert 0.5 < fit["efficiency"] < 0.9  # power-limited A100: ~1.4 of 2.04 TB/s
    assert fit["link_alpha_s"] >= 0 and 1e-6 < fit["allreduce_overhead_s"] < 1e-4
    for n, published in C.GPT_FAST_LLAMA2_7B_TP.items():
        assert fit["predicted"][n] == pytest.approx(published, rel=0.15), n
    # The plain ring model (latency grows as n - 1) cannot follow the published curve as well.
    ring_only = C.fit_tp_model(fit_overhead=False)
    assert max(map(abs, ring_only["relative_error"].values())) \
        > max(map(abs, fit["relative_error"].values()))
    rows = C.published_tp_table()
    assert [row["gpus"] for row in rows] == [1, 2, 4, 8]
    for row in rows:
        assert row["published tok/s"] < row["bound tok/s (HBM only)"]
    assert rows[0]["bound tok/s (HBM only)"] == pytest.approx(2039e9 / 13.48e9, abs=0.1)


def test_fit_tp_model_rejects_bad_tables():
    with pytest.raises(ValueError, match="published"):
        C.fit_tp_model({2: 100.0, 4: 150.0})
    with pytest.raises(ValueError, match="published"):
        C.fit_tp_model({1: 100.0, 2: 150.0})  # one n > 1 cannot fit two latencies
    with pytest.raises(ValueError, match="HBM bound"):
        C.fit_tp_model({1: 1000.0, 2: 1500.0, 4: 2000.0})


# --------------------------------------------------------------------------- memory planning

def test_parameter_counts_match_llama2():
    assert C.parameter_count(C.LLAMA2_7B_CONFIG) == pytest.approx(C.LLAMA2_7B_PARAMS, rel=1e-3)
    assert C.parameter_count(C.LLAMA2_70B_CONFIG) == pytest.approx(C.LLAMA2_70B_PARAMS, rel=1e-3)


def test_llama2_7b_weights_and_kv_cache():
    one = C.memory_per_rank(C.LLAMA2_7B_CONFIG, tp=1)
    two = C.memory_per_rank(C.LLAMA2_7B_CONFIG, tp=2)
    assert one["weights"] == pytest.approx(6.74e9 * 2, rel=0.01)  # ~13.5 GB
    assert two["weights"] == pytest.approx(one["weights"] / 2, rel=0.01)
    assert one["total"] == one["weights"] + one["kv_cache"] + one["activations"]
    kv = C.memory_per_rank(C.LLAMA2_7B_CONFIG, batch=1, seq_len=4096, kv_bytes=2)["kv_cache"]
    assert kv == 2 * 32 * 32 * 128 * 4096 * 2 == 2 * 2 ** 30
    # Pipeline stages hold their layers' share of the KV cache.
    assert C.memory_per_rank(C.LLAMA2_7B_CONFIG, pp=4, seq_len=4096)["kv_cache"] == kv / 4


def test_llama2_70b_kv_heads_per_rank_and_replication():
    eight = C.memory_per_rank(C.LLAMA2_70B_CONFIG, tp=8)
    sixteen = C.memory_per_rank(C.LLAMA2_70B_CONFIG, tp=16)
    assert eight["plan"]["kv_heads_per_rank"] == 1
    assert sixteen["plan"]["kv_heads_per_rank"] == 1  # 8 KV heads over 16 ranks: replicated
    assert sixteen["kv_cache"] == eight["kv_cache"] == 2 * 80 * 1 * 128 * 2048 * 2
    assert sixteen["weights"] < eight["weights"]  # q/o and MLP still split


def test_pipeline_reports_the_largest_stage():
    mem = C.memory_per_rank(C.LLAMA2_70B_CONFIG, pp=3)
    assert mem["plan"]["layers_per_stage"] == [27, 27, 26]
    assert mem["plan"]["stage"] in (0, 2)  # an end stage: embedding or lm_head on top of layers
    assert mem["weights"] > C.LLAMA2_70B_PARAMS * 2 / 3


def test_configs_of_every_kind_give_the_same_plan():
    namespace = SimpleNamespace(**C.LLAMA2_7B_CONFIG)  # duck-types a transformers config
    assert C.memory_per_rank(namespace, tp=4) == C.memory_per_rank(C.LLAMA2_7B_CONFIG, tp=4)
    course = speed_model_config()  # a course LlamaConfig: tied lm_head
    as_dict = {"num_hidden_layers": course.num_layers, "hidden_size": course.hidden_size,
               "num_attention_heads": course.num_heads,
               "num_key_value_heads": course.num_kv_heads,
               "intermediate_size": course.intermediate_size, "vocab_size": course.vocab_size,
               "tie_word_embeddings": True}
    assert C.memory_per_rank(course, tp=2) == C.memory_per_rank(as_dict, tp=2)
    with pytest.raises(TypeError, match="config"):
        C.memory_per_rank(42)


def test_memory_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="tp must divide num_attention_heads"):
        C.memory_per_rank(C.LLAMA2_7B_CONFIG, tp=3)
    with pytest.raises(ValueError, match="tp must divide num_key_value_heads"):
        C.memory_per_rank({**C.LLAMA2_7B_CONFIG, "num_attention_heads": 24,
                           "num_key_value_heads": 8}, tp=6)  # 6 ranks cannot share 8 KV heads
    with pytest.raises(ValueError, match="pp must be at most"):
        C.memory_per_rank(C.LLAMA2_7B_CONFIG, pp=33)
    with pytest.raises(ValueError, match="seq_len"):
        C.memory_per_rank(C.LLAMA2_7B_CONFIG, seq_len=0)
    with pytest.raises(ValueError, match="device_bytes"):
        C.fits(C.LLAMA2_7B_CONFIG, -1)


def test_fits_and_smallest_plan():
    assert C.fits(C.LLAMA2_7B_CONFIG, 80 * GB)
    assert not C.fits(C.LLAMA2_70B_CONFIG, 80 * GB)  # 138 GB of fp16 weights
    plan = C.smallest_plan(C.LLAMA2_70B_CONFIG, 80 * GB)
    assert plan["devices"] > 1 and plan["tp"] * plan["pp"] == plan["devices"]
    assert plan["pp"] == 1  # TP within the node comes first
    assert plan["memory"]["total"] <= 80 * GB
    assert C.smallest_plan(C.LLAMA2_7B_CONFIG, 80 * GB)["devices"] == 1
    assert C.smallest_plan(C.LLAMA2_70B_CONFIG, 10 * GB, n_devices_max=4) is None
    with pytest.raises(TypeError, match="tp"):
        C.smallest_plan(C.LLAMA2_7B_CONFIG, 80 * GB, tp=2)
