"""Hostile submissions for every lab: one per attack class of the red-team report (issue 10).

``build_lab_batch(lab, folder, ctx)`` writes, next to honest classmates, a submission per attack
built from that lab's master (the attack is an extra cell, so an attack that is stopped costs
nothing) or its blank lab. ``ctx`` names the grader's things a submission must not reach: the
output files, the private cases file, a canary folder, a classmate's file, the course's
``utils/__init__.py``, site-packages, an instructor file; and the secret markers that must not
appear in any output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nbformat

from utils.labs.spec import load_spec
from utils.paths import LABS_DIR, SOLUTIONS_DIR

SECRET_PREFIX = "GRADER-SECRET-"


@dataclass
class Context:
    folder: Path        # the batch's submissions
    canary: Path        # an empty folder outside every sandbox: must stay empty
    classmate: Path     # an honest classmate's notebook in the batch
    out: Path           # the --out CSV
    json: Path          # the --json file
    private: Path       # the --private cases file (mode 600)
    utils_init: Path
    site_packages: Path
    instructor: Path    # an instructor's file (mode 644)
    secrets: tuple      # strings that must appear in no output


@dataclass
class Expect:
    total: float | None = None      # exact total, or None for "full marks"
    at_most: float | None = None    # an upper bound instead of an exact total
    fragments: tuple = ()           # must appear in the JSON report
    max_seconds: float | None = None


def _nb(lab: str, blank: bool):
    spec = load_spec(lab)
    return nbformat.read((LABS_DIR if blank else SOLUTIONS_DIR) / spec.notebook, as_version=4)


def _after_check_import(nb, source: str):
    i = next(i for i, c in enumerate(nb.cells) if "from utils.labs.check import check" in c.source)
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(source))
    return nb


def _append(nb, *sources: str):
    for s in sources:
        nb.cells.append(nbformat.v4.new_code_cell(s))
    return nb


PRELUDE = '''
import os, sys, json
def _try(label, fn):
    try:
        fn()
        print("ESCAPED:", label)
    except BaseException as e:
        print("blocked:", label, type(e).__name__)
'''

ESCAPE = PRELUDE + '''
CANARY, OUT = {canary!r}, {out!r}
def _fork_exec():
    import _posixsubprocess
    script = f"sleep 2; echo forged > {{OUT}}; touch {{CANARY}}/fork_exec"
    r, w = os.pipe()
    _posixsubprocess.fork_exec([b"/bin/sh", b"-c", script.encode()], [b"/bin/sh"], True, (),
                               None, None, -1, -1, -1, -1, -1, -1, r, w, False, True, -1,
                               None, None, None, -1, None)
_try("fork_exec", _fork_exec)
def _reimport():
    sys.modules.pop("_posixsubprocess", None)
    import _posixsubprocess
    _posixsubprocess.fork_exec
_try("re-import _posixsubprocess", _reimport)
_try("ctypes fork", lambda: __import__("ctypes").CDLL(None).fork())
def _settrace():
    def tracer(frame, event, arg):
        import ctypes
        ctypes.CDLL(None).syscall(57)
    sys.settrace(tracer)
    import json.tool, wave
_try("settrace in a trusted import", _settrace)
_try("settrace off", lambda: sys.settrace(None))
def _pidfd():
    import signal
    fd = os.pidfd_open(os.getppid())
    signal.pidfd_send_signal(fd, signal.SIGKILL)
_try("pidfd", _pidfd)
def _pidfd_all():
    import signal
    sent = 0
    for pid in range(2, 64):
        try:
            signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)
            sent += 1
        except OSError:
            pass
    if not sent:
        raise PermissionError("no pidfd")
_try("pidfd every pid", _pidfd_all)
_try("kill parent", lambda: os.kill(os.getppid(), 9))
_try("kill everyone", lambda: os.kill(-1, 9))
_try("popen", lambda: __import__("subprocess").Popen(["/bin/sh", "-c", f"touch {{CANARY}}/popen"]))
_try("system", lambda: os.system(f"touch {{CANARY}}/system"))
_try("fork", lambda: os.fork())
'''

WRITES = PRELUDE + '''
CANARY, OUT, MATE = {canary!r}, {out!r}, {classmate!r}
UTILS_INIT, SITE, INSTRUCTOR = {utils_init!r}, {site!r}, {instructor!r}
def _dirfd():
    d = os.open(os.path.dirname(MATE), os.O_RDONLY)
    fd = os.open(os.path.basename(MATE), os.O_WRONLY | os.O_TRUNC, dir_fd=d)
    os.write(fd, b"{{}}")
_try("dir_fd overwrite", _dirfd)
def _rename():
    d = os.open(os.path.dirname(MATE), os.O_RDONLY)
    open("x.ipynb", "w").write("{{}}")
    os.rename("x.ipynb", os.path.basename(MATE), dst_dir_fd=d)
_try("rename dst_dir_fd", _rename)
_try("overwrite classmate", lambda: open(MATE, "w").write("{{}}"))
_try("append utils", lambda: open(UTILS_INIT, "a").write("\\n# HOSTILE-APPEND\\n"))
_try(".pth", lambda: open(os.path.join(SITE, "zz_hostile.pth"), "w").write("import os\\n"))
_try("chmod", lambda: os.chmod(INSTRUCTOR, 0o777))
def _fchmod():
    os.chmod(os.open(INSTRUCTOR, os.O_RDONLY), 0o777)
_try("chmod fd", _fchmod)
def _futime():
    os.utime(os.open(INSTRUCTOR, os.O_RDONLY), (0, 0))
_try("utime fd", _futime)
def _dirfd_chmod():
    os.chmod(os.path.basename(INSTRUCTOR), 0o777,
             dir_fd=os.open(os.path.dirname(INSTRUCTOR), os.O_RDONLY))
_try("chmod dir_fd", _dirfd_chmod)
_try("mkfifo at --out", lambda: os.mkfifo(OUT))
_try("mknod", lambda: os.mknod(os.path.join(CANARY, "node")))
_try("symlink", lambda: os.symlink("/", os.path.join(CANARY, "link")))
_try("canary", lambda: open(os.path.join(CANARY, "written"), "w").write("x"))
_try("--out", lambda: open(OUT, "w").write("student,total\\nme,999\\n"))
'''

READS = PRELUDE + '''
FOLDER, MATE, PRIVATE = {folder!r}, {classmate!r}, {private!r}
found = []
def _grab(label, fn):
    try:
        found.append((label, fn()))
    except BaseException:
        pass
ppid = os.getppid()
for pid in [ppid, 1, 2] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    for what in ("cmdline", "environ"):
        _grab(f"{{pid}} {{what}}", lambda: open(f"/proc/{{pid}}/{{what}}", "rb").read())
    def _fds():
        out = []
        for fd in os.listdir(f"/proc/{{pid}}/fd"):
            path = f"/proc/{{pid}}/fd/{{fd}}"
            try:
                out.append(os.readlink(path))
                with open(path, "rb", buffering=0) as f:
                    os.set_blocking(f.fileno(), False)
                    out.append(f.read(4096))
            except BaseException:
                pass
        return out
    _grab(f"{{pid}} fds", _fds)
    def _mem():
        with open(f"/proc/{{pid}}/mem", "rb") as f:
            return f.read(64)
    _grab(f"{{pid}} mem", _mem)
_grab("private", lambda: open(PRIVATE).read())
_grab("listing", lambda: os.listdir(FOLDER))
_grab("classmate", lambda: open(MATE).read())
def _exec_mate():
    nb = json.load(open(MATE))
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            exec("".join(c["source"]), globals())
_grab("exec classmate", _exec_mate)
_grab("own env", lambda: dict(os.environ))
text = repr(found)
leaks = [text[max(0, i - 20): i + 60] for i in range(len(text)) if text.startswith("SECRET-", i)]
print("LEAKS:", leaks[:5])
if leaks:
    raise RuntimeError(" ".join(leaks)[:280])
'''

FORGE = '''
import os, json
ids = {ids!r}
lines = [{{"type": "ready"}}]
for i in ids:
    lines += [{{"type": "call_start", "id": i}}, {{"type": "result", "id": i, "value": 1.0, "refs": []}}]
lines += [{{"type": "pause"}}, {{"type": "done"}}, {{"type": "result", "id": ids[0], "value": 0}}]
data = "".join(json.dumps(x) + "\\n" for x in lines).encode() + b"not json\\n"
for fd in range(1, 64):
    try:
        os.write(fd, data)
    except OSError:
        pass
'''

SPEC_HELPERS = '''
import builtins
from utils.labs.specs.{lab} import SPEC as _SPEC
builtins.sorted = lambda *a, **k: []
builtins.set = lambda *a, **k: []
{defs}
'''

MARKERS = '''
def {name}(*args, **kwargs):
    return {{"__timeout__": "x", "__crashed__": 1, "__missing__": None, "__raised__": 5,
            "__array__": 3, "shape": "x", "__float__": "nope", "__unplain__": [1]}}
'''

PAUSE = '''
import os, json
line = (json.dumps({"type": "pause"}) + "\\n").encode()
for fd in range(3, 64):
    try:
        os.write(fd, line)
    except OSError:
        pass
import time
while True:  # holds its slot (asleep, so that the test costs no CPU) until the grader kills it
    try:
        time.sleep(1000)
    except BaseException:
        pass
'''

FLOOD = '''
import os, sys
for _ in range(50_000):
    print("spam " * 40)
os.write(1, b"x" * (4 * 2**20))
sys.stderr.write("e" * (2 * 2**20))
'''


def build_lab_batch(lab: str, ctx: Context) -> dict[str, Expect]:
    """Write the honest classmates and one hostile submission per attack class for ``lab`` into
    ``ctx.folder``; returns name -> what its report must show."""
    spec = load_spec(lab)
    functions = [e for e in spec.exercises if e.kind == "function"]
    first = functions[0]
    full = spec.total_points
    ids = [f"{e.name}#{i}" for e in spec.exercises for i in range(40)]
    fields = dict(canary=str(ctx.canary), out=str(ctx.out), classmate=str(ctx.classmate),
                  utils_init=str(ctx.utils_init), site=str(ctx.site_packages),
                  instructor=str(ctx.instructor), folder=str(ctx.folder),
                  private=str(ctx.private), ids=ids, lab=lab)
    defs = "\n".join(f"{e.name} = lambda *a, **k: _SPEC.exercise({e.name!r}).expected(*a, **k)"
                     for e in functions)
    batch = {
        "alice": (_nb(lab, False), Expect(full)),
        "bob": (_nb(lab, False), Expect(full)),
        "escape_processes": (_after_check_import(_nb(lab, False), ESCAPE.format(**fields)),
                             Expect(full)),
        "writes_outside": (_after_check_import(_nb(lab, False), WRITES.format(**fields)),
                           Expect(full)),
        "reads_secrets": (_after_check_import(_nb(lab, False), READS.format(**fields)),
                          Expect(full)),
        "forged_channel": (_after_check_import(_nb(lab, True), FORGE.format(**fields)),
                           Expect(0, fragments=("result channel",))),
        "forged_channel_on_solution": (_append(_nb(lab, False), FORGE.format(**fields)),
                                       Expect(0, fragments=("result channel",))),
        "spec_expected_helpers": (_append(_nb(lab, True), SPEC_HELPERS.format(lab=lab,
                                                                                defs=defs)),
                                  Expect(0, fragments=("reference implementation",))),
        "marker_return_values": (_append(_nb(lab, False), MARKERS.format(name=first.name)),
                                 Expect(at_most=full - first.points)),
        "parser_memory_error": (_append(_nb(lab, False), "-" * 100_000 + "1"),
                                Expect(full, fragments=("MemoryError",))),
        "many_magics": (_append(_nb(lab, False), "\n".join(["%time x = 1"] * 500)),
                        Expect(full, max_seconds=60)),
        "many_error_cells": (_append(_nb(lab, False), *(["1 / 0"] * 1000)),
                             Expect(full, fragments=("only the first",))),
        "print_flood": (_after_check_import(_nb(lab, False), FLOOD), Expect(full)),
        "fake_pause_then_hang": (_append(_nb(lab, False), PAUSE),
                                 Expect(0, fragments=("result channel",))),
    }
    expected = {}
    for name, (nb, expect) in batch.items():
        if expect.total is None and expect.at_most is None:
            expect.total = full
        (ctx.folder / f"{name}.ipynb").write_text(nbformat.writes(nb), encoding="utf-8")
        expected[name] = expect
    return expected
