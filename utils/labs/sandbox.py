"""Run one untrusted submission in an OS sandbox and get plain values back (the parent side).

The grader (``utils.labs.grade``) builds a *job*: the code cells of one submission and the calls to
make afterwards (function name, plain JSON arguments; never an expected value). ``run_job`` runs
``utils/labs/sandbox_child.py`` on it:

- by default inside bubblewrap (``bwrap``): its own user (uid 65534), PID, mount, IPC, UTS and
  network namespaces, ``--die-with-parent``, a new session, no capabilities, a seccomp filter
  (``seccomp_program``: no fork/vfork, clone only for threads, no pidfd calls, ptrace,
  process_vm_*, mknod, mount, unshare/setns, keyctl, bpf, io_uring...), and a root file system
  holding only the Python runtime, its packages and the course's ``utils`` folder (read-only),
  a fresh ``/proc`` of its own PID namespace, a minimal ``/dev`` and a small private ``/tmp``;
  no other submission, no private cases file, no grader environment, no grader ``/proc``;
- with ``trusted=True`` (a learner grading their own notebook), as a plain ``python -I``
  process; the child's audit hook and resource limits (the second line, always on) remain.

The parent enforces the wall-clock limit from its own clock (nothing the child sends extends it),
kills the sandbox, caps what it reads, and checks the protocol of the result pipe
(``check_protocol``): exactly one ``result`` per call, in the job's order, after its
``call_start``; any extra, duplicated, out-of-order or malformed line counts against the
submission. ``to_plain`` turns return values into numbers, strings, lists and dicts without
calling any of the student's methods.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field

MAX_ELEMENTS = 200_000  # most list items / dict entries one returned value may hold
MAX_DEPTH = 32


# --------------------------------------------------------------------------- plain values

class _Budget:
    def __init__(self, n):
        self.n = n


def to_plain(x, _depth: int = 0, _budget: _Budget | None = None):
    """A JSON-safe copy of ``x`` built without calling any method ``x``'s class defines.

    None, bool, int, float, str, lists/tuples, dicts with str keys, numpy arrays and scalars, and
    torch tensors (``{"__array__": nested list, "dtype": str, "shape": list}``). Non-finite floats
    become ``{"__float__": "nan" | "inf" | "-inf"}``. Anything else becomes
    ``{"__unplain__": type name}``, so an object whose ``__eq__`` always says True arrives as what
    it is: not a number.
    """
    budget = _budget or _Budget(MAX_ELEMENTS)
    budget.n -= 1
    if budget.n < 0 or _depth > MAX_DEPTH:
        return {"__unplain__": "value too large or too deeply nested"}
    t = type(x)
    if x is None or t is bool:
        return x
    if isinstance(x, bool):  # cannot happen (bool is final), kept for clarity
        return bool(x)
    if isinstance(x, int) and t.__module__ == "builtins" or t is int:
        value = int.__int__(x)
        return value if value.bit_length() <= 1024 else float("inf") if value > 0 else float("-inf")
    if isinstance(x, float) and (t is float or t.__module__ == "builtins"):
        return _float(float.__float__(x))
    if isinstance(x, str) and t.__module__ == "builtins":
        return str.__str__(x)[:100_000]
    if t in (list, tuple):
        return [to_plain(v, _depth + 1, budget) for v in x]
    if t is dict:
        if not all(type(k) is str for k in x):
            return {"__unplain__": "dict with non-str keys"}
        return {k: to_plain(v, _depth + 1, budget) for k, v in dict.items(x)}
    module = getattr(t, "__module__", "") or ""
    if module == "numpy" or module.startswith("numpy."):
        return _numpy_plain(x, t, budget)
    if module == "torch" and t.__name__ in ("Tensor", "Parameter"):
        return _torch_plain(x, budget)
    if isinstance(x, (int, float)):  # a subclass of int or float: its value, not its methods
        return to_plain(int.__int__(x) if isinstance(x, int) else float.__float__(x), _depth,
                        budget)
    return {"__unplain__": _type_name(t)}


def _float(v: float):
    if math.isfinite(v):
        return v
    return {"__float__": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}


def _type_name(t) -> str:
    try:
        name = type.__getattribute__(t, "__name__")
        return str.__str__(name)[:80] if isinstance(name, str) else "object"
    except Exception:
        return "object"


def _nested(values, budget):
    if isinstance(values, list):
        return [_nested(v, budget) for v in values]
    if type(values) is float:
        return _float(values)
    return values


def _numpy_plain(x, t, budget):
    import numpy as np

    if t is np.ndarray:
        if x.size > budget.n:
            return {"__unplain__": "array too large"}
        budget.n -= x.size
        return {"__array__": _nested(np.ndarray.tolist(x), budget), "dtype": str(x.dtype),
                "shape": list(x.shape)}
    if isinstance(x, np.generic) and t.__module__ == "numpy":
        value = x.item()
        return to_plain(value, 0, budget) if type(value) in (int, float, bool, str) else \
            {"__unplain__": _type_name(t)}
    return {"__unplain__": _type_name(t)}


def _torch_plain(x, budget):
    import torch

    if type(x) not in (torch.Tensor, torch.nn.Parameter):
        return {"__unplain__": _type_name(type(x))}
    tensor = torch.Tensor.detach(x).cpu()
    if tensor.numel() > budget.n:
        return {"__unplain__": "tensor too large"}
    budget.n -= tensor.numel()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return {"__array__": _nested(torch.Tensor.tolist(tensor), budget),
            "dtype": str(x.dtype).replace("torch.", ""), "shape": list(x.shape)}


# --------------------------------------------------------------------------- finding the sandbox

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`; Fedora: "
                "`sudo dnf install bubblewrap`) on Linux with user namespaces enabled")
SANDBOX_UID = 65534  # "nobody" inside the sandbox's user namespace
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
UTILS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(UTILS_DIR)
# Paths *inside* the sandbox's own mount namespace, not on this machine: bubblewrap mounts a
# fresh tmpfs at SANDBOX_TMP, and the submission writes only to WORKDIR within it. The host's
# files the sandbox sees are found at run time (``_readonly_paths``), never written here.
SANDBOX_TMP = "/tmp"
WORKDIR = SANDBOX_TMP + "/work"
# the standard Linux system folders (FHS), bound read-only where they exist on this machine
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
                "/etc/localtime")  # what the dynamic linker and time zone need
SYSTEM_PATH = "/usr/bin:/bin"  # the child's PATH: system programs only, nothing from the host's
STARTUP_S = 30.0  # wall clock allowed on top of the spec's limit for the trusted start-up


class SandboxUnavailable(RuntimeError):
    """No OS sandbox can start on this machine (the message says what to install)."""


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


# x86_64 and aarch64 syscall numbers the filter refuses with EPERM (clone3 with ENOSYS, so that
# the C library falls back to clone, whose flags the filter can read)
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, 56, 435, {
        "fork": 57, "vfork": 58, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "pidfd_open": 434, "pidfd_send_signal": 424,
        "pidfd_getfd": 438, "mknod": 133, "mknodat": 259, "unshare": 272, "setns": 308,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "keyctl": 250,
        "add_key": 248, "request_key": 249, "bpf": 321, "userfaultfd": 323,
        "perf_event_open": 298, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "kexec_load": 246, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "open_by_handle_at": 304, "name_to_handle_at": 303,
        "personality": 135, "kcmp": 312, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "process_madvise": 440}),
    "aarch64": (0xC00000B7, 220, 435, {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_open": 434,
        "pidfd_send_signal": 424, "pidfd_getfd": 438, "mknodat": 33, "unshare": 97,
        "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280, "userfaultfd": 282,
        "perf_event_open": 241, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "kexec_load": 104, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "open_by_handle_at": 265, "name_to_handle_at": 264,
        "personality": 92, "kcmp": 272, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "process_madvise": 440}),
}
_CLONE_THREAD = 0x00010000
_RET_ALLOW, _RET_KILL, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS = 1, 38


def seccomp_program(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp filter (``struct sock_filter[]``, as ``bwrap --seccomp FD`` reads
    it) for this machine's architecture, or None where we have no syscall table."""
    machine = machine or platform.machine()
    if machine not in _SECCOMP_ARCHES:
        return None
    arch, clone, clone3, denied = _SECCOMP_ARCHES[machine]
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    prog = [(ld_abs, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, _RET_KILL), (ld_abs, 0, 0, 0)]
    if machine == "x86_64":  # the x32 ABI's numbers: refuse them all
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, _RET_ERRNO | _EPERM)]
    for nr in sorted(set(denied.values())):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, _RET_ERRNO | _EPERM)]
    prog += [(jeq, 0, 1, clone3), (ret, 0, 0, _RET_ERRNO | _ENOSYS)]
    # clone: allowed for a thread (CLONE_THREAD in the flags, argument 0), refused otherwise
    prog += [(jeq, 0, 4, clone), (ld_abs, 0, 0, 16), (jset, 1, 0, _CLONE_THREAD),
             (ret, 0, 0, _RET_ERRNO | _EPERM), (ret, 0, 0, _RET_ALLOW), (ret, 0, 0, _RET_ALLOW)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def _readonly_paths() -> list[str]:
    """What the sandbox sees (read-only): the system's programs and libraries, the Python
    runtime and its packages, and the course's ``utils`` folder (not the rest of the repository:
    no solutions, no submissions)."""
    paths = sysconfig.get_paths()
    import site

    wanted = [*SYSTEM_DIRS, *SYSTEM_FILES, sys.prefix, sys.base_prefix, sys.exec_prefix,
              sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
              paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"],
              *site.getsitepackages(), UTILS_DIR]
    chosen: list[str] = []
    for p in sorted({os.path.abspath(p) for p in wanted if p}, key=len):
        if os.path.lexists(p) and not any(p == c or p.startswith(c.rstrip("/") + "/")
                                          for c in chosen if not os.path.islink(c)):
            chosen.append(p)
    return chosen


@functools.lru_cache(maxsize=None)
def _bwrap_supports(option: str) -> bool:
    try:
        text = subprocess.run([bwrap_path(), "--help"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return False
    return option in text


def bwrap_command(argv: list[str], env: dict[str, str], seccomp_fd: int | None) -> list[str]:
    """The bubblewrap command line running ``argv`` in a fresh sandbox."""
    cmd = [bwrap_path(), "--unshare-all", "--unshare-user", "--die-with-parent",
           "--new-session", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
           "--hostname", "grading", "--cap-drop", "ALL"]
    if _bwrap_supports("--disable-userns"):
        cmd.append("--disable-userns")
    # the private /tmp first, so that a runtime or course folder under /tmp stays visible
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(256 * 2**20), "--tmpfs", SANDBOX_TMP]
    for p in _readonly_paths():
        if os.path.islink(p):
            cmd += ["--symlink", os.readlink(p), p]
        else:
            cmd += ["--ro-bind", p, p]
    cmd += ["--dir", WORKDIR, "--chdir", WORKDIR, "--clearenv"]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    return cmd + ["--", *argv]


def _seccomp_fd() -> int | None:
    program = seccomp_program()
    if program is None:
        return None
    read_fd, write_fd = os.pipe()
    os.write(write_fd, program)  # a few hundred bytes: fits in the pipe
    os.close(write_fd)
    return read_fd


@functools.lru_cache(maxsize=None)
def sandbox_problem() -> str | None:
    """None when a bubblewrap sandbox starts here (it runs Python in one); otherwise why not,
    and what to install. Cached for the process."""
    if not sys.platform.startswith("linux"):
        return f"the grading sandbox needs Linux (this is {sys.platform})"
    if bwrap_path() is None:
        return f"bubblewrap (`bwrap`) is not installed: {INSTALL_HINT}"
    fd = _seccomp_fd()
    try:
        cmd = bwrap_command([sys.executable, "-I", "-c", "import os; print(os.getuid())"],
                            child_env(WORKDIR), fd)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                              pass_fds=(fd,) if fd is not None else (), env=child_env(WORKDIR))
    except (OSError, subprocess.SubprocessError) as e:
        return f"bubblewrap could not start ({e}): {INSTALL_HINT}"
    finally:
        if fd is not None:
            os.close(fd)
    if done.returncode != 0 or done.stdout.strip() != str(SANDBOX_UID):
        return (f"bubblewrap cannot create its namespaces here (exit code {done.returncode}: "
                f"{done.stderr.strip()[-300:]}); {INSTALL_HINT}, or run the grader as root")
    return None


def require_sandbox() -> None:
    """``SandboxUnavailable`` with what to install when no sandbox can start."""
    problem = sandbox_problem()
    if problem:
        raise SandboxUnavailable(
            f"cannot grade untrusted submissions: {problem}. To grade notebooks you trust "
            "(your own), pass --trusted (or trusted=True) to run them without the OS sandbox.")


# --------------------------------------------------------------------------- parent side

@dataclass
class SandboxResult:
    messages: list[dict] = field(default_factory=list)  # the child's events, validated, in order
    output: str = ""          # what the process wrote to its real stdout/stderr (capped)
    returncode: int | None = None
    timed_out: bool = False
    wall_s: float = 0.0
    overflow: bool = False    # the result channel went over its cap
    tampered: str | None = None  # why the result channel broke its protocol, if it did
    sandbox: str = "none"     # "bwrap" or "none (trusted)"

    @property
    def done(self) -> bool:
        return any(m.get("type") == "done" for m in self.messages)

    @property
    def ready(self) -> bool:
        return any(m.get("type") == "ready" for m in self.messages)


def _drain(fd: int, cap: int, sink: list, flags: dict) -> None:
    """Read ``fd`` to EOF, keeping at most ``cap`` bytes (so the child never blocks on a full
    pipe and a flood never fills our memory)."""
    kept = 0
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if kept < cap:
                sink.append(chunk[: cap - kept])
                kept += len(chunk[: cap - kept])
            else:
                flags["overflow"] = True
    except OSError:
        pass
    finally:
        os.close(fd)


def child_env(workdir: str) -> dict[str, str]:
    env = {"PATH": SYSTEM_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
           "COURSE_GRADING": "1"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    return env


def run_job(job: dict, *, timeout_s: float, memory_mb: int, cpu_s: float | None = None,
            trusted: bool = False, startup_s: float = STARTUP_S, output_cap: int = 64 * 1024,
            result_cap: int = 16 * 1024 * 1024) -> SandboxResult:
    """Run ``job`` (see the module docstring) in a fresh sandbox (``trusted``: a plain process);
    never raises for anything the student's code does. ``timeout_s`` is the student's wall
    clock; the parent adds ``startup_s`` for the trusted start-up (importing torch) and counts
    from its own clock only.
    ``SandboxUnavailable`` when no sandbox can start and ``trusted`` is false."""
    if not trusted:
        require_sandbox()
    result = SandboxResult(sandbox="none (trusted)" if trusted else "bwrap")
    with tempfile.TemporaryDirectory(prefix="grade-") as tmpdir:
        workdir = os.path.realpath(tmpdir) if trusted else WORKDIR
        # a socket, not a pipe: a pipe can be reopened for reading through /proc/self/fd, so
        # that the submission could drain its own events; a socket cannot be reopened
        ours, theirs = socket.socketpair()
        ours.shutdown(socket.SHUT_WR)
        read_fd, write_fd = ours.detach(), theirs.detach()
        payload = dict(job, result_fd=write_fd, workdir=workdir, sandbox=result.sandbox,
                       limits={"cpu_s": int(math.ceil(cpu_s or timeout_s + startup_s)) + 1,
                               "memory_mb": int(memory_mb), "fsize_mb": 16})
        argv = [sys.executable, "-I", CHILD]
        seccomp_fd, fds = None, [write_fd]
        if not trusted:
            seccomp_fd = _seccomp_fd()
            if seccomp_fd is not None:
                fds.append(seccomp_fd)
            argv = bwrap_command(argv, child_env(workdir), seccomp_fd)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, pass_fds=tuple(fds), cwd=tmpdir,
                                    env=child_env(workdir), start_new_session=True)
        finally:
            for fd in fds:
                os.close(fd)
        chunks, out_chunks, flags = [], [], {}
        readers = [threading.Thread(target=_drain, args=(read_fd, result_cap, chunks, flags),
                                    daemon=True),
                   threading.Thread(target=_drain, args=(os.dup(proc.stdout.fileno()), output_cap,
                                                         out_chunks, {}), daemon=True)]
        proc.stdout.close()
        for t in readers:
            t.start()
        writer = threading.Thread(target=_feed, args=(proc, json.dumps(payload).encode()),
                                  daemon=True)
        writer.start()
        deadline = start + timeout_s + startup_s  # the parent's clock only
        while True:
            try:
                proc.wait(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    result.timed_out = True
                    break
        _kill(proc)
        result.returncode = proc.wait()
        for t in readers:
            t.join(timeout=5)
        result.wall_s = time.monotonic() - start
        result.overflow = bool(flags.get("overflow"))
        result.output = b"".join(out_chunks).decode("utf-8", "replace")
        result.messages, result.tampered = check_protocol(
            b"".join(chunks), [c[0] for c in job.get("cells", [])],
            [c["id"] for c in job.get("calls", [])], truncated=result.overflow)
    return result


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _kill(proc: subprocess.Popen) -> None:
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL),
                 lambda: os.kill(proc.pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


_ERROR_KINDS = {"raised", "timeout", "skipped", "missing"}


def _valid_error(error) -> bool:
    if not isinstance(error, dict) or error.get("kind") not in _ERROR_KINDS:
        return False
    if error["kind"] in ("timeout", "skipped"):
        return type(error.get("seconds")) in (int, float)
    if error["kind"] == "missing":
        return isinstance(error.get("name"), str)
    return (isinstance(error.get("name"), str) and isinstance(error.get("message"), str)
            and isinstance(error.get("bases"), list)
            and all(isinstance(b, str) for b in error["bases"]))


def check_protocol(data: bytes, cell_indices: list, call_ids: list[str],
                   truncated: bool = False) -> tuple[list[dict], str | None]:
    """The child's events, checked against the only order the real child produces:
    ``ready``, then ``cell_start``/``cell_end`` pairs for the job's cells in order, then
    ``call_start``/``result`` pairs for the job's calls in order, then ``done``. Returns the
    events up to the first deviation and, if there is one, what it was (an extra, duplicated,
    out-of-order or malformed line: only student code writes those). A last line cut off when
    the process was killed is dropped silently."""
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when the data ended with a newline
    del last  # an incomplete last line: the process died or was killed while writing
    events: list[dict] = []
    cells, calls = list(cell_indices), list(call_ids)
    state = "start"  # start -> cells -> calls -> done
    open_item = None
    for number, line in enumerate(lines, 1):
        try:
            m = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return events, f"line {number} of the result channel is not JSON"
        kind = m.get("type") if isinstance(m, dict) else None
        problem = None
        if state == "start":
            state, problem = ("cells", None) if kind == "ready" else \
                (state, f"{kind!r} before the sandbox was ready")
        elif state == "done":
            problem = f"{kind!r} after the end of grading"
        elif kind == "cell_start" and state == "cells" and open_item is None:
            if not cells or m.get("index") != cells[0]:
                problem = f"cell_start for cell {m.get('index')!r} out of order"
            else:
                open_item = ("cell", cells.pop(0))
        elif kind == "cell_end" and open_item == ("cell", m.get("index")):
            error = m.get("error")
            if error is not None and not _valid_error(error):
                problem = "a malformed cell_end line"
            open_item = None
        elif kind == "call_start" and open_item is None and state in ("cells", "calls") \
                and not cells:
            if not calls or m.get("id") != calls[0]:
                problem = f"call_start for {m.get('id')!r} out of order"
            else:
                state, open_item = "calls", ("call", calls.pop(0))
        elif kind == "result" and open_item == ("call", m.get("id")):
            refs = m.get("refs", [])
            has_value, error = "value" in m, m.get("error")
            if not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)) or \
                    has_value == (error is not None) or (error is not None
                                                         and not _valid_error(error)):
                problem = "a malformed result line"
            open_item = None
        elif kind == "done" and open_item is None and not cells and not calls:
            state = "done"
        else:
            problem = f"an unexpected {kind!r} line" if kind else "a line that is not an event"
        if problem:
            return events, problem
        events.append(m)
    if truncated:
        return events, None
    return events, None
