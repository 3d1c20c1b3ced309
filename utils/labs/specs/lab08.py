"""Grading spec of lab 08, export and inference engines (chapter 08): the order of ONNX Runtime's
execution providers, counting a graph's nodes, choosing an engine from measurements, one
QuantizeLinear -> DequantizeLinear pair, the dynamic axes of an export, and what TensorRT's INT8
flag does alone. Pure functions: nothing here starts a process, writes a file or loads a model.

Expected values come from ``utils.export`` (imported inside functions). Two adapters run in the
sandbox (and in ``check``): ``with_onnx_model`` builds a small ``onnx.ModelProto`` from a plain
list of operator types, and ``with_signature`` passes the signature with tuples (as a chapter
signature is written) and tags the axis indices of the answer with their type, since JSON (and so
the grader's plain values) cannot keep int keys.
"""

from __future__ import annotations

import random

from utils.labs.spec import (Case, Exercise, LabSpec, _compare_raises, _show, array_close,
                             call_with_tensors, choice, exact, one_of, tensor_arg)

TENSORS = "utils.labs.spec:call_with_tensors"
MODEL = "utils.labs.specs.lab08:with_onnx_model"
SIGNATURE = "utils.labs.specs.lab08:with_signature"

TRT, CUDA, ROCM, DML, COREML, OPENVINO, CPU = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
    "DmlExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider",
    "CPUExecutionProvider")
# real providers that utils.export.PROVIDER_PRIORITY does not rank
UNRANKED = ("AzureExecutionProvider", "XnnpackExecutionProvider", "QNNExecutionProvider",
            "VitisAIExecutionProvider")


# --------------------------------------------------------------------------- 1: provider order

def _providers_ref(available):
    from utils.export import provider_order

    return provider_order(list(available))


def _hidden_providers(rng):
    known = [TRT, CUDA, ROCM, DML, COREML, OPENVINO]
    cases = [Case(([CPU, ROCM],), label="ROCm and CPU, CPU listed first"),
             Case(([CUDA, CPU, TRT],), label="TensorRT, CUDA and CPU, shuffled"),
             Case(([CPU, OPENVINO, DML],), label="OpenVINO, DirectML and CPU"),
             Case(([],), label="no provider at all"),
             Case(([CPU, "XnnpackExecutionProvider", CUDA],), label="one unranked provider"),
             Case(([UNRANKED[2], CPU, UNRANKED[0]],),
                  label="two unranked providers keep their given order")]
    for _ in range(3):
        chosen = rng.sample(known, rng.randint(1, 3)) + [CPU] + rng.sample(UNRANKED, 1)
        rng.shuffle(chosen)
        cases.append(Case((chosen,)))
    return cases


# --------------------------------------------------------------------------- 2: count nodes

def _onnx_model(nodes):
    """A chain of nodes ``t0 -> node 0 -> t1 -> ...``: each entry an op type (default domain)
    or ``[op type, domain]``. Only the graph's structure matters here (no weights, not checked)."""
    from onnx import TensorProto, helper

    made, domains = [], set()
    for i, node in enumerate(nodes):
        op, domain = (node, "") if isinstance(node, str) else (node[0], node[1])
        domains.add(domain)
        made.append(helper.make_node(op, [f"t{i}"], [f"t{i + 1}"], name=f"node_{op}_{i}",
                                     domain=domain))
    graph = helper.make_graph(
        made, "lab08", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info(f"t{len(made)}", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid(d, 1)
                                              for d in sorted(domains - {""})]
    return helper.make_model(graph, opset_imports=opsets)


def with_onnx_model(fn, nodes, op_type):
    """Adapter (runs in the sandbox and in ``check``): ``fn(model, op_type)`` with the
    ``onnx.ModelProto`` that ``nodes`` describes."""
    return fn(_onnx_model(nodes), op_type)


def _count_ref(nodes, op_type):
    from utils.export import op_counts

    return op_counts(_onnx_model(nodes))[op_type]


MS = "com.microsoft"
BLOCK = ["LayerNormalization", "MatMul", "Add", "Reshape", "Transpose", "MatMul", "Mul",
         "Softmax", "MatMul", "Transpose", "Reshape", "MatMul", "Add", "Add",
         "LayerNormalization", "MatMul", "Add", "Gelu", "MatMul", "Add", "Add"]
DYNAMIC_INT8 = ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Add",
                ["DynamicQuantizeMatMul", MS], "MatMul", "Softmax", ["DynamicQuantizeMatMul", MS]]
STATIC_QDQ = ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "Add",
              "QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]
FUSED = [["SkipLayerNormalization", MS], ["Attention", MS], "MatMul",
         ["SkipLayerNormalization", MS], ["BiasGelu", MS], "MatMul", "Add"]


