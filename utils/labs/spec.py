"""What a lab's grading spec is made of: exercises, cases, comparisons.

One small module per lab (``utils/labs/specs/labNN.py``) defines ``SPEC = LabSpec(...)``. The same
spec serves the learner's self-check (``utils.labs.check.check``: public cases only) and the batch
autograder (``utils.labs.grade``: public and hidden cases, points, reference implementations the
answer must not merely call). See ``solutions/README.md`` for the authoring guide.

Everything a case holds (``args``, ``kwargs``) is plain JSON (numbers, strings, lists, dicts):
the grader sends it to the sandboxed submission, which sends back only a plain value; expected
values are computed and compared here, in the grading process, never in the submission's.
"""

from __future__ import annotations

import importlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

LAB_MODULE = "utils.labs.specs.{lab}"


@dataclass(frozen=True)
class Case:
    """One call of the learner's function: ``fn(*args, **kwargs)``.

    ``raises``: the exception class name expected instead of a value (for bad-input cases).
    ``compare``: overrides the exercise's comparison for this case. ``graded=False`` keeps a
    public case out of the score (format checks such as "the answer is one of a-d").
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    label: str = ""
    hint: str = ""
    raises: str | None = None
    compare: Callable[[Any, Any], str | None] | None = None
    expected: Any = None  # a fixed expected value; None means "compute it with Exercise.expected"
    graded: bool = True

    def describe(self) -> str:
        if self.label:
            return self.label
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = ", ".join(parts)
        return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True)
class Exercise:
    """One graded item.

    name        the function (``kind='function'``) or variable (``kind='value'``) the learner
                defines; unique across all labs, and never the name of a ``utils`` function.
    points      the points it is worth (declared here only; ``check`` and the grader show them).
    expected    ``expected(*args, **kwargs) -> plain value`` for a case, usually built on the
                reference implementation in ``utils`` (runs in the grading process only).
    public      cases the learner's ``check`` runs and shows (with expected values).
    hidden      ``hidden(rng) -> list[Case]``: graded but never shown; ``rng`` is a seeded
                ``random.Random``, so grading is deterministic.
    references  dotted names of ``utils`` functions this answer must not merely call.
    compare     ``compare(expected, got) -> None`` when equal, else a reason (str).
    adapter     "module:function" run inside the sandbox as ``adapter(fn, *args, **kwargs)``
                when plain JSON arguments are not enough (e.g. to build a fake clock).
    """

    name: str
    points: float
    title: str
    expected: Callable[..., Any]
    public: tuple[Case, ...] = ()
    hidden: Callable[[random.Random], list[Case]] | None = None
    references: tuple[str, ...] = ()
    compare: Callable[[Any, Any], str | None] | None = None
    adapter: str | None = None
    kind: str = "function"
    hint: str = ""

    def __post_init__(self):
        if self.kind not in ("function", "value"):
            raise ValueError(f"kind must be 'function' or 'value', got {self.kind!r}")
        if not (isinstance(self.points, (int, float)) and self.points > 0):
            raise ValueError(f"points must be a positive number, got {self.points!r}")
        if not self.name.isidentifier():
            raise ValueError(f"name must be a Python identifier, got {self.name!r}")

    def comparator(self, case: Case) -> Callable[[Any, Any], str | None]:
        return case.compare or self.compare or close()

    def expected_for(self, case: Case) -> Any:
        if case.raises is not None:
            return {"raises": case.raises}
        if case.expected is not None:
            return case.expected
        return self.expected(*case.args, **case.kwargs)

    def graded_cases(self, rng: random.Random) -> list[Case]:
        """Public (graded) cases first, then the hidden ones, in a fixed order."""
        hidden = list(self.hidden(rng)) if self.hidden else []
        return [c for c in self.public if c.graded] + hidden


@dataclass(frozen=True)
class LabSpec:
    """A lab: its id (``lab00``), the notebook file name shared by solutions/ and labs/, the
    exercises in notebook order, the seed for hidden cases and the sandbox limits."""

    lab: str
    notebook: str
    title: str
    exercises: tuple[Exercise, ...]
    seed: int = 0
    timeout_s: float = 60.0       # wall clock for one submission (all cells and calls)
    cell_timeout_s: float = 20.0  # one notebook cell
    call_timeout_s: float = 10.0  # one call of the learner's function
    memory_mb: int = 2048         # address-space limit of the sandboxed process
    preimport: tuple[str, ...] = ()  # modules imported in the sandbox before student code
    # files outside utils/ that grading reads (repository-relative); the Gradescope bundle packs them
    repo_files: tuple[str, ...] = ()

    def __post_init__(self):
        names = [e.name for e in self.exercises]
        if len(set(names)) != len(names):
            raise ValueError(f"exercise names must be unique in {self.lab}, got {names}")

    def exercise(self, name: str) -> Exercise:
        for e in self.exercises:
            if e.name == name:
                return e
        raise KeyError(f"{self.lab} has no exercise named {name!r}; "
                       f"it has {[e.name for e in self.exercises]}")

    @property
    def total_points(self) -> float:
        return sum(e.points for e in self.exercises)


def load_spec(lab: str) -> LabSpec:
    """``load_spec("lab00")`` imports ``utils.labs.specs.lab00`` and returns its ``SPEC``."""
    if not (isinstance(lab, str) and lab.startswith("lab") and lab[3:].isdigit()):
        raise ValueError(f"lab must look like 'lab00', got {lab!r}")
    try:
        module = importlib.import_module(LAB_MODULE.format(lab=lab))
    except ModuleNotFoundError as e:
        if e.name == LAB_MODULE.format(lab=lab):
            raise ValueError(f"no grading spec for {lab!r}: expected "
                             f"utils/labs/specs/{lab}.py defining SPEC") from None
        raise
    return module.SPEC


def all_specs() -> list[LabSpec]:
    from utils.paths import REPO_ROOT

    return [load_spec(p.stem) for p in sorted((REPO_ROOT / "utils" / "labs" / "specs").glob("lab*.py"))]


def resolve(dotted: str):
    """``"utils.roofline.kv_cache_bytes"`` -> the function object."""
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------- comparisons
# Each returns None when ``got`` matches ``expected``, else a short reason a learner can act on.
# ``got`` is always a plain value decoded from JSON (``utils.labs.sandbox.to_plain``), never a learner
# object, so no learner ``__eq__`` runs here.

def _is_number(x) -> bool:
    return type(x) in (int, float)


def _num(x):
    if isinstance(x, dict) and set(x) == {"__float__"}:
        return float(x["__float__"])
    return x


def close(rel_tol: float = 1e-6, abs_tol: float = 1e-12):
    """Numbers equal to a relative tolerance (an int and an equal float both pass)."""

    def compare(expected, got):
        got = _num(got)
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        if not _is_number(got):
            return f"expected a number, got {_show(got)}"
        if math.isnan(got) or not math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol):
            return f"expected {_fmt(expected)}, got {_fmt(got)}"
        return None

    return compare


def exact():
    """Equal JSON values (same type family: a string is not a number)."""

    def compare(expected, got):
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        if type(expected) is not type(got) and not (_is_number(expected) and _is_number(got)):
            return f"expected {_show(expected)}, got {_show(got)}"
        return None if got == expected else f"expected {_show(expected)}, got {_show(got)}"

    return compare


def dict_close(rel_tol: float = 1e-6, abs_tol: float = 1e-12):
    """A dict with exactly the expected keys, each value a number close to the expected one."""
    number = close(rel_tol, abs_tol)

    def compare(expected, got):
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        if not isinstance(got, dict) or "__error__" in got:
            return f"expected a dict with keys {sorted(expected)}, got {_show(got)}"
        if set(got) != set(expected):
            return f"expected keys {sorted(expected)}, got keys {sorted(got)}"
        for key in expected:
            reason = number(expected[key], got[key])
            if reason:
                return f"[{key!r}] {reason}"
        return None

    return compare


def choice():
    """A multiple-choice answer: equal to the expected letter; the reason does not reveal it."""

    def compare(expected, got):
        if type(got) is not str:
            return f"the answer must be a letter in quotes, got {_show(got)}"
        return None if got.strip().lower() == expected else f"{got!r} is not the right answer"

    return compare


def one_of(options):
    """A format check (for ``graded=False`` cases): the value is one of ``options``."""

    def compare(expected, got):
        return None if got in list(options) and type(got) is str else \
            f"expected one of {list(options)}, got {_show(got)}"

    return compare


def _compare_raises(expected, got):
    if isinstance(got, dict) and (got.get("__raised__") == expected["raises"]
                                  or expected["raises"] in got.get("__bases__", ())):
        return None
    if isinstance(got, dict) and "__raised__" in got:
        return f"expected {expected['raises']}, but it raised {got['__raised__']}"
    return f"expected {expected['raises']} to be raised, got {_show(got)}"


def _fmt(x) -> str:
    if type(x) is float:
        return f"{x:.6g}"
    return repr(x)


def _show(x, limit: int = 80) -> str:
    if isinstance(x, dict) and "__raised__" in x:
        return f"an exception {x['__raised__']}"
    if isinstance(x, dict) and "__unplain__" in x:
        return f"an object of type {x['__unplain__']} (return a plain number, str, list or dict)"
    text = _fmt(x)
    return text if len(text) <= limit else text[:limit] + "..."


def array_close(rtol: float = 1e-5, atol: float = 1e-6):
    """Arrays (tensors or numpy arrays, plain-encoded) of the same shape, close elementwise."""

    def compare(expected, got):
        if isinstance(expected, dict) and "raises" in expected:
            return _compare_raises(expected, got)
        if not (isinstance(got, dict) and "__array__" in got):
            return f"expected a tensor of shape {expected['shape']}, got {_show(got)}"
        if got["shape"] != expected["shape"]:
            return f"expected shape {expected['shape']}, got shape {got['shape']}"
        flat_e, flat_g = _flatten(expected["__array__"]), _flatten(got["__array__"])
        for i, (e, g) in enumerate(zip(flat_e, flat_g)):
            e, g = _num(e), _num(g)
            if not _is_number(g) or math.isnan(g) or abs(g - e) > atol + rtol * abs(e) \
                    or (math.isinf(e) or math.isinf(g)) and g != e:  # inf - inf tolerances pass
                return (f"element {i} (flat index) differs: expected {_fmt(e)}, got {_fmt(g)} "
                        f"(rtol={rtol}, atol={atol})")
        return None

    return compare


def _flatten(x):
    if isinstance(x, list):
        return [v for item in x for v in _flatten(item)]
    return [x]


# --------------------------------------------------------------------------- tensor arguments

def tensor_arg(values, dtype: str = "float32") -> dict:
    """A case argument that ``call_with_tensors`` turns into ``torch.tensor(values, dtype)``."""
    return {"__tensor__": values, "dtype": dtype}


def _to_tensors(x):
    if isinstance(x, dict) and "__tensor__" in x:
        import torch

        return torch.tensor(x["__tensor__"], dtype=getattr(torch, x["dtype"]))
    if isinstance(x, list):
        return [_to_tensors(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_tensors(v) for k, v in x.items()}
    return x


def call_with_tensors(fn, *args, **kwargs):
    """Adapter: ``fn`` called with every ``tensor_arg(...)`` turned into a torch tensor."""
    return fn(*_to_tensors(list(args)), **_to_tensors(kwargs))
