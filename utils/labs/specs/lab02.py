"""Grading spec of lab 02, quantization (chapter 02).

Expected values come from the reference implementations in ``utils.quantization`` (imported inside
functions, so importing this spec stays cheap); the learner's answers must not merely call them.
Tensors travel as ``tensor_arg`` (plain JSON) and are rebuilt by ``call_with_tensors``. Hidden
cases are drawn from ``random.Random(SPEC.seed)``: random shapes, all-zero and constant tensors,
bits at both ends of 2..8, odd group sizes, and bad arguments that must raise ``ValueError``.
"""

from __future__ import annotations

from utils.labs.spec import (Case, Exercise, LabSpec, _compare_raises, _show, array_close,
                                 call_with_tensors, close, tensor_arg)

ADAPTER = "utils.labs.spec:call_with_tensors"


def _mat(rng, rows, cols, scale=1.0):
    return [[round(rng.gauss(0, 1) * scale, 5) for _ in range(cols)] for _ in range(rows)]


def _vec(rng, n, scale=1.0, offset=0.0):
    return [round(rng.gauss(0, 1) * scale + offset, 5) for _ in range(n)]


def _expected(reference):
    """``expected(*plain_args)``: the reference called on tensors, in the grading process."""
    return lambda *args, **kwargs: call_with_tensors(reference, *args, **kwargs)


# --------------------------------------------------------------------------- 1: symmetric


def _symmetric_ref(x, bits):
    from utils.quantization import fake_quantize

    return fake_quantize(x.float(), bits, symmetric=True, granularity="tensor")


def _hidden_symmetric(rng):
    cases = []
    for _ in range(4):
        rows, cols, bits = rng.randint(1, 6), rng.randint(1, 9), rng.choice([2, 3, 4, 8])
        cases.append(Case((tensor_arg(_mat(rng, rows, cols, rng.choice([0.01, 1, 30]))), bits),
                          label=f"random {rows}x{cols} tensor, {bits} bits"))
    cases += [Case((tensor_arg([[0.0, 0.0, 0.0]]), 8), label="all-zero tensor"),
              Case((tensor_arg([2.5] * 7), 2), label="constant tensor, 2 bits"),
              Case((tensor_arg(_vec(rng, 11)), 8), label="8 bits (upper end)"),
              Case((tensor_arg([1.0, -2.0]), 9), raises="ValueError", label="bits=9"),
              Case((tensor_arg([1.0, -2.0]), 1), raises="ValueError", label="bits=1")]
    return cases


# --------------------------------------------------------------------------- 2: asymmetric


def _asymmetric_ref(x, bits):
    from utils.quantization import quantize_tensor

    qt = quantize_tensor(x.float(), bits, symmetric=False, granularity="tensor")
    return {"q": qt.q.reshape(x.shape).to(int).tolist() if x.dim() else int(qt.q),
            "scale": float(qt.scale), "zero_point": int(qt.zero_point)}


def _asymmetric_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    if not isinstance(got, dict) or set(got) != {"q", "scale", "zero_point"}:
        return f"expected a dict with keys 'q', 'scale', 'zero_point', got {_show(got)}"
    q = got["q"]
    if isinstance(q, dict) and "__array__" in q:
        q = q["__array__"]
    if q != expected["q"]:
        return f"q differs: expected {_show(expected['q'])}, got {_show(q)}"
    reason = close(rel_tol=1e-5)(expected["scale"], got["scale"])
    if reason:
        return f"scale: {reason}"
    z = got["zero_point"]
    if isinstance(z, dict) and "__array__" in z:
        z = z["__array__"]
    if type(z) is float and z.is_integer():
        return "zero_point must be an integer (int), got a float"
    if z != expected["zero_point"]:
        return f"zero_point: expected {expected['zero_point']}, got {_show(z)}"
    return None