def _hidden_count(rng):
    ops = ["MatMul", "Add", "Mul", "Softmax", "Gelu", "Reshape", "Transpose", "Cast"]
    cases = [Case((BLOCK, "LayerNormalization"), label="a transformer block: LayerNormalization"),
             Case((FUSED, "LayerNormalization"), label="fused away: no LayerNormalization left"),
             Case((DYNAMIC_INT8, "MatMul"),
                  label="dynamic int8: MatMulInteger and DynamicQuantizeMatMul are not MatMul"),
             Case((STATIC_QDQ, "DequantizeLinear"), label="Q/DQ int8: DequantizeLinear"),
             Case((FUSED, "SkipLayerNormalization"),
                  label="after ORT's fusions (com.microsoft nodes)"),
             Case(([], "MatMul"), label="an empty graph")]
    for _ in range(3):
        nodes = [rng.choice(ops) for _ in range(rng.randint(5, 40))]
        cases.append(Case((nodes, rng.choice(ops)), label=f"{len(nodes)} random nodes"))
    return cases


# --------------------------------------------------------------------------- 3: choose engine

X86, ARM, GPU = "x86 CPU", "ARM CPU", "NVIDIA GPU"
MEASURED = [  # latency of one forward pass (ms), quality: accuracy (higher is better), size (MB)
    {"engine": "PyTorch eager", "latency_ms": 41.0, "quality": 0.912, "size_mb": 88.0,
     "runs_on": [X86, ARM, GPU]},
    {"engine": "ONNX Runtime", "latency_ms": 24.0, "quality": 0.912, "size_mb": 87.0,
     "runs_on": [X86, ARM, GPU]},
    {"engine": "ONNX Runtime int8", "latency_ms": 15.0, "quality": 0.897, "size_mb": 23.0,
     "runs_on": [X86, ARM]},
    {"engine": "OpenVINO", "latency_ms": 19.0, "quality": 0.912, "size_mb": 87.0,
     "runs_on": [X86]},
    {"engine": "OpenVINO int4", "latency_ms": 12.0, "quality": 0.874, "size_mb": 14.0,
     "runs_on": [X86]},
    {"engine": "TensorRT fp16", "latency_ms": 2.1, "quality": 0.911, "size_mb": 45.0,
     "runs_on": [GPU]},
    {"engine": "TensorRT int8", "latency_ms": 1.4, "quality": 0.903, "size_mb": 24.0,
     "runs_on": [GPU]},
]


def _choose_ref(rows, max_latency_ms, min_quality, needs):
    from utils.export import choose_engine

    row = choose_engine(rows, max_latency_ms=max_latency_ms, min_quality=min_quality,
                        needs=set(needs))
    return None if row is None else row["engine"]


def _random_rows(rng, n):
    return [{"engine": f"engine {i}", "latency_ms": round(rng.uniform(1, 60), 1),
             "quality": round(rng.uniform(0.8, 0.95), 3), "size_mb": round(rng.uniform(5, 100)),
             "runs_on": sorted(rng.sample([X86, ARM, GPU], rng.randint(1, 3)))}
            for i in range(n)]


def _hidden_choose(rng):
    tie = [{"engine": "first", "latency_ms": 5.0, "quality": 0.9, "size_mb": 10.0,
            "runs_on": [X86]},
           {"engine": "second", "latency_ms": 5.0, "quality": 0.95, "size_mb": 10.0,
            "runs_on": [X86]}]
    cases = [Case((MEASURED, None, None, []), label="no constraint: the fastest overall"),
             Case((MEASURED, 20.0, 0.9, [X86]), label="x86 CPU, 20 ms, accuracy >= 0.9"),
             Case((MEASURED, None, 0.95, []), label="nothing is that accurate, anywhere"),
             Case((MEASURED, None, 0.88, [X86, ARM]), label="must run on both CPUs"),
             Case((MEASURED, 12.0, None, [X86]), label="a bound equal to a latency is met"),
             Case((MEASURED, 1.0, None, []), label="nothing is that fast"),
             Case(([], None, None, []), label="no measurements"),
             Case((tie, None, None, [X86]), label="equal latencies: the first row in the table")]
    for _ in range(3):
        rows = _random_rows(rng, rng.randint(4, 9))
        cases.append(Case((rows, rng.choice([None, 20.0, 40.0]), rng.choice([None, 0.85, 0.9]),
                           rng.sample([X86, ARM, GPU], rng.randint(0, 1))),
                          label=f"{len(rows)} random rows"))
    return cases


# --------------------------------------------------------------------------- 4: Q/DQ

def _qdq_ref(x, scale, zero_point):
    from utils.export import qdq_roundtrip

    return list(call_with_tensors(qdq_roundtrip, x, scale, zero_point))


