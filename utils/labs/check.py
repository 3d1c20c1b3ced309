"""The learner's self-check: ``check(my_function)`` under each lab exercise.

It runs the exercise's public cases (from ``utils.labs.specs``) and returns a ``CheckResult``,
which Jupyter shows (as the cell's last expression) as one line per case: pass, or fail with the
expected value, what the function returned and a hint; ``str(result)`` is the same text. Hidden cases are graded
on submission (``utils.labs.grade``) and never shown here. It works the same in JupyterLab and
Colab and needs nothing beyond the course's requirements.

``check`` never raises and never shows a traceback from its own code: when the learner's function
raises, it shows that exception with the learner's own frames only. A value exercise (a
multiple-choice answer) is checked with ``check(ANSWER_X, "ANSWER_X")``.
"""

from __future__ import annotations

import html
import json
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from utils.labs.spec import Case, Exercise, LabSpec, all_specs
from utils.labs.sandbox import to_plain

_OWN_FILES = (str(Path(__file__).resolve().parent.parent),)  # frames under utils/ are ours, not theirs
PASS, FAIL = "✅", "❌"
MAX_FRAMES = 6  # a learner's deep recursion shows its last frames only


@dataclass
class CheckResult:
    """What ``check`` found: the lines it shows and the public checks passed out of graded.
    Renders itself in Jupyter (HTML with a coloured edge, or plain text)."""

    lines: list[str] = field(default_factory=list)
    passed: int = 0
    graded: int = 0

    @property
    def ok(self) -> bool:
        """Every graded public case passed (and there was one)."""
        return self.graded > 0 and self.passed == self.graded

    def add(self, line: str) -> None:
        self.lines.append(line)

    def __str__(self) -> str:
        return "\n".join(self.lines)

    __repr__ = __str__

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython's plain-text display
        printer.text(str(self))

    def _repr_html_(self) -> str:
        colour = "#2e7d32" if self.ok else "#c62828" if FAIL in str(self) else "#757575"
        return (f'<pre style="border-left: 4px solid {colour}; padding-left: 8px; '
                f'white-space: pre-wrap">{html.escape(str(self))}</pre>')


def find_exercise(obj, name: str | None = None) -> tuple[LabSpec, Exercise]:
    """The (lab, exercise) that ``check(obj, name)`` refers to: by ``name``, else by the
    function's ``__name__``. ``LookupError`` with what to do when there is none."""
    if name is None:
        if not callable(obj):
            raise LookupError("pass the exercise name for a value: check(ANSWER_X, 'ANSWER_X')")
        name = getattr(obj, "__name__", None)
    if not isinstance(name, str):
        raise LookupError(f"the exercise name must be a str, got {type(name).__name__}")
    for spec in all_specs():
        for exercise in spec.exercises:
            if exercise.name == name:
                return spec, exercise
    raise LookupError(f"no lab exercise is called {name!r}: keep the function name the lab gave")


def check(obj, name: str | None = None) -> CheckResult:
    """Run the public cases of the exercise ``obj`` answers; the result shows each outcome."""
    result = CheckResult()
    if os.environ.get("COURSE_GRADING"):
        return result
    out = result.add
    try:
        spec, exercise = find_exercise(obj, name)
    except LookupError as e:
        out(f"{FAIL} check: {e}")
        return result
    except Exception as e:  # a broken spec must not look like the learner's fault
        out(f"{FAIL} check could not load the lab specs ({type(e).__name__}: {e}); "
            "tell your instructor")
        return result
    points = f"{exercise.points:g} point{'s' if exercise.points != 1 else ''}"
    out(f"{spec.lab} · {exercise.title} · {exercise.name} ({points})")
    if exercise.kind == "function" and not callable(obj):
        out(f"{FAIL} {exercise.name} should be a function, got {type(obj).__name__}")
        return result
    passed = total = 0
    try:
        for number, case in enumerate(exercise.public, 1):
            total += case.graded
            outcome = _run_case(exercise, case, obj, number, out)
            if outcome == "stop":
                break
            passed += outcome is True and case.graded
    except KeyboardInterrupt:
        out("interrupted")
        return result
    graded = sum(c.graded for c in exercise.public)
    result.passed, result.graded = passed, graded
    if graded:
        out(f"{passed}/{graded} public checks pass; hidden cases are graded on submission.")
    else:
        out("format checked; the answer itself is graded on submission.")
    return result


def _run_case(exercise: Exercise, case: Case, obj, number: int, out):
    label = f"case {number} ({case.describe()})"
    hint = case.hint or exercise.hint
    try:
        expected = to_plain(exercise.expected_for(case))
    except Exception as e:
        out(f"{FAIL} {label}: the check itself failed ({type(e).__name__}); tell your "
            "instructor")
        return False
    if exercise.kind == "value":
        got = to_plain(obj)
    else:
        plain = json.loads(json.dumps({"args": list(case.args), "kwargs": case.kwargs}))
        try:
            if exercise.adapter:
                result = _adapter(exercise.adapter)(obj, *plain["args"], **plain["kwargs"])
            else:
                result = obj(*plain["args"], **plain["kwargs"])
        except NotImplementedError as e:
            if _raised_in_learner_code(e) and not str(e):
                out(f"{FAIL} not implemented yet: replace `raise NotImplementedError()` in "
                    f"{exercise.name} with your code")
                return "stop"
            return _report_exception(e, case, label, hint, out)
        except Exception as e:
            return _report_exception(e, case, label, hint, out)
        got = to_plain(result)
    try:
        reason = exercise.comparator(case)(expected, got)
    except Exception as e:
        reason = f"could not compare the result ({type(e).__name__})"
    if reason is None:
        out(f"{PASS} {label}")
        return True
    out(f"{FAIL} {label}: {reason}" + (f"\n   hint: {hint}" if hint else ""))
    return False


def _cell_name(filename: str) -> str:
    """``Cell In[5]`` for a notebook cell (as IPython names it), else the file name."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            kind, name = shell.compile.format_code_name(filename) or (None, None)
            if kind:
                return f"{kind} {name}"
    except Exception:
        pass
    return f'File "{filename}"'


def _adapter(dotted: str):
    import importlib

    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _raised_in_learner_code(e: BaseException) -> bool:
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and not last.startswith(_OWN_FILES)


def _report_exception(e: Exception, case: Case, label: str, hint: str, out):
    bases = [c.__name__ for c in type(e).__mro__]
    if case.raises and case.raises in bases:
        out(f"{PASS} {label}: raised {type(e).__name__} as it should")
        return True
    want = f"expected {case.raises}, but your code raised" if case.raises else "your code raised"
    out(f"{FAIL} {label}: {want} {type(e).__name__}: {e}")
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(_OWN_FILES)]
    if frames:
        out("   where (your code, innermost last):")
        if len(frames) > MAX_FRAMES:
            out(f"   ... {len(frames) - MAX_FRAMES} more frames ...")
        for frame in frames[-MAX_FRAMES:]:
            out(f"   {_cell_name(frame.filename)}, line {frame.lineno}, in {frame.name}")
            if frame.line:
                out(f"      {frame.line}")
    if hint:
        out(f"   hint: {hint}")
    return False
