"""Chapter 08: a model outside PyTorch — torch.export, ONNX, ONNX Runtime, OpenVINO, TensorRT.

- **Capture** (``torch.export``): one forward pass traced into an ATen graph with symbolic
  shapes and the guards that say for which shapes it holds. A transformers 5 causal LM returns a
  ``DynamicCache`` object, which the exporter cannot put in a graph's outputs; the course's fix is
  a wrapper per use: ``LogitsOnly`` (no cache) for scoring, ``DecoderWithPast`` (the cache as
  plain stacked tensors in and out) for generation.
- **ONNX** (``export_onnx``): the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which
  runs ``torch.export`` and translates with onnxscript), with dynamic axes named by
  ``dynamic_axes``. ``op_counts`` inspects the graph.
- **ONNX Runtime** (``ort_session``): execution providers tried in the order given (so the
  accelerator first, ``CPUExecutionProvider`` last: ``provider_order``), graph optimisation
  levels, ``fuse_for_ort`` (onnxscript's transformer fusions: Attention, SkipLayerNormalization,
  BiasGelu, RMSNorm, rotary), int8 dynamic and static Q/DQ quantization.
- **Generation outside PyTorch** (``ort_greedy``): the decoder with past key/values, step by step.
- **OpenVINO** (``openvino_compile``, ``openvino_compress``): conversion from the module or the
  ONNX file, NNCF weight compression to int8 and int4 (group size must divide the layer width).
- **TensorRT** (``build_tensorrt_engine``): FP16 and explicit-Q/DQ INT8 engines with TensorRT 10's
  ``build_serialized_network``; needs a CUDA GPU and the ``tensorrt`` package, and says so.

Reproduce the chapter's measurements::

    python -m utils.report 08
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from utils.validation import check_choice, check_positive_int

CHAPTER = "08"  # found by utils.report; notebooks/08_*.ipynb, solutions/lab08_*.ipynb

# --------------------------------------------------------------------------- capture


class LogitsOnly(nn.Module):
    """A causal LM as ``input_ids -> logits`` without the cache object (exportable)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class EncoderHidden(nn.Module):
    """An encoder (MiniLM) as ``(input_ids, attention_mask) -> last_hidden_state``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DecoderWithPast(nn.Module):
    """A causal LM for step-by-step decoding with its cache as plain tensors.

    ``(input_ids (B, T), past_keys (L, B, H_kv, P, D), past_values) -> (logits of the last
    position (B, V), present_keys (L, B, H_kv, P + T, D), present_values)``. A past of length
    P = 0 is the prefill. Inside, the tensors fill a ``DynamicCache`` for the model and are read
    back out of it, so the exported graph has only tensors at its edges.
    """

    def __init__(self, model: nn.Module):
        from utils.models import cache_argument

        super().__init__()
        self.model = model
        self._cache_keyword = next(iter(cache_argument(None)))  # read once, outside any trace

    def forward(self, input_ids, past_keys, past_values):
        from transformers import DynamicCache

        from utils.models import returned_cache

        cache = DynamicCache(config=self.model.config)
        for layer in range(past_keys.shape[0]):
            cache.update(past_keys[layer], past_values[layer], layer)
        out = self.model(input_ids=input_ids, **{self._cache_keyword: cache}, use_cache=True)
        layers = returned_cache(out).layers
        return (out.logits[:, -1], torch.stack([c.keys for c in layers]),
                torch.stack([c.values for c in layers]))


def cache_shape(config, batch: int = 1, past: int = 0) -> tuple[int, int, int, int, int]:
    """Shape (L, B, H_kv, P, D) of ``DecoderWithPast``'s stacked keys (or values)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.num_hidden_layers, batch, config.num_key_value_heads, past, head_dim)