def _shape(x):
    shape = []
    while isinstance(x, list):
        shape.append(len(x))
        x = x[0] if x else None
    return shape


def _as_array(got):
    """A plain nested list as the grader's tensor form (a learner may return lists)."""
    if isinstance(got, list):
        return {"__array__": got, "shape": _shape(got)}
    return got


def _q_and_x_hat(rtol, atol):
    exact_values, close_values = array_close(0.0, 0.0), array_close(rtol, atol)

    def compare(expected, got):
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        if not isinstance(got, (list, tuple)) or len(got) != 2:
            return f"expected (q, x_hat), got {_show(got)}"
        for name, inner, e, g in (("q", exact_values, expected[0], got[0]),
                                  ("x_hat", close_values, expected[1], got[1])):
            reason = inner(e, _as_array(g))
            if reason:
                return f"{name}: {reason}"
        return None

    return compare


def _qdq_case(values, scale, zero_point, label="", raises=None):
    return Case((tensor_arg(values), scale, zero_point), label=label, raises=raises)


def _hidden_qdq(rng):
    s = 0.25
    cases = [_qdq_case([0.5 * s, 1.5 * s, 2.5 * s, -2.5 * s, 3.5 * s, -0.5 * s], s, 0,
                       label="ties round to even"),
             _qdq_case([100.0, -100.0, 1.0, 0.0], 0.5, 10, label="saturation to -128..127"),
             _qdq_case([2.5 * s, 7.5 * s], s, -3, label="ties, then the zero point")]
    for zero_point in (0, -7):  # a symmetric (per-tensor) scale, then an offset zero point
        x = [[round(rng.gauss(0, 1), 4) for _ in range(6)] for _ in range(3)]
        scale = max(abs(v) for row in x for v in row) / 127
        cases.append(_qdq_case(x, scale, zero_point, label=f"3 x 6 values, max |x| -> 127, "
                                                           f"zero point {zero_point}"))
    x = [round(rng.uniform(-2, 2), 4) for _ in range(8)]
    cases.append(_qdq_case(x, 2 ** -6, 0, label="scale 1/64, too small for the range: saturates"))
    cases += [_qdq_case([[0.0, 2.0]], 0.0, 5, label="scale 0 on a 1 x 2 tensor",
                        raises="ValueError"),
              _qdq_case([1.0], -0.1, 0, label="a negative scale", raises="ValueError"),
              _qdq_case([1.0], 0.1, 128, label="zero point 128 is not an int8",
                        raises="ValueError")]
    return cases


# --------------------------------------------------------------------------- 5: dynamic axes

def _tag(key) -> str:
    if type(key) in (int, str, bool):
        return f"{type(key).__name__} {key!r}"
    return f"a {type(key).__name__} key"


def tag_axes(axes):
    """``{input: {axis: name}}`` with each axis key written with its type (``'int 0'``), so
    that the answer survives JSON; anything else is returned as it is."""
    if not isinstance(axes, dict):
        return axes
    return {name: {_tag(k): v for k, v in dict.items(inner)} if isinstance(inner, dict) else inner
            for name, inner in dict.items(axes)}


def _as_signature(signature):
    if not isinstance(signature, dict):
        return signature
    return {k: tuple(v) if isinstance(v, list) else v for k, v in signature.items()}


def with_signature(fn, signature):
    """Adapter (runs in the sandbox and in ``check``): ``fn`` called with the signature's axis
    lists as tuples; its answer with tagged axis keys."""
    return tag_axes(fn(_as_signature(signature)))


def _axes_ref(signature):
    from utils.export import dynamic_axes

    return tag_axes(dynamic_axes(_as_signature(signature)))


ENCODER = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
DECODER = {"input_ids": ["batch", "seq"], "past_keys": [None, "batch", None, "past", None],
           "past_values": [None, "batch", None, "past", None]}


def _hidden_axes(rng):
    names = ["batch", "seq", "past", "height", "width"]
    cases = [Case(({"input_ids": ["batch", None]},), label="a dynamic batch, a fixed length"),
             Case(({"input_ids": ["batch", "seq"], "position_ids": ["batch", "seq"],
                    "past_keys": [None, "batch", None, "past", None]},),
                  label="three inputs sharing batch"),
             Case(({"logits_in": [None, None, None]},), label="every axis static"),
             Case(({"pixel_values": ["batch", None, "height", "width"]},),
                  label="an image input")]
    for _ in range(2):
        signature = {f"input_{i}": [rng.choice([axis, None]) for axis in
                                    rng.sample(names, rng.randint(1, 4))]
                     for i in range(rng.randint(1, 3))}
        cases.append(Case((signature,)))
    cases += [Case(({},), raises="ValueError", label="an empty signature"),
              Case(({"input_ids": ["batch", "seq"], "attention_mask": "batch"},),
                   raises="ValueError", label="a string for the second input"),
              Case(({"input_ids": None},), raises="ValueError",
                   label="None instead of a tuple of axis names")]
    return cases