def _hidden_asymmetric(rng):
    cases = []
    for _ in range(4):
        n, bits, offset = rng.randint(2, 20), rng.choice([2, 4, 8]), rng.choice([-3.0, 0.0, 2.0])
        cases.append(Case((tensor_arg(_vec(rng, n, rng.choice([0.1, 1, 5]), offset)), bits),
                          label=f"random vector of {n}, offset {offset}, {bits} bits"))
    cases += [Case((tensor_arg([0.0, 0.0, 0.0, 0.0]), 4), label="all-zero tensor"),
              Case((tensor_arg([1.5, 1.5, 1.5]), 8), label="constant positive tensor"),
              Case((tensor_arg([-0.75, -0.75]), 2), label="constant negative tensor, 2 bits"),
              Case((tensor_arg([0.2, 0.9, 1.7, 3.1]), 3),
                   label="all positive: the range must be widened to contain 0"),
              Case((tensor_arg([1.0, 2.0]), 0), raises="ValueError", label="bits=0")]
    return cases


# --------------------------------------------------------------------------- 3: granularity


def _rows_ref(w, bits, group_size=None):
    from utils.quantization import fake_quantize

    if group_size is None:
        return fake_quantize(w.float(), bits, True, "channel")
    return fake_quantize(w.float(), bits, True, "group", group_size)


def _hidden_rows(rng):
    cases = []
    for group_size in (None, 3, 5, 7, 2):
        cols = (group_size or rng.randint(2, 6)) * rng.randint(1, 4)
        w = _mat(rng, rng.randint(1, 5), cols, rng.choice([0.05, 1, 10]))
        w[0][0] = round(w[0][0] * 50, 5)  # an outlier in the first row and group
        bits = rng.choice([2, 3, 4, 8])
        cases.append(Case((tensor_arg(w), bits), {"group_size": group_size},
                          label=f"random {len(w)}x{cols} with an outlier, {bits} bits, "
                                f"group_size={group_size}"))
    cases += [Case((tensor_arg([[0.0] * 6, [1.0] * 6]), 8), {"group_size": 3},
                   label="an all-zero row and a constant row"),
              Case((tensor_arg(_mat(rng, 2, 6)), 4), {"group_size": 4}, raises="ValueError",
                   label="group_size 4 does not divide 6 columns"),
              Case((tensor_arg(_mat(rng, 2, 6)), 10), raises="ValueError", label="bits=10")]
    return cases


# --------------------------------------------------------------------------- 4: integer GEMM


def _accumulator_ref(a_q, a_zp, b_q, b_zp):
    from utils.quantization import int8_gemm_terms

    t = int8_gemm_terms(a_q.to(a_q.dtype), a_zp, b_q, b_zp)
    return t["A_q B_q"] - t["z_b rowsum(A_q)"] - t["z_a colsum(B_q)"] + t["K z_a z_b"]


