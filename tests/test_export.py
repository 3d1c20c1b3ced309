"""Chapter 08: exports match PyTorch in ONNX Runtime and OpenVINO, the fusions and quantizers do
what the chapter says, the decoder with past generates PyTorch's greedy tokens, and the GPU-only
TensorRT path refuses clearly on a CPU."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from utils import export as E
from utils.data import sample_sentences
from utils.device import MissingGPUError, has_cuda
from utils.metrics import cosine_similarity
from utils.models import load_course_model, load_minilm

TOL = 1e-4
SIGNATURE = {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "sequence")}


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory):
    model, tokenizer = load_minilm()
    batch = tokenizer(sample_sentences(12), padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    work = tmp_path_factory.mktemp("export08")
    path = E.export_onnx(E.EncoderHidden(model), (feeds["input_ids"][:4],
                                                  feeds["attention_mask"][:4]),
                         work / "minilm.onnx", SIGNATURE, ["last_hidden_state"])
    with torch.no_grad():
        reference = E.EncoderHidden(model)(**feeds).numpy()
    return model, feeds, reference, path, work


def test_dynamic_axes_and_export_dims_share_one_symbol_per_name():
    axes = E.dynamic_axes({"ids": ("batch", "sequence"), "past": (None, "batch", None, "past")})
    assert axes == {"ids": {0: "batch", 1: "sequence"}, "past": {1: "batch", 3: "past"}}
    dims = E.export_dims(SIGNATURE)
    assert dims["input_ids"][0] is dims["attention_mask"][0]
    with pytest.raises(ValueError, match="signature"):
        E.dynamic_axes({})
    with pytest.raises(ValueError, match=r"signature\['ids'\]"):
        E.dynamic_axes({"ids": "batch"})


def test_provider_order_puts_accelerators_before_the_cpu():
    cpu, cuda, trt = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    assert E.provider_order([cpu, cuda]) == [cuda, cpu]
    assert E.provider_order([cpu, cuda, trt]) == [trt, cuda, cpu]
    assert E.provider_order()[0] in ort.get_available_providers()


def test_qdq_roundtrip_matches_onnx_runtime():
    """The formula against ORT running a real QuantizeLinear -> DequantizeLinear graph."""
    scale, zero_point = 0.05, 3
    x = np.array([-9.0, -1.0, 0.025, 0.075, 0.125, 0.3, 6.2, 10.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [len(x)]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
         helper.make_tensor("z", TensorProto.INT8, [], [zero_point])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    q_ort, y_ort = ort.InferenceSession(model.SerializeToString(),
                                        providers=["CPUExecutionProvider"]).run(None, {"x": x})
    q, x_hat = E.qdq_roundtrip(x, scale, zero_point)
    assert q.tolist() == q_ort.astype(int).tolist()
    assert np.allclose(x_hat.numpy(), y_ort, atol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        E.qdq_roundtrip(x, 0.0, 0)
    with pytest.raises(ValueError, match="zero_point"):
        E.qdq_roundtrip(x, 0.1, 200)


def test_minilm_export_matches_pytorch_in_ort_and_openvino_at_new_shapes(minilm_export):
    model, feeds, reference, path, _ = minilm_export
    summary = E.graph_summary(path)
    assert summary["checker"] and summary["inputs"]["input_ids"] == ["batch", "sequence"]
    got = E.ort_run(E.ort_session(path, providers=["CPUExecutionProvider"]), feeds)[0]
    assert got.shape == reference.shape  # batch 12 although traced at batch 4
    assert np.abs(got - reference).max() < TOL
    compiled = E.openvino_compile(E.openvino_convert(path))
    assert np.abs(compiled(list(feeds.values()))[0] - reference).max() < TOL


def test_transformer_fusions_give_one_attention_node_per_layer(minilm_export):
    model, feeds, reference, path, work = minilm_export
    fused, counts = E.fuse_for_ort(path, work / "fused.onnx")
    ops = E.op_counts(fused)
    layers = model.config.num_hidden_layers
    assert ops["Attention"] == layers and ops["SkipLayerNormalization"] == 2 * layers
    assert sum(ops.values()) < sum(E.op_counts(path).values()) / 2
    got = E.ort_run(E.ort_session(fused, providers=["CPUExecutionProvider"]), feeds)[0]
    assert np.abs(got - reference).max() < TOL
    levels = {lv: sum(E.optimized_node_counts(path, lv, work).values()) for lv in E.OPT_LEVELS}
    assert levels["extended"] < levels["disabled"]


def test_ort_int8_quantizers_shrink_the_graph_and_keep_embeddings(minilm_export):
    model, feeds, reference, path, work = minilm_export
    mask = feeds["attention_mask"].unsqueeze(-1).float()

    def cosine(file):
        h = torch.as_tensor(E.ort_run(E.ort_session(file, providers=["CPUExecutionProvider"]),
                                      feeds)[0])
        a, b = ((t * mask).sum(1) / mask.sum(1) for t in (h, torch.as_tensor(reference)))
        return cosine_similarity(a, b).mean().item()

    dynamic = E.quantize_ort_dynamic(path, work / "dyn.onnx")
    assert E.file_mb(dynamic) < 0.7 * E.file_mb(path)
    assert E.op_counts(dynamic)["MatMulInteger"] > 0 and cosine(dynamic) > 0.98
    matmuls = E.matmul_nodes(path)
    keep = [n for n, w in matmuls.items()
            if w is None or w == (model.config.intermediate_size, model.config.hidden_size)]
    calibration = [{k: v[i:i + 4] for k, v in feeds.items()} for i in (0, 4)]
    static = E.quantize_ort_static(path, work / "qdq.onnx", calibration, exclude=keep)
    pairs = E.qdq_pairs(static)
    assert pairs["QuantizeLinear"] > 0 and pairs["first_scale"] > 0
    assert cosine(static) > 0.97
    with pytest.raises(ValueError, match="calibration_feeds"):
        E.quantize_ort_static(path, work / "none.onnx", [])


def test_decoder_with_past_in_ort_generates_pytorchs_greedy_tokens(tmp_path):
    model, tokenizer = load_course_model("small")
    cfg = model.config
    decoder = E.DecoderWithPast(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    past = [torch.randn(E.cache_shape(cfg, 2, 3)) for _ in range(2)]
    signature = {"input_ids": ("batch", "sequence"),
                 "past_keys": (None, "batch", None, "past", None),
                 "past_values": (None, "batch", None, "past", None)}
    path = E.export_onnx(decoder, (ids, *past), tmp_path / "decoder.onnx", signature,
                         ["logits", "present_keys", "present_values"])
    prompt = tokenizer("And the king said", return_tensors="pt")["input_ids"]
    expected = E.torch_greedy(model, prompt, 20)
    session = E.ort_session(path, providers=["CPUExecutionProvider"])
    assert E.greedy_decode(E.ort_step(session), prompt, 20, cfg) == expected
    assert E.greedy_decode(E.torch_step(decoder), prompt, 20, cfg) == expected
    with pytest.raises(ValueError, match="prompt_ids"):
        E.greedy_decode(E.ort_step(session), prompt[0], 4, cfg)
    with pytest.raises(ValueError, match="max_new_tokens"):
        E.greedy_decode(E.ort_step(session), prompt, 0, cfg)


def test_openvino_int4_group_size_must_divide_the_widths_and_int8_keeps_quality(tmp_path):
    model, _ = load_course_model("small")
    ids = torch.randint(0, model.config.vocab_size, (2, 32),
                        generator=torch.Generator().manual_seed(0))
    path = E.export_onnx(E.LogitsOnly(model), (ids,), tmp_path / "small.onnx",
                         {"input_ids": ("batch", "sequence")}, ["logits"])
    widths = set(E.linear_widths(E.openvino_convert(path)))
    assert widths == {model.config.hidden_size, model.config.intermediate_size}
    with pytest.raises(ValueError, match="group_size must divide"):
        E.openvino_compress(E.openvino_convert(path), "int4", group_size=100)
    with torch.no_grad():
        top1 = model(ids).logits.argmax(-1)
    fp32_mb = E.openvino_save(E.openvino_convert(path), tmp_path / "f32.xml")
    for mode, group, min_agree in [("int8", None, 0.95), ("int4", 64, 0.8)]:
        compressed = E.openvino_compress(E.openvino_convert(path), mode, group_size=group)
        assert E.openvino_save(compressed, tmp_path / f"{mode}.xml") < 0.4 * fp32_mb
        logits = torch.from_numpy(E.openvino_compile(compressed)([ids.numpy()])[0])
        assert (logits.argmax(-1) == top1).float().mean().item() > min_agree


def test_choose_engine_takes_the_fastest_row_within_the_constraints():
    rows = [{"engine": "a", "latency_ms": 5.0, "quality": 0.90, "size_mb": 50, "runs_on": ["cpu"]},
            {"engine": "b", "latency_ms": 3.0, "quality": 0.80, "size_mb": 10, "runs_on": ["cpu"]},
            {"engine": "c", "latency_ms": 1.0, "quality": 0.95, "size_mb": 90, "runs_on": ["gpu"]}]
    assert E.choose_engine(rows)["engine"] == "c"
    assert E.choose_engine(rows, needs={"cpu"})["engine"] == "b"
    assert E.choose_engine(rows, needs={"cpu"}, min_quality=0.85)["engine"] == "a"
    assert E.choose_engine(rows, max_size_mb=5) is None
    with pytest.raises(TypeError, match="rows"):
        E.choose_engine({"engine": "a"})


@pytest.mark.skipif(has_cuda(), reason="checks the CPU-only refusal")
def test_tensorrt_refuses_clearly_without_a_gpu(tmp_path):
    assert not E.tensorrt_ready() and "no CUDA GPU" in E.tensorrt_status()
    with pytest.raises(MissingGPUError, match="TensorRT"):
        E.build_tensorrt_engine(tmp_path / "x.onnx", "fp16", {})
    plan = E.tensorrt_plan("m.onnx", "int8", {"input_ids": ((1, 8), (4, 64), (8, 128))})
    assert any("build_serialized_network" in s for s in plan)
    assert any("BuilderFlag.INT8" in s for s in plan)
    with pytest.raises(ValueError, match="precision"):
        E.tensorrt_plan("m.onnx", "int4", {})


def test_teacher_onnx_without_the_cache_object():
    """The fix the chapter teaches: the raw model does not export, the wrapper does."""
    model, _ = load_course_model("small")
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with pytest.raises(Exception, match="DynamicCache"):
        torch.export.export(model, (ids,))
    program = E.export_program(E.LogitsOnly(model), (ids,), {"input_ids": ("batch", "sequence")})
    other = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        assert torch.allclose(program.module()(other), model(other).logits, atol=TOL)
