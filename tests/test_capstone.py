"""Chapter 10: the capstone's pipeline (stage chains, restartable builds), its decision logic on
fixed rows, and the committed run's consistency with that logic."""

import math

import pytest
import torch

from utils import capstone as C


def rows():
    r = lambda name, ppl, ms, tps, mb, **k: {"variant": name, "perplexity": ppl,  # noqa: E731
                                              "decode_ms": ms, "tokens_per_s": tps,
                                              "size_mb": mb, **k}
    return [r("teacher", 10.0, 8.0, 500.0, 40.0), r("int8", 10.05, 7.0, 450.0, 15.0),
            r("prune", 13.0, 5.0, 700.0, 28.0), r("prune -> heal", 10.4, 5.0, 700.0, 28.0),
            r("slow", 10.5, 9.0, 300.0, 50.0), r("int4 -> prune", 9.0, 1.0, 9999.0, 1.0,
                                                  ablation=True)]


def test_chains_are_checked():
    assert C.check_chain(["prune", "heal", "int8"]) == ("prune", "heal", "int8")
    assert C.check_chain(("int4", "prune")) == ("int4", "prune")
    for bad, match in [(["heal"], "heal must come after prune"), (["int8", "int4"], "one quant"),
                       (["int8", "heal"], "heal must"), (["int4", "lowrank"], "only prune"),
                       (["distil"], "unknown stage")]:
        with pytest.raises(ValueError, match=match):
            C.check_chain(bad)


def test_choice_follows_the_brief_and_skips_ablations():
    assert C.choose(rows(), "latency")["variant"] == "prune -> heal"      # 1.04 <= 1.05, 5 ms
    assert C.choose(rows(), "throughput")["variant"] == "prune -> heal"
    strict = C.Brief("strict", "", 1.01, 1, "decode_ms")
    assert C.choose(rows(), strict)["variant"] == "int8"                  # 1.005: within 1%
    assert C.choose(rows(), C.Brief("none", "", 0.5, 1, "decode_ms")) is None
    with pytest.raises(ValueError, match="teacher"):
        C.choose(rows()[1:], "latency")


def test_pareto_front_is_the_non_dominated_set():
    assert C.pareto_front(rows()) == ["teacher", "int8", "prune -> heal"]
    assert C.pareto_front(rows(), cost_key="size_mb") == ["teacher", "int8"]


def test_decision_table_verdicts_come_from_the_rows():
    r = rows() + [{"variant": "int4", "perplexity": 10.1, "decode_ms": 8.2, "tokens_per_s": 1.0,
                   "size_mb": 12.0},
                  {"variant": "lowrank", "perplexity": 11.0, "decode_ms": None,
                   "tokens_per_s": None, "size_mb": 30.0}]
    table = {t["technique"]: t for t in C.decision_table(r)}
    assert table["int8"]["verdict here"] == "pays here"
    assert table["int4"]["verdict here"].startswith("smaller (0.30x) but not faster")
    assert table["lowrank"]["verdict here"].startswith("costs 10% perplexity")
    assert table["heal"]["verdict here"].startswith("recovers 20%")
    assert "gpt-fast" in table["int8"]["on a GPU (published)"]


def test_a_build_is_restartable_and_measured(tmp_path):
    ctx = C.load_context(heal_steps=1, max_tokens=256)
    first = C.build(("int4", "prune"), ctx, tmp_path, progress=False)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["int4rounded.pt", "int4rounded_prune.pt"]
    again = C.build(("int4", "prune"), ctx, tmp_path, progress=False)  # loaded, not rebuilt
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                   again.state_dict().values()))
    assert first.config.intermediate_size == ctx.teacher.config.intermediate_size // 2
    measured = C.measure([(), ("int8",)], ctx, None, min_run_time=0.05, progress=False)
    teacher, int8 = measured
    assert teacher["perplexity_ratio"] == 1.0 and int8["size_mb"] < teacher["size_mb"] / 2
    assert abs(int8["perplexity_ratio"] - 1) < 0.02 and int8["top1_agreement"] > 0.9
    assert all(math.isfinite(r["decode_ms"]) and r["tokens_per_s"] > 0 for r in measured)


def test_the_committed_run_agrees_with_the_decision_logic():
    result = C.load_results()
    names = {r["variant"] for r in result["rows"]}
    assert names == {C.variant_name(c) for c in C.VARIANTS}
    for brief, chosen in result["chosen"].items():
        row = C.choose(result["rows"], brief)
        assert row["variant"] == chosen and row["perplexity_ratio"] <= 1.05
    assert "chosen:" in C.report_card(result)
    served = result["deployment"]
    assert served["variant"] == result["chosen"][result["brief"]]
    assert all(r["same tokens"] in (None, True) for r in served["rows"])
    assert all(r["prefill_ms"] > 0 for r in result["rows"] if r["decode_ms"] is not None)
    ablation = C.ordering_ablation(result["rows"])
    assert ablation["difference"] != 0


def test_the_command_rejects_an_unknown_brief():
    with pytest.raises(SystemExit):
        C.main(["build", "--brief", "fastest"])
    with pytest.raises(ValueError, match="brief must be one of"):
        C.run_build("fastest")


def test_the_choice_is_served_by_an_engine_with_the_same_tokens():
    """deployment on the small course model: ONNX Runtime's export gives the eager tokens and
    is timed beside it; a quantized variant gets a reason instead of an export."""
    from utils.models import encode_split, load_course_model

    small, tok = load_course_model("small")
    ctx = C.Context(small, tok, None, encode_split("validation", tok)[:1024], None, 0, 256)
    served = C.deployment((), ctx, None, engines=("onnxruntime",), min_run_time=0.05,
                          new_tokens=4)
    ort = {r["engine"]: r for r in served["rows"]}["teacher, ONNX Runtime"]
    assert ort["same tokens"] is True and ort["prefill_ms"] > 0 and ort["decode_ms"] > 0
    int8 = C.deployment(("int8",), ctx, None, engines=("onnxruntime",), min_run_time=0.05)
    assert [r["engine"] for r in int8["rows"]] == ["teacher, eager", "int8, eager",
                                                   "int8, ONNX Runtime"]
    assert int8["rows"][-1]["note"].startswith("not served") and "decode_ms" not in int8["rows"][-1]
    with pytest.raises(ValueError, match="unknown engine"):
        C.deployment((), ctx, None, engines=("tensorrt",))