def _accumulator_compare(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    if not (isinstance(got, dict) and "__array__" in got):
        return f"expected an int32 tensor of shape {expected['shape']}, got {_show(got)}"
    if got.get("dtype") != "int32":
        return f"the accumulator must be an int32 tensor, got dtype {got.get('dtype')}"
    if got["shape"] != expected["shape"]:
        return f"expected shape {expected['shape']}, got shape {got['shape']}"
    if got["__array__"] != expected["__array__"]:
        return "values differ from the exact integer result (check the cross terms)"
    return None


def _int_mat(rng, rows, cols, lo, hi):
    return [[rng.randint(lo, hi) for _ in range(cols)] for _ in range(rows)]


def _hidden_accumulator(rng):
    cases = []
    for _ in range(4):
        m, k, n = rng.randint(1, 6), rng.randint(1, 40), rng.randint(1, 6)
        cases.append(Case((tensor_arg(_int_mat(rng, m, k, 0, 255), "uint8"), rng.randint(0, 255),
                           tensor_arg(_int_mat(rng, k, n, -127, 127), "int8"),
                           rng.randint(-20, 20)), label=f"random M={m}, K={k}, N={n}"))
    cases += [Case((tensor_arg([[255] * 300], "uint8"), 0, tensor_arg([[-128]] * 300, "int8"), 0),
                   label="extreme values, K=300 (int32 needed, int16 overflows)"),
              Case((tensor_arg([[7, 7]], "uint8"), 7, tensor_arg([[3], [4]], "int8"), 0),
                   label="activations equal to their zero point: result 0")]
    return cases


# --------------------------------------------------------------------------- 5: clipping


def _clip_ref(x, bits, grid=100):
    from utils.quantization import mse_optimal_clip

    return mse_optimal_clip(x.float(), bits, symmetric=True, grid=grid)[0]


def _hidden_clip(rng):
    cases = []
    for _ in range(4):
        x = _vec(rng, rng.randint(200, 600), 1.0)
        for i in range(rng.randint(0, 4)):
            x[i] = round(rng.choice([-1, 1]) * rng.uniform(8, 30), 4)  # rare outliers
        bits = rng.choice([3, 4])
        cases.append(Case((tensor_arg(x), bits), {"grid": 50},
                          label=f"{len(x)} normal values with rare outliers, {bits} bits"))
    cases += [Case((tensor_arg([2.0] * 10), 4), {"grid": 50},
                   label="constant tensor: nothing to clip"),
              Case((tensor_arg(_vec(rng, 50)), 4), {"grid": 1}, label="grid=1"),
              Case((tensor_arg(_vec(rng, 50)), 11), raises="ValueError", label="bits=11")]
    return cases


# --------------------------------------------------------------------------- 6, 7: int4 packing


def _pack_ref(q):
    from utils.quantization import pack_int4

    return pack_int4(q)


def _unpack_ref(packed):
    from utils.quantization import unpack_int4

    return unpack_int4(packed)


def _exact_array(expected, got):
    if isinstance(expected, dict) and "raises" in expected:
        return _compare_raises(expected, got)
    return array_close(rtol=0, atol=0)(expected, got)


def _hidden_pack(rng):
    cases = [Case((tensor_arg(_int_mat(rng, rng.randint(1, 4), 2 * rng.randint(1, 6), -8, 7),
                              "int8"),), label="random int4 matrix") for _ in range(4)]
    cases += [Case((tensor_arg([-8, 7, -1, 0], "int8"),), label="the ends of the range"),
              Case((tensor_arg([1, 2, 3], "int8"),), raises="ValueError", label="odd length"),
              Case((tensor_arg([9, 0], "int8"),), raises="ValueError", label="9 is not int4")]
    return cases


def _hidden_unpack(rng):
    cases = [Case((tensor_arg(_int_mat(rng, rng.randint(1, 4), rng.randint(1, 6), 0, 255),
                              "uint8"),), label="random bytes") for _ in range(4)]
    return cases + [Case((tensor_arg([0x80, 0x7F, 0xFF, 0x00], "uint8"),),
                         label="sign bits in both nibbles")]


# --------------------------------------------------------------------------- 8: MXFP4 block


def _mxfp4_ref(x):
    from utils.quantization import mxfp4_quantize

    return mxfp4_quantize(x.float())


def _hidden_mxfp4(rng):
    cases = []
    for scale in (1e-3, 0.7, 250.0):
        cases.append(Case((tensor_arg(_vec(rng, 32, scale)),),
                          label=f"random block of 32, magnitude {scale}"))
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -2.5, -5.0, 4.0] + [0.0] * 21
    cases += [Case((tensor_arg(ties),), label="values half-way between E2M1 codes (ties to even)"),
              Case((tensor_arg([8.0] + _vec(rng, 31, 2.0)),),
                   label="the largest value a power of two (8 -> X = 2)"),
              Case((tensor_arg([[round(rng.gauss(0, 1), 4) for _ in range(32)],
                                [round(rng.gauss(0, 30), 3) for _ in range(32)]]),),
                   label="two blocks (2, 32), each with its own scale"),
              Case((tensor_arg([0.0] * 32),), label="all-zero block"),
              Case((tensor_arg(_vec(rng, 20)),), raises="ValueError", label="20 values")]
    return cases