def empty_cache(config, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-length past keys and values: the input of the prefill step."""
    shape = cache_shape(config, batch, 0)
    return torch.zeros(shape), torch.zeros(shape)


def dynamic_axes(signature: dict[str, tuple]) -> dict[str, dict[int, str]]:
    """``{input: {axis index: axis name}}`` from ``{input: (axis name or None per axis)}``.

    ``None`` marks a static axis. The same name on two inputs is one symbol (e.g. the batch of
    ``input_ids`` and of ``attention_mask``), which is what the exporter needs to know.
    """
    if not isinstance(signature, dict) or not signature:
        raise ValueError("signature must be a non-empty dict {input name: tuple of axis names}")
    axes = {}
    for name, dims in signature.items():
        if not isinstance(dims, (tuple, list)):
            raise ValueError(f"signature[{name!r}] must be a tuple of axis names or None, "
                             f"got {dims!r}")
        axes[name] = {i: d for i, d in enumerate(dims) if d is not None}
    return axes


def export_dims(signature: dict[str, tuple], max_size: int = 4096) -> dict[str, dict]:
    """``torch.export`` dynamic shapes for ``signature``: one ``Dim`` per axis name."""
    dims = {}
    return {name: {i: dims.setdefault(d, torch.export.Dim(d, max=max_size))
                   for i, d in axes.items()}
            for name, axes in dynamic_axes(signature).items()}


def export_program(module: nn.Module, args: tuple, signature: dict[str, tuple]):
    """``torch.export.export`` with the dynamic axes of ``signature`` (keys in argument order).

    The example sizes of dynamic axes must be >= 2: the exporter specialises sizes 0 and 1.
    """
    return torch.export.export(module.eval(), tuple(args), dynamic_shapes=export_dims(signature))


def workdir(prefix: str = "course08_") -> Path:
    """A fresh temporary folder for exported files (nothing is written into the repository)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


@contextlib.contextmanager
def quiet():
    """Silence the exporters' and quantizers' progress lines (stdout, Python warnings, log
    records below ERROR)."""
    loggers = [logging.getLogger(name) for name in ("", "nncf", "torch.onnx")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def export_onnx(module: nn.Module, args: tuple, path, signature: dict[str, tuple],
                output_names: list[str]) -> Path:
    """Export ``module`` with the dynamo exporter to ``path`` (one file, weights inside).

    ``signature`` names the inputs (in argument order) and their dynamic axes.
    """
    path = Path(path)
    with quiet(), torch.no_grad():
        torch.onnx.export(module.eval(), tuple(args), path, dynamo=True,
                          input_names=list(signature), output_names=list(output_names),
                          dynamic_shapes=export_dims(signature), external_data=False,
                          verbose=False)
    return path


# --------------------------------------------------------------------------- inspecting a graph


def _load(model_or_path):
    import onnx

    return onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) \
        else model_or_path


def op_counts(model_or_path) -> Counter:
    """How many nodes of each operator type the ONNX graph holds (top-level graph)."""
    return Counter(node.op_type for node in _load(model_or_path).graph.node)


def graph_summary(model_or_path) -> dict:
    """Nodes, operator types, initializers (weights) and their bytes, opset, inputs, outputs."""
    import onnx
    from onnx import numpy_helper

    model = _load(model_or_path)
    g = model.graph

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "nodes": len(g.node),
        "op_types": len({n.op_type for n in g.node}),
        "initializers": len(g.initializer),
        "initializer_bytes": sum(numpy_helper.to_array(t).nbytes for t in g.initializer),
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": {v.name: shape(v) for v in g.input},
        "outputs": {v.name: shape(v) for v in g.output},
        "ir_version": model.ir_version,
        "checker": onnx.checker.check_model(model) is None,
    }


def file_mb(path) -> float:
    return os.path.getsize(path) / 1e6


# --------------------------------------------------------------------------- ONNX Runtime

# Most specific first: ORT assigns each node to the first provider in the list that supports it,
# so the CPU provider, which supports every operator, belongs last as the fall-back.
PROVIDER_PRIORITY = ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                     "ROCMExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider",
                     "OpenVINOExecutionProvider", "CPUExecutionProvider")

OPT_LEVELS = ("disabled", "basic", "extended", "all")


