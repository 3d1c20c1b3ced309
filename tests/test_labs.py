"""Lab generation from masters, the specs' consistency, and the learner's ``check``."""

from __future__ import annotations

import importlib

import nbformat
import pytest

from utils.labs import generate as labs
from utils.labs.check import check, find_exercise
from utils.labs.generate import MarkerError, clear_solutions, make_lab
from utils.labs.spec import all_specs, load_spec
from utils.labs.spec import Case, resolve
from utils.nbtools import RAISES, code, markdown, new_notebook
from utils.paths import LABS_DIR, SOLUTIONS_DIR

# --------------------------------------------------------------------------- generation


def test_labs_are_in_sync_with_their_masters():
    assert labs.generate(check=True) == [], "run: python -m utils.labs generate"


def test_clear_solutions_keeps_indentation_and_the_rest():
    source = ("def f(x):\n    \"\"\"Doc.\"\"\"\n    ### BEGIN SOLUTION\n    y = x + 1\n"
              "    return y\n    ### END SOLUTION\n\nANSWER = None\n### BEGIN SOLUTION\n"
              "ANSWER = 'b'\n### END SOLUTION")
    cleared, regions = clear_solutions(source)
    assert cleared == ("def f(x):\n    \"\"\"Doc.\"\"\"\n    # YOUR CODE HERE\n"
                       "    raise NotImplementedError()\n\nANSWER = None\n# YOUR ANSWER HERE")
    assert regions == [(4, "    y = x + 1\n    return y"), (0, "ANSWER = 'b'")]


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1", "without ### END"),
    ("x = 1\n### END SOLUTION", "without ### BEGIN"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another"),
])
def test_unpaired_markers_are_errors(source, message):
    with pytest.raises(MarkerError, match=message):
        clear_solutions(source)


def test_a_solution_region_in_a_class_body_is_an_error():
    whole_body = "class C:\n    ### BEGIN SOLUTION\n    def f(self):\n        return 1\n    ### END SOLUTION"
    with pytest.raises(MarkerError, match="class C"):
        make_lab(new_notebook([code(whole_body)]))
    per_method = "class C:\n    def f(self):\n        ### BEGIN SOLUTION\n        return 1\n        ### END SOLUTION"
    lab = make_lab(new_notebook([code(per_method)]))
    assert "raise NotImplementedError()" in lab.cells[-1].source


def test_make_lab_tags_exactly_the_cells_that_will_raise():
    master = new_notebook([
        markdown("# A lab"),
        code("from utils.labs.check import check"),
        code("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION"),
        code("check(f)"),
        code("print(f(2))"),
        code("y = 3\nz = [f(i) for i in range(y)]"),
        code("print(z)"),               # z only exists if the cell above ran
        code("print(y + 1)", "some-tag"),
        code("ANSWER = None\n### BEGIN SOLUTION\nANSWER = 'b'\n### END SOLUTION"),
        code("check(ANSWER, 'ANSWER')"),
        code("### BEGIN SOLUTION\nHIDDEN = 2\n### END SOLUTION"),
        code("print(HIDDEN)"),         # only the answer defines HIDDEN
    ])
    master.cells[2].outputs = [nbformat.v4.new_output("stream", text="x")]
    master.cells[2].execution_count = 3
    lab = make_lab(master)
    tags = [c.metadata.get("tags", []) for c in lab.cells if c.cell_type == "code"]
    raising = [RAISES in t for t in tags]
    #        setup  import  def    check  f(2)  z=    print(z) y+1   ANSWER check HIDDEN print
    assert raising == [False, False, False, False, True, True, True, False, False, False, False,
                       True]
    assert tags[7] == ["some-tag"]
    assert all(c.outputs == [] and c.execution_count is None
               for c in lab.cells if c.cell_type == "code")
    assert "return x" not in lab.cells[3].source and "BEGIN SOLUTION" not in str(lab)


def test_generated_lab_holds_no_answer_and_no_output():
    for spec in all_specs():
        text = (LABS_DIR / spec.notebook).read_text(encoding="utf-8")
        nb = nbformat.reads(text, as_version=4)
        assert "BEGIN SOLUTION" not in text
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None
        if spec.lab == "lab00":
            assert 'ANSWER_DECODE_BOUND = "b"' not in text
            assert "math.ceil(p * n / 100)" not in text


def test_generate_writes_and_detects_drift(tmp_path):
    written = labs.generate(labs_dir=tmp_path)
    assert written and labs.generate(check=True, labs_dir=tmp_path) == []
    target = tmp_path / load_spec("lab00").notebook
    target.write_text(target.read_text() + " ")
    (tmp_path / "lab99_orphan.ipynb").write_text("{}")
    problems = labs.generate(check=True, labs_dir=tmp_path)
    assert any("differs" in p for p in problems) and any("no master" in p for p in problems)
    labs.generate(labs_dir=tmp_path)
    assert not (tmp_path / "lab99_orphan.ipynb").exists()


# --------------------------------------------------------------------------- specs


def test_specs_are_consistent_with_their_notebooks():
    seen = {}
    for spec in all_specs():
        master = nbformat.read(SOLUTIONS_DIR / spec.notebook, as_version=4)
        text = "\n".join(c.source for c in master.cells)
        for exercise in spec.exercises:
            assert exercise.name not in seen, f"{exercise.name} in {seen.get(exercise.name)}"
            seen[exercise.name] = spec.lab
            for ref in exercise.references:
                assert callable(resolve(ref)), ref
                module = importlib.import_module(ref.rpartition(".")[0])
                assert not hasattr(module, exercise.name), f"{exercise.name} shadows {module}"
            points = f"({exercise.points:g} point{'s' if exercise.points != 1 else ''})"
            headings = [c.source for c in master.cells if c.cell_type == "markdown"
                        and c.source.startswith("## ") and points in c.source.split("\n")[0]]
            assert headings, f"no '## ... {points}' heading for {exercise.name}"
            if exercise.kind == "function":
                assert f"def {exercise.name}(" in text or f"class {exercise.name}" in text
                assert f"check({exercise.name})" in text
            else:
                assert f'check({exercise.name}, "{exercise.name}")' in text
            assert exercise.public, f"{exercise.name} has no public case"
            assert exercise.hidden, f"{exercise.name} has no hidden case"