SPEC = LabSpec(
    lab="lab02",
    notebook="lab02_quantization.ipynb",
    title="Lab 02: quantization",
    seed=2026_02, timeout_s=120, cell_timeout_s=30, call_timeout_s=10, memory_mb=4096,
    preimport=("torch",),
    exercises=(
        Exercise(
            name="symmetric_fake_quant", points=2,
            title="Symmetric quantize, then dequantize",
            expected=_expected(_symmetric_ref), adapter=ADAPTER,
            compare=array_close(rtol=1e-5, atol=1e-6),
            public=(Case((tensor_arg([0.75, -0.5, 0.1, 0.0]), 8), label="4 values, 8 bits"),
                    Case((tensor_arg([[1.0, -3.0], [0.4, 2.9]]), 2), label="2 bits: -1, 0, 1"),
                    Case((tensor_arg([0.0, 0.0]), 4), label="all zeros (no division by 0)"),
                    Case((tensor_arg([1.0]), 1), raises="ValueError", label="bits=1",
                         hint="raise ValueError unless bits is an int in 2..8")),
            hidden=_hidden_symmetric,
            references=("utils.quantization.fake_quantize", "utils.quantization.quantize_tensor",
                        "utils.quantization.quantize", "utils.quantization.scale_zero_point"),
            hint="q_max = 2**(bits-1) - 1; s = max|x| / q_max (1.0 if that is 0); "
                 "x_hat = s * clamp(round(x / s), -q_max, q_max)"),
        Exercise(
            name="asymmetric_quantize", points=3,
            title="Asymmetric quantization with an integer zero point",
            expected=_expected(_asymmetric_ref), adapter=ADAPTER, compare=_asymmetric_compare,
            public=(Case((tensor_arg([-1.0, 0.0, 2.0]), 2), label="range [-1, 2], 2 bits"),
                    Case((tensor_arg([-0.37, 0.0, 0.75, 1.2]), 8), label="8 bits"),
                    Case((tensor_arg([0.3, 1.1]), 8), label="all positive"),
                    Case((tensor_arg([1.0]), 9), raises="ValueError", label="bits=9",
                         hint="raise ValueError unless bits is an int in 2..8")),
            hidden=_hidden_asymmetric,
            references=("utils.quantization.quantize_tensor", "utils.quantization.quantize",
                        "utils.quantization.scale_zero_point", "utils.quantization.fake_quantize"),
            hint="lo = min(x.min(), 0), hi = max(x.max(), 0); s = (hi - lo) / (2**bits - 1) "
                 "(1.0 if 0); z = int(clamp(0 - round(lo / s), 0, 2**bits - 1)); "
                 "q = clamp(round(x / s) + z, 0, 2**bits - 1)"),
        Exercise(
            name="fake_quantize_rows", points=3,
            title="Per-channel and per-group scales",
            expected=_expected(_rows_ref), adapter=ADAPTER,
            compare=array_close(rtol=1e-5, atol=1e-6),
            public=(Case((tensor_arg([[1.0, -0.45, 0.25, 0.1], [100.0, 3.0, -2.0, 0.9]]), 4),
                         label="per channel: the outlier row has its own scale"),
                    Case((tensor_arg([[1.0, -0.45, 0.25, 0.1], [100.0, 3.0, -2.0, 0.9]]), 4),
                         {"group_size": 2}, label="groups of 2"),
                    Case((tensor_arg([[1.0, 2.0, 3.0]]), 8), {"group_size": 2},
                         raises="ValueError", label="group_size 2 does not divide 3",
                         hint="raise ValueError when group_size does not divide the columns")),
            hidden=_hidden_rows,
            references=("utils.quantization.fake_quantize", "utils.quantization.quantize_tensor",
                        "utils.quantization.quantize", "utils.quantization.scale_zero_point"),
            hint="reshape to (rows * cols / g, g) (or keep (rows, cols) per channel), take one "
                 "absmax per row of that view, quantize symmetrically, reshape back"),
        Exercise(
            name="int8_matmul_accumulate", points=3,
            title="Integer GEMM with zero-point correction",
            expected=_expected(_accumulator_ref), adapter=ADAPTER,
            compare=_accumulator_compare,
            public=(Case((tensor_arg([[1, 2], [3, 4]], "uint8"), 1,
                          tensor_arg([[1, -1], [2, 0]], "int8"), 0), label="2x2, z_b = 0"),
                    Case((tensor_arg([[10, 0, 255]], "uint8"), 128,
                          tensor_arg([[5], [-7], [3]], "int8"), 2), label="both zero points"),),
            hidden=_hidden_accumulator,
            references=("utils.quantization.int8_gemm_terms", "utils.quantization.int8_gemm"),
            hint="sum_k (a - z_a)(b - z_b) = A_q B_q - z_b rowsum(A_q) - z_a colsum(B_q) "
                 "+ K z_a z_b, every term in int32 (cast before multiplying)"),
        Exercise(
            name="mse_best_clip", points=2,
            title="The clip ratio that minimises the MSE",
            expected=_expected(_clip_ref), adapter=ADAPTER,
            compare=close(rel_tol=0, abs_tol=0.041),
            public=(Case((tensor_arg([0.1 * i for i in range(-20, 21)] + [9.0]), 3), {"grid": 50},
                         label="one outlier, 3 bits"),
                    Case((tensor_arg([-1.0, -0.5, 0.0, 0.5, 1.0]), 8), {"grid": 10},
                         label="evenly spread: no clipping"),
                    Case((tensor_arg([1.0]), 12), raises="ValueError", label="bits=12",
                         hint="raise ValueError unless bits is an int in 2..8")),
            hidden=_hidden_clip,
            references=("utils.quantization.mse_optimal_clip",
                        "utils.quantization.calibrate_range", "utils.quantization.fake_quantize",
                        "utils.quantization.quantization_error"),
            hint="for c in 1/grid, 2/grid, ..., 1: s = c * max|x| / q_max, error of "
                 "s * clamp(round(x / s), -q_max, q_max); return the c with the least MSE "
                 "(the smallest c among ties)"),
        Exercise(
            name="pack_nibbles", points=2, title="Two int4 values per byte",
            expected=_expected(_pack_ref), adapter=ADAPTER, compare=_exact_array,
            public=(Case((tensor_arg([1, 2], "int8"),), label="[1, 2] -> 0x21"),
                    Case((tensor_arg([[-1, 0, 7, -8]], "int8"),), label="negative values"),
                    Case((tensor_arg([1, 2, 3], "int8"),), raises="ValueError",
                         label="odd length", hint="the last dimension must be even")),
            hidden=_hidden_pack,
            references=("utils.quantization.pack_int4",),
            hint="low nibble = element 2i & 0xF, high nibble = element 2i+1 & 0xF, "
                 "byte = low | (high << 4), as uint8"),
        Exercise(
            name="unpack_nibbles", points=2, title="Unpacking int4 with sign extension",
            expected=_expected(_unpack_ref), adapter=ADAPTER, compare=_exact_array,
            public=(Case((tensor_arg([0x21], "uint8"),), label="0x21 -> [1, 2]"),
                    Case((tensor_arg([[0x0F, 0x87]], "uint8"),), label="negative nibbles")),
            hidden=_hidden_unpack,
            references=("utils.quantization.unpack_int4",),
            hint="low = byte & 0xF, high = byte >> 4; a nibble v >= 8 stands for v - 16; "
                 "interleave low, high"),
        Exercise(
            name="mxfp4_block", points=2, title="One MXFP4 block (OCP microscaling)",
            expected=_expected(_mxfp4_ref), adapter=ADAPTER,
            compare=array_close(rtol=1e-6, atol=0.0),
            public=(Case((tensor_arg([7.5, 0.25, 0.75, -1.25, 2.5, 5.0, -0.2, 0.0] + [0.0] * 24),),
                         label="max 7.5: X = 1, 7.5 saturates to 6, ties go to the even code"),
                    Case((tensor_arg([0.01 * i for i in range(-16, 16)]),),
                         label="small values: X = 2^-5"),
                    Case((tensor_arg([1.0] * 20),), raises="ValueError", label="20 values",
                         hint="raise ValueError unless the last dimension is a multiple of 32")),
            hidden=_hidden_mxfp4,
            references=("utils.quantization.mxfp4_quantize",),
            hint="per block of 32: e = floor(log2(max|v|)), X = 2**(e - 2) (1 for an all-zero "
                 "block); round |v|/X to the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (above 6 -> 6; "
                 "a tie goes to 0, 1, 2 or 4), restore the sign, multiply by X"),
    ),
)