def provider_order(available: list[str] | None = None) -> list[str]:
    """The providers of ``available`` (default: this ORT build's) ranked by ``PROVIDER_PRIORITY``,
    so the CPU comes after every accelerator the table knows. Providers it does not rank follow,
    in their given order (``AzureExecutionProvider`` of pip's CPU build runs remote models, not
    local nodes); to use one, put it before the CPU yourself."""
    import onnxruntime as ort

    available = list(ort.get_available_providers() if available is None else available)
    known = [p for p in PROVIDER_PRIORITY if p in available]
    return known + [p for p in available if p not in PROVIDER_PRIORITY]


def ort_session(path, *, level: str = "all", threads: int | None = None,
                providers: list[str] | None = None, optimized_path=None):
    """An ``InferenceSession`` at graph optimisation ``level`` with ``threads`` intra-op threads
    (default: torch's, so both engines get the same cores). ``optimized_path`` saves the graph
    after ORT's optimisations, to count its nodes."""
    import onnxruntime as ort

    check_choice("level", level, OPT_LEVELS)
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no "hardware-specific graph" warnings
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=providers or provider_order())


def ort_run(session, feeds: dict) -> list[np.ndarray]:
    """Run a session on torch tensors or arrays keyed by input name."""
    return session.run(None, {k: v.numpy() if isinstance(v, torch.Tensor) else v
                              for k, v in feeds.items()})


def optimized_node_counts(path, level: str, out_dir) -> Counter:
    """Operator counts of the graph ORT runs after optimisation ``level``."""
    out = Path(out_dir) / f"{Path(path).stem}_{level}.onnx"
    ort_session(path, level=level, optimized_path=out)
    return op_counts(out)


def fuse_for_ort(path, out_path) -> tuple[Path, dict[str, int]]:
    """onnxscript's transformer fusions for ONNX Runtime on a dynamo-exported graph: the
    attention block into one ``Attention``/``MultiHeadAttention`` node, residual add + LayerNorm
    into ``SkipLayerNormalization``, bias + GELU into ``BiasGelu``, RMSNorm, rotary embedding.
    Returns the saved path and how many of each fusion were applied."""
    from onnxscript import ir
    from onnxscript.rewriter import ort_fusions

    model = ir.load(str(path))
    with quiet():
        model, counts = ort_fusions.optimize_for_ort(model)
    ir.save(model, str(out_path))
    return Path(out_path), {k: v for k, v in counts.items() if v}