# --------------------------------------------------------------------------- 6: concept

INT8_OPTIONS = ("a", "b", "c", "d")


def _int8_answer():
    return "b"


SPEC = LabSpec(
    lab="lab08",
    notebook="lab08_export_engines.ipynb",
    title="Lab 08: provider order, graph nodes, choosing an engine, Q/DQ, dynamic axes",
    seed=8800, timeout_s=90, cell_timeout_s=30, call_timeout_s=10, memory_mb=4096,
    preimport=("torch", "onnx"),
    exercises=(
        Exercise(
            name="order_providers", points=2, title="ONNX Runtime's execution providers in order",
            expected=_providers_ref, compare=exact(),
            public=(Case(([CPU, CUDA],), label="CUDA and CPU, CPU listed first (the mistake)"),
                    Case(([CPU, TRT, CUDA],), label="TensorRT, CUDA and CPU"),
                    Case(([CPU],), label="CPU only"),
                    Case((["AzureExecutionProvider", CPU],),
                         label="pip's CPU build: Azure is not ranked")),
            hidden=_hidden_providers,
            hint="rank by position in PROVIDER_PRIORITY; providers it does not list come after "
                 "all the ranked ones, in the order given",
            references=("utils.export.provider_order",)),
        Exercise(
            name="count_nodes", points=1, title="Nodes of one operator type in an ONNX graph",
            expected=_count_ref, adapter=MODEL, compare=exact(),
            public=(Case((BLOCK, "MatMul"), label="a transformer block: MatMul"),
                    Case((BLOCK, "Attention"), label="an op the graph does not hold")),
            hidden=_hidden_count,
            hint="model.graph.node is the list of nodes; compare each node's op_type exactly",
            references=("utils.export.op_counts", "utils.export.graph_summary")),
        Exercise(
            name="fastest_meeting", points=2, title="The fastest engine that meets the constraints",
            expected=_choose_ref, compare=exact(),
            public=(Case((MEASURED, 30.0, 0.9, [X86]), label="x86 CPU, 30 ms, accuracy >= 0.9"),
                    Case((MEASURED, 20.0, 0.95, [X86]), label="nothing is that accurate"),
                    Case((MEASURED, None, None, [GPU]), label="on the GPU, no other constraint")),
            hidden=_hidden_choose,
            hint="keep the rows that meet every constraint (None: no bound; every platform in "
                 "needs must be in runs_on), then the smallest latency_ms",
            references=("utils.export.choose_engine",)),
        Exercise(
            name="quantize_dequantize", points=2,
            title="One QuantizeLinear -> DequantizeLinear pair",
            expected=_qdq_ref, adapter=TENSORS, compare=_q_and_x_hat(1e-5, 1e-6),
            public=(_qdq_case([0.125, 0.375, 0.625, -0.625, 0.875], 0.25, 0,
                              label="x / scale = 0.5, 1.5, 2.5, -2.5, 3.5: ties to even"),
                    _qdq_case([100.0, -100.0, 1.0], 0.5, 10, label="saturation, zero point 10"),
                    _qdq_case([1.0], 0.0, 0, label="scale 0", raises="ValueError")),
            hidden=_hidden_qdq,
            hint="torch.round rounds half to even; round first, add the zero point, then clamp "
                 "to -128..127",
            references=("utils.export.qdq_roundtrip",)),
        Exercise(
            name="axes_spec", points=2, title="dynamic_axes for torch.onnx.export",
            expected=_axes_ref, adapter=SIGNATURE, compare=exact(),
            public=(Case((ENCODER,), label="an encoder: batch and sequence on both inputs"),
                    Case((DECODER,), label="DecoderWithPast: (L, B, H_kv, P, D) caches"),
                    Case(({"input_ids": "batch"},), raises="ValueError",
                         label="a string instead of a tuple of axis names")),
            hidden=_hidden_axes,
            hint="axis keys are ints (shown as 'int 0'); None marks a static axis, left out",
            references=("utils.export.dynamic_axes", "utils.export.export_dims")),
        Exercise(
            name="ANSWER_INT8_FLAG", points=1, kind="value",
            title="TensorRT's INT8 flag without Q/DQ nodes or a calibrator",
            expected=_int8_answer, compare=choice(),
            public=(Case(label="your answer is one of 'a', 'b', 'c', 'd' (graded on submission)",
                         compare=one_of(INT8_OPTIONS), expected="a", graded=False),),
            hidden=lambda rng: [Case(label="the answer")],
            hint="the flag allows int8 kernels; it does not say what the int8 scales are"),
    ),
)