def test_exercise_and_spec_validate_their_arguments():
    from utils.labs.spec import Exercise, LabSpec

    with pytest.raises(ValueError, match="points"):
        Exercise(name="x", points=0, title="t", expected=lambda: 1)
    with pytest.raises(ValueError, match="identifier"):
        Exercise(name="not a name", points=1, title="t", expected=lambda: 1)
    with pytest.raises(ValueError, match="kind"):
        Exercise(name="x", points=1, title="t", expected=lambda: 1, kind="essay")
    e = Exercise(name="x", points=1, title="t", expected=lambda: 1)
    with pytest.raises(ValueError, match="unique"):
        LabSpec(lab="lab99", notebook="x.ipynb", title="t", exercises=(e, e))


# --------------------------------------------------------------------------- check()


def _kv_right(num_layers, num_heads, num_kv_heads, hidden_size, seq_len, batch_size=1,
              bytes_per_value=2):
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("shapes")
    return 2 * num_layers * num_kv_heads * (hidden_size // num_heads) * seq_len * batch_size \
        * bytes_per_value


def _named(fn, name):
    fn.__name__ = name
    return fn


def test_check_passes_a_right_answer(capsys):
    result = check(_named(_kv_right, "kv_cache_bytes_gqa"))
    out = str(result)
    assert "(3 points)" in out and "4/4 public checks pass" in out and "❌" not in out
    assert result.ok and (result.passed, result.graded) == (4, 4)
    assert capsys.readouterr().out == ""  # it returns what it found; Jupyter displays it
    assert "#2e7d32" in result._repr_html_() and "4/4 public checks pass" in result._repr_html_()


def test_check_shows_expected_got_and_hint_for_a_wrong_answer():
    def kv_cache_bytes_gqa(num_layers, num_heads, num_kv_heads, hidden_size, seq_len,
                           batch_size=1, bytes_per_value=2):
        head_dim = hidden_size // num_kv_heads  # the classic mistake
        return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch_size * bytes_per_value

    out = str(check(kv_cache_bytes_gqa))
    assert "❌ case 2 (same with 8 KV heads (GQA)): expected 536870912, got 2147483648" in out
    assert "hint: 2 (K and V)" in out and "Traceback" not in out


def test_check_shows_the_learners_exception_as_theirs():
    def gemv_intensity(d_in, d_out, bytes_per_value=2):
        return helper_that_divides(d_in)

    def helper_that_divides(d):
        return d / 0

    out = str(check(gemv_intensity))
    assert "your code raised ZeroDivisionError: division by zero" in out
    assert "in helper_that_divides" in out and "test_labs.py" in out
    assert "utils/labs/check.py" not in out and "labspecs" not in out and "Traceback" not in out


def test_check_says_not_implemented_once_for_a_stub():
    def matmul_intensity(m, k, n, bytes_per_value=2):
        raise NotImplementedError()

    out = str(check(matmul_intensity))
    assert out.count("not implemented yet") == 1 and "Traceback" not in out


def test_check_is_not_fooled_by_an_object_equal_to_everything():
    class Always:
        def __eq__(self, other):
            return True

    out = str(check(_named(lambda *a, **k: Always(), "decode_tokens_per_second")))
    assert "✅ case" not in out and "an object of type Always" in out


def test_check_never_shows_hidden_cases_or_the_mcq_answer():
    spec = load_spec("lab00")
    import random

    outputs = []
    for answer in "abcd":  # the self-check must say the same whatever the letter
        outputs.append(str(check(answer, "ANSWER_DECODE_BOUND")))
    assert len(set(outputs)) == 1 and "format checked" in outputs[0]
    out = str(check(_named(_kv_right, "kv_cache_bytes_gqa")))
    for exercise in spec.exercises:
        for case in exercise.hidden(random.Random(spec.seed)):
            if case.args:
                assert case.describe() not in out


def test_check_handles_misuse_without_a_traceback():
    out = "\n".join(str(check(*args)) for args in [
        (lambda: 1,), (3,), (_named(lambda: 1, "no_such_exercise"),), (5, "matmul_intensity")])
    assert "no lab exercise is called '<lambda>'" in out
    assert "pass the exercise name for a value" in out
    assert "no lab exercise is called 'no_such_exercise'" in out
    assert "should be a function, got int" in out
    assert "Traceback" not in out


def test_check_reports_a_broken_spec_as_the_checks_fault(monkeypatch):
    from utils.labs import check as checks
    from utils.labs.spec import Exercise

    exercise = Exercise(name="matmul_intensity", points=1, title="t",
                        expected=lambda *a: 1 / 0, public=(Case((1, 1, 1, 2)),))
    spec = load_spec("lab00")
    monkeypatch.setattr(checks, "find_exercise", lambda obj, name=None: (spec, exercise))
    out = str(check(_named(lambda *a: 1.0, "matmul_intensity")))
    assert "the check itself failed" in out and "Traceback" not in out


def test_find_exercise_by_name_and_value():
    spec, exercise = find_exercise(None, "ANSWER_DECODE_BOUND")
    assert spec.lab == "lab00" and exercise.kind == "value"
    with pytest.raises(LookupError):
        find_exercise(1, 2)