def ort_transformers_optimize(path, out_path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """ONNX Runtime's own transformer optimizer (``onnxruntime.transformers.optimizer``, BERT
    patterns): its fused-operator statistics. Its attention patterns match the TorchScript
    exporter's graphs; on a dynamo export it fuses LayerNorm and GELU only."""
    from onnxruntime.transformers import optimizer

    with quiet():
        opt = optimizer.optimize_model(str(path), model_type="bert", num_heads=num_heads,
                                       hidden_size=hidden_size, opt_level=0)
        opt.save_model_to_file(str(out_path))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


# --------------------------------------------------------------------------- ORT quantization


def quantize_ort_dynamic(path, out_path) -> Path:
    """Weights int8 per channel ahead of time, activations quantized per call (dynamic).
    ``MatMul`` nodes become ``DynamicQuantizeMatMul``/``MatMulInteger``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet():
        quantize_dynamic(str(path), str(out_path), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
    return Path(out_path)


class FeedsReader:
    """An ONNX Runtime ``CalibrationDataReader`` over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter([{k: v.numpy() if isinstance(v, torch.Tensor) else v
                             for k, v in f.items()} for f in feeds])

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # ORT calls it between calibration passes on some versions
        pass


def matmul_nodes(model_or_path) -> dict[str, tuple | None]:
    """Every ``MatMul`` node: the shape of its constant weight, or None when both inputs are
    activations (attention's Q K^T and P V)."""
    g = _load(model_or_path).graph
    shapes = {t.name: tuple(t.dims) for t in g.initializer}
    return {n.name: next((shapes[i] for i in n.input if i in shapes), None)
            for n in g.node if n.op_type == "MatMul"}


def quantize_ort_static(path, out_path, calibration_feeds: list[dict], *,
                        symmetric_activations: bool = False,
                        exclude: list[str] = ()) -> Path:
    """Static int8 in the Q/DQ format: calibration runs the float graph on
    ``calibration_feeds``, fixes a scale (and zero point) per activation from the observed
    ranges, and writes ``QuantizeLinear -> DequantizeLinear`` pairs around each quantized
    ``MatMul``; ``exclude`` names nodes to keep in float. Asymmetric activations (uint8, zero
    point fitted) suit one-sided inputs such as GELU outputs; symmetric ones (int8, zero point 0)
    are what TensorRT's explicit quantization takes."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if not calibration_feeds:
        raise ValueError("calibration_feeds must hold at least one feed dict")
    with quiet():
        quantize_static(str(path), str(out_path), FeedsReader(calibration_feeds),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        activation_type=QuantType.QInt8 if symmetric_activations
                        else QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=list(exclude),
                        extra_options={"ActivationSymmetric": symmetric_activations,
                                       "WeightSymmetric": True})
    return Path(out_path)


def qdq_roundtrip(x, scale: float, zero_point: int, bits: int = 8, signed: bool = True):
    """What one ``QuantizeLinear -> DequantizeLinear`` pair does to ``x``:
    q = saturate(round(x / scale) + zero_point), x_hat = (q - zero_point) * scale
    (ONNX operator spec; round half to even). Returns ``(q, x_hat)``."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    lo, hi = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if not lo <= zero_point <= hi:
        raise ValueError(f"zero_point must be in {lo}..{hi} for {bits}-bit, got {zero_point!r}")
    x = torch.as_tensor(x, dtype=torch.float32)
    q = (torch.round(x / scale) + zero_point).clamp(lo, hi)
    return q.to(torch.int32), (q - zero_point) * scale


def qdq_pairs(model_or_path) -> dict:
    """Q/DQ nodes of a quantized graph, and the scale and zero point of its first pair."""
    from onnx import numpy_helper

    g = _load(model_or_path).graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    first = next((n for n in q if n.input[1] in init), None)
    return {"QuantizeLinear": len(q), "DequantizeLinear": len(dq),
            "first_scale": float(init[first.input[1]]) if first is not None else None,
            "first_zero_point": int(init[first.input[2]]) if first is not None
            and len(first.input) > 2 else 0}


# --------------------------------------------------------------------------- engines as models


class EngineLM:
    """An exported causal LM (``input_ids -> logits``) behind the interface of
    ``utils.metrics``: ``engine(input_ids=...)`` returns an object with ``.logits`` (torch)."""

    def __init__(self, run):
        self._run = run  # numpy int64 (B, T) -> numpy float (B, T, V)

    def __call__(self, input_ids: torch.Tensor, **_):
        logits = self._run(input_ids.cpu().numpy().astype(np.int64))
        return SimpleNamespace(logits=torch.from_numpy(np.asarray(logits)))

    def parameters(self):  # utils.metrics reads the device from the first parameter
        yield torch.zeros(())

    @classmethod
    def from_ort(cls, session):
        return cls(lambda ids: session.run(None, {"input_ids": ids})[0])

    @classmethod
    def from_openvino(cls, compiled):
        return cls(lambda ids: compiled([ids])[0])


# --------------------------------------------------------------------------- generation


def greedy_decode(step, prompt_ids: torch.Tensor, max_new_tokens: int, config) -> list[int]:
    """Greedy decoding with a ``DecoderWithPast`` step (PyTorch or an engine): the prefill on
    the prompt with an empty past, then one token per step with the returned keys and values
    fed back. ``step(ids, keys, values) -> (last logits, keys, values)``, all numpy."""
    check_positive_int("max_new_tokens", max_new_tokens)
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must have shape (1, T), got {tuple(prompt_ids.shape)}")
    keys, values = (t.numpy() for t in empty_cache(config))
    ids, tokens = prompt_ids.numpy().astype(np.int64), []
    for _ in range(max_new_tokens):
        logits, keys, values = step(ids, keys, values)
        tokens.append(int(logits[0].argmax()))
        ids = np.array([[tokens[-1]]], dtype=np.int64)
    return tokens


def ort_step(session):
    """``greedy_decode``'s step over an exported ``DecoderWithPast`` session."""
    def step(ids, keys, values):
        return session.run(None, {"input_ids": ids, "past_keys": keys, "past_values": values})
    return step


def torch_step(module):
    """``greedy_decode``'s step over a ``DecoderWithPast`` module (eager or compiled)."""
    @torch.inference_mode()
    def step(ids, keys, values):
        out = module(torch.from_numpy(ids), torch.from_numpy(keys), torch.from_numpy(values))
        return [t.numpy() for t in out]
    return step


@torch.inference_mode()
def torch_greedy(model, prompt_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The same greedy tokens from PyTorch's ``generate`` (the reference)."""
    out = model.generate(prompt_ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, prompt_ids.shape[1]:].tolist()


# --------------------------------------------------------------------------- OpenVINO


def openvino_convert(source, example_input=None):
    """``openvino.convert_model`` from a PyTorch module (traced with ``example_input``), an
    ``ExportedProgram`` or an ONNX file."""
    from utils.device import require_package

    ov = require_package("openvino", "OpenVINO conversion")
    with quiet():
        if isinstance(source, nn.Module):
            return ov.convert_model(source.eval(), example_input=example_input)
        return ov.convert_model(str(source) if isinstance(source, Path) else source)


def openvino_compile(ov_model, precision: str = "f32", threads: int | None = None):
    """Compile for the CPU. ``precision`` sets ``INFERENCE_PRECISION_HINT``: OpenVINO's CPU
    default is bf16 on CPUs with AMX or AVX-512 BF16 and f32 elsewhere, so the course passes it
    explicitly to get the same numbers on every machine."""
    import openvino as ov

    check_choice("precision", precision, ("f32", "bf16", "f16"))
    return ov.Core().compile_model(ov_model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()})


def openvino_default_precision() -> str:
    """The CPU plugin's inference precision on this machine when none is asked for."""
    import openvino as ov

    return str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))


