"""The learner's self-check: ``check(my_function)`` under each lab exercise.

It runs the exercise's public cases (from ``utils.labs.specs``) and prints one line per case: pass,
or fail with the expected value, what the function returned and a hint. Hidden cases are graded
on submission (``utils.labs.grade``) and never shown here. It works the same in JupyterLab and
Colab and needs nothing beyond the course's requirements.

``check`` never raises and never shows a traceback from its own code: when the learner's function
raises, it prints that exception with the learner's own frames only. A value exercise (a
multiple-choice answer) is checked with ``check(ANSWER_X, "ANSWER_X")``.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

from utils.labs.spec import Case, Exercise, LabSpec, all_specs
from utils.labs.sandbox import to_plain

_OWN_FILES = (str(Path(__file__).resolve().parent.parent),)  # frames under utils/ are ours, not theirs
PASS, FAIL = "✅", "❌"
MAX_FRAMES = 6  # a learner's deep recursion shows its last frames only


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


def check(obj, name: str | None = None) -> None:
    """Run the public cases of the exercise ``obj`` answers and print the outcome of each."""
    if os.environ.get("COURSE_GRADING"):
        return
    try:
        spec, exercise = find_exercise(obj, name)
    except LookupError as e:
        print(f"{FAIL} check: {e}")
        return
    except Exception as e:  # a broken spec must not look like the learner's fault
        print(f"{FAIL} check could not load the lab specs ({type(e).__name__}: {e}); "
              "tell your instructor")
        return
    points = f"{exercise.points:g} point{'s' if exercise.points != 1 else ''}"
    print(f"{spec.lab} · {exercise.title} · {exercise.name} ({points})")
    if exercise.kind == "function" and not callable(obj):
        print(f"{FAIL} {exercise.name} should be a function, got {type(obj).__name__}")
        return
    passed = total = 0
    try:
        for number, case in enumerate(exercise.public, 1):
            total += case.graded
            outcome = _run_case(exercise, case, obj, number)
            if outcome == "stop":
                break
            passed += outcome is True and case.graded
    except KeyboardInterrupt:
        print("interrupted")
        return
    graded = sum(c.graded for c in exercise.public)
    if graded:
        print(f"{passed}/{graded} public checks pass; hidden cases are graded on submission.")
    else:
        print("format checked; the answer itself is graded on submission.")


def _run_case(exercise: Exercise, case: Case, obj, number: int):
    label = f"case {number} ({case.describe()})"
    hint = case.hint or exercise.hint
    try:
        expected = to_plain(exercise.expected_for(case))
    except Exception as e:
        print(f"{FAIL} {label}: the check itself failed ({type(e).__name__}); tell your "
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
                print(f"{FAIL} not implemented yet: replace `raise NotImplementedError()` in "
                      f"{exercise.name} with your code")
                return "stop"
            return _report_exception(e, case, label, hint)
        except Exception as e:
            return _report_exception(e, case, label, hint)
        got = to_plain(result)
    try:
        reason = exercise.comparator(case)(expected, got)
    except Exception as e:
        reason = f"could not compare the result ({type(e).__name__})"
    if reason is None:
        print(f"{PASS} {label}")
        return True
    print(f"{FAIL} {label}: {reason}" + (f"\n   hint: {hint}" if hint else ""))
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


def _report_exception(e: Exception, case: Case, label: str, hint: str):
    bases = [c.__name__ for c in type(e).__mro__]
    if case.raises and case.raises in bases:
        print(f"{PASS} {label}: raised {type(e).__name__} as it should")
        return True
    want = f"expected {case.raises}, but your code raised" if case.raises else "your code raised"
    print(f"{FAIL} {label}: {want} {type(e).__name__}: {e}")
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(_OWN_FILES)]
    if frames:
        print("   where (your code, innermost last):")
        if len(frames) > MAX_FRAMES:
            print(f"   ... {len(frames) - MAX_FRAMES} more frames ...")
        for frame in frames[-MAX_FRAMES:]:
            print(f"   {_cell_name(frame.filename)}, line {frame.lineno}, in {frame.name}")
            if frame.line:
                print(f"      {frame.line}")
    if hint:
        print(f"   hint: {hint}")
    return False