def linear_widths(ov_model) -> list[int]:
    """The input width (reduction axis) of every MatMul with a constant weight."""
    widths = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() == "MatMul":
            for port in op.inputs():
                src = port.get_source_output().get_node()
                while src.get_type_name() == "Convert":  # fp16-compressed constants
                    src = src.input_value(0).get_node()
                if src.get_type_name() == "Constant":
                    shape = list(src.get_output_shape(0))
                    transposed = op.get_attributes().get("transpose_b", False)
                    widths.append(int(shape[-1] if transposed else shape[-2]))
    return widths


def openvino_compress(ov_model, mode: str, group_size: int | None = None):
    """NNCF weight compression of every linear layer: ``"int8"`` (asymmetric, per output
    channel) or ``"int4"`` (symmetric, groups of ``group_size`` input channels; the group size
    must divide each layer's width, or NNCF refuses). Activations stay in floating point."""
    from utils.device import require_package

    nncf = require_package("nncf", "OpenVINO weight compression")
    check_choice("mode", mode, ("int8", "int4"))
    if mode == "int8":
        with quiet():
            return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    check_positive_int("group_size", group_size)
    bad = sorted({w for w in linear_widths(ov_model) if w % group_size})
    if bad:
        raise ValueError(f"group_size must divide every layer width; {group_size} does not "
                         f"divide {bad}")
    with quiet():
        return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT4_SYM,
                                     group_size=group_size, ratio=1.0)


def openvino_save(ov_model, path) -> float:
    """Save as IR (.xml + .bin, weights as they are) and return the .bin size in MB."""
    import openvino as ov

    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return file_mb(Path(path).with_suffix(".bin"))


# --------------------------------------------------------------------------- TensorRT (GPU)


def tensorrt_ready() -> bool:
    """A CUDA GPU and the ``tensorrt`` package are both here."""
    from utils.device import has_cuda, has_package

    return has_cuda() and has_package("tensorrt")


def tensorrt_status() -> str:
    """Why the TensorRT steps can or cannot run here, in one line."""
    from utils.device import has_cuda, has_package

    if not has_cuda():
        return "no CUDA GPU: TensorRT builds engines for NVIDIA GPUs only; the cells show the plan"
    if not has_package("tensorrt"):
        return "CUDA GPU present but the tensorrt package is missing: `pip install tensorrt`"
    import tensorrt as trt

    return f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def tensorrt_plan(onnx_path, precision: str, shapes: dict[str, tuple]) -> list[str]:
    """The steps ``build_tensorrt_engine`` takes, as text (what a CPU-only run can show)."""
    check_choice("precision", precision, ("fp16", "int8"))
    steps = ["builder = trt.Builder(logger); network = builder.create_network(0)  "
             "# explicit batch is the only mode in TensorRT 10",
             f"trt.OnnxParser(network, logger).parse_from_file({str(onnx_path)!r})",
             "config = builder.create_builder_config()",
             "config.set_flag(trt.BuilderFlag.FP16)"]
    if precision == "int8":
        steps += ["config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's "
                  "Q/DQ pairs (explicit quantization); without them or a calibrator TensorRT "
                  "keeps those layers in higher precision"]
    steps += [f"profile.set_shape({name!r}, min={lo}, opt={opt}, max={hi})"
              for name, (lo, opt, hi) in shapes.items()]
    steps += ["plan = builder.build_serialized_network(network, config)  "
              "# build_engine was removed in TensorRT 10",
              "engine = trt.Runtime(logger).deserialize_cuda_engine(plan)"]
    return steps


def build_tensorrt_engine(onnx_path, precision: str, shapes: dict[str, tuple]):
    """Build a TensorRT engine from an ONNX file; ``shapes``: ``{input: (min, opt, max)}``
    shapes of the optimisation profile. ``precision="int8"`` expects a Q/DQ graph
    (``quantize_ort_static``). Returns the deserialised engine. GPU only."""
    from utils.device import require_cuda, require_package

    require_cuda("building a TensorRT engine")
    trt = require_package("tensorrt", "building a TensorRT engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    check_choice("precision", precision, ("fp16", "int8"))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build a {precision} engine from {onnx_path}")
    return trt.Runtime(logger).deserialize_cuda_engine(plan)


def tensorrt_runner(engine, output_dtype=torch.float32):
    """A callable ``feeds (dict of CUDA tensors) -> first output`` over an engine's context."""
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    import tensorrt as trt

    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]

    def run(feeds: dict):
        for name in inputs:
            context.set_input_shape(name, tuple(feeds[name].shape))
            context.set_tensor_address(name, feeds[name].data_ptr())
        results = []
        for name in outputs:
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=output_dtype,
                              device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return results[0]

    return run


# --------------------------------------------------------------------------- choosing an engine


def choose_engine(rows: list[dict], *, max_latency_ms: float | None = None,
                  min_quality: float | None = None, max_size_mb: float | None = None,
                  needs: set[str] = frozenset()) -> dict | None:
    """The fastest row that meets every constraint, or None. Each row has ``engine``,
    ``latency_ms``, ``quality`` (higher is better), ``size_mb`` and ``runs_on`` (a set of
    platforms, e.g. {"x86 CPU", "NVIDIA GPU"}); ``needs`` are platforms it must run on."""
    if not isinstance(rows, list):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    ok = [r for r in rows
          if (max_latency_ms is None or r["latency_ms"] <= max_latency_ms)
          and (min_quality is None or r["quality"] >= min_quality)
          and (max_size_mb is None or r["size_mb"] <= max_size_mb)
          and set(needs) <= set(r["runs_on"])]
    return min(ok, key=lambda r: r["latency_ms"]) if ok else None


# --------------------------------------------------------------------------- report


def report_rows(quick: bool = False) -> list[dict]:
    """Chapter 08's headline figures (``python -m utils.report 08``): MiniLM exported to ONNX
    against PyTorch in ORT and OpenVINO, the fused graph's latency against eager PyTorch, ORT
    dynamic int8 (size, embedding cosine), and the exported decoder's greedy tokens and tokens/s
    in ORT beside PyTorch. ``quick``: fewer sentences and tokens, the small course model."""
    from utils.bench import compare
    from utils.data import sample_sentences
    from utils.metrics import cosine_similarity
    from utils.models import load_course_model, load_minilm

    rows, work = [], workdir()
    threads = torch.get_num_threads()

    def add(measurement, value, unit, conditions):
        rows.append({"measurement": measurement, "value": float(value), "unit": unit,
                     "conditions": conditions})

    minilm, tokenizer = load_minilm()
    sentences = sample_sentences(8 if quick else 32)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    signature = {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "sequence")}
    path = export_onnx(EncoderHidden(minilm), tuple(feeds.values()), work / "minilm.onnx",
                       signature, ["last_hidden_state"])
    with torch.no_grad():
        reference = EncoderHidden(minilm)(**feeds).numpy()
    cpu = ["CPUExecutionProvider"]
    cond = f"MiniLM fp32, batch {tuple(feeds['input_ids'].shape)}, {threads} threads"
    add("ORT vs PyTorch, max |diff|",
        np.abs(ort_run(ort_session(path, providers=cpu), feeds)[0] - reference).max(), "", cond)
    compiled = openvino_compile(openvino_convert(path))
    add("OpenVINO f32 vs PyTorch, max |diff|",
        np.abs(compiled(list(feeds.values()))[0] - reference).max(), "", cond)
    fused, _ = fuse_for_ort(path, work / "minilm_fused.onnx")
    add("nodes: exported / fused", sum(op_counts(path).values()), "nodes",
        f"fused: {sum(op_counts(fused).values())}, Attention: {op_counts(fused)['Attention']}")
    session = ort_session(fused, providers=cpu)
    arrays = {k: v.numpy() for k, v in feeds.items()}

    def eager():
        with torch.inference_mode():
            minilm(**feeds)

    times = compare({"eager": eager, "ort": lambda: session.run(None, arrays)},
                    min_run_time=0.2, rounds=2 if quick else 3)
    add("ORT fused vs eager PyTorch, speed-up", times["ort"]["speedup"], "x", cond)
    int8 = quantize_ort_dynamic(path, work / "minilm_int8.onnx")
    hidden = ort_run(ort_session(int8, providers=cpu), feeds)[0]
    mask = feeds["attention_mask"].unsqueeze(-1).float()

    def pooled(h):
        return nn.functional.normalize((torch.as_tensor(h) * mask).sum(1) / mask.sum(1), dim=-1)

    add("ORT dynamic int8 size", file_mb(int8), "MB", f"fp32 file {file_mb(path):.1f} MB")
    add("ORT dynamic int8 embedding cosine (mean)",
        cosine_similarity(pooled(hidden), pooled(reference)).mean(), "", cond)

    name = "small" if quick else "teacher"
    model, tok = load_course_model(name)
    cfg = model.config
    decoder = DecoderWithPast(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    past = [torch.randn(cache_shape(cfg, 2, 3)) for _ in range(2)]
    dec_signature = {"input_ids": ("batch", "sequence"),
                     "past_keys": (None, "batch", None, "past", None),
                     "past_values": (None, "batch", None, "past", None)}
    dec_path = export_onnx(decoder, (ids, *past), work / "decoder.onnx", dec_signature,
                           ["logits", "present_keys", "present_values"])
    prompt = tok("The king said unto them", return_tensors="pt")["input_ids"]
    new = 16 if quick else 48
    expected = torch_greedy(model, prompt, new)
    steps = {"ORT": ort_step(ort_session(dec_path, providers=cpu)), "PyTorch": torch_step(decoder)}
    for label, step in steps.items():
        greedy_decode(step, prompt, 2, cfg)  # warm-up
        t0 = time.perf_counter()
        tokens = greedy_decode(step, prompt, new, cfg)
        add(f"{label} greedy decode", new / (time.perf_counter() - t0), "tokens/s",
            f"{name} fp32, batch 1, {new} tokens, same tokens as generate: {tokens == expected}")
    return rows
