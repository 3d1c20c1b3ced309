"""Run untrusted notebook code in a fresh, limited Python process and get plain values back.

The grader (``utils.labs.grade``) builds a *job*: the code cells of one submission and the calls to
make afterwards (function name, plain JSON arguments). ``run_job`` starts ``python -I`` on this
file in its own session and a temporary working directory; the child, before any student code:

- sets resource limits (CPU seconds, address space, file size, no core files),
- leaves the network where the OS allows it (a new network namespace: as root, or through an
  unprivileged user namespace), and otherwise refuses sockets through an audit hook,
- installs an audit hook (``sys.addaudithook``, which cannot be removed) refusing writes outside
  its temporary directory, new processes, signals to other processes, new ``ctypes`` symbols and
  raising resource limits,
- replaces ``utils.labs.check`` by a no-op and wraps the reference implementations the lab names
  (``references``) so that calls from student code are recorded,
- redirects ``sys.stdout``/``sys.stderr`` to capped buffers.

It then executes the cells (each under a soft timeout), calls the functions, and writes one JSON
line per event to a pipe opened by the parent (``result_fd``). Return values are converted by
``to_plain`` to numbers, strings, lists and dicts: no student object leaves the child, and the
parent, which alone holds the expected values, does every comparison. A student can write to that
pipe too, but only values it could have returned anyway; the parent ignores everything else.
The parent kills the whole process group at the wall-clock limit and caps what it reads.

Limits of this design (documented in the README): the audit hook is a strong fence for Python
code, not a security boundary against native code already loaded; for hostile cohorts run the
grader in a container or as an unprivileged user.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import signal
import subprocess
import sys
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


# --------------------------------------------------------------------------- parent side

@dataclass
class SandboxResult:
    messages: list[dict] = field(default_factory=list)  # the child's events, in order
    output: str = ""          # what the process wrote to its real stdout/stderr (capped)
    returncode: int | None = None
    timed_out: bool = False
    wall_s: float = 0.0
    overflow: bool = False    # the result channel went over its cap
    network: str = "unknown"  # how the network was cut off

    @property
    def done(self) -> bool:
        return any(m.get("type") == "done" for m in self.messages)

    @property
    def ready(self) -> bool:
        return any(m.get("type") == "ready" for m in self.messages)


MAX_PAUSE_S = 120.0  # most wall-clock time per run not counted (start-up, importing course code)


class _PauseClock:
    """Wall-clock time the child spent in trusted code (its start-up, importing the course's
    reference modules, which may import torch), not charged to the student's time limit. It
    starts paused; the child's ``ready``, ``pause`` and ``resume`` messages move it. A forged
    message can win a submission at most ``MAX_PAUSE_S`` more seconds of its own time."""

    def __init__(self, token: str):
        self.token, self.lock = token, threading.Lock()
        self.since, self.total = time.perf_counter(), 0.0

    def on_line(self, line: bytes) -> None:
        if len(line) > 300 or b'"pause"' not in line and b'"resume"' not in line \
                and b'"ready"' not in line:
            return
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("token") != self.token:
            return
        with self.lock:
            now = time.perf_counter()
            if message.get("type") == "pause" and self.since is None:
                self.since = now
            elif message.get("type") in ("resume", "ready") and self.since is not None:
                self.total += now - self.since
                self.since = None

    def paused(self) -> float:
        with self.lock:
            extra = time.perf_counter() - self.since if self.since is not None else 0.0
            return min(MAX_PAUSE_S, self.total + extra)


def _drain(fd: int, cap: int, sink: list, flags: dict, on_line=None) -> None:
    """Read ``fd`` to EOF, keeping at most ``cap`` bytes (so the child never blocks on a full
    pipe and a flood never fills our memory); ``on_line`` sees each complete short line."""
    kept, partial = 0, b""
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if on_line is not None:
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()[-400:]
                for line in lines:
                    on_line(line)
            if kept < cap:
                sink.append(chunk[: cap - kept])
                kept += len(chunk[: cap - kept])
            else:
                flags["overflow"] = True
    except OSError:
        pass
    finally:
        os.close(fd)


def child_env(tmpdir: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": tmpdir, "TMPDIR": tmpdir, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
           "COURSE_GRADING": "1"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    return env


def run_job(job: dict, *, timeout_s: float, memory_mb: int, cpu_s: float | None = None,
            output_cap: int = 64 * 1024, result_cap: int = 16 * 1024 * 1024) -> SandboxResult:
    """Run ``job`` (see the module docstring) in a fresh sandboxed process; never raises for
    anything the student's code does."""
    token = secrets.token_hex(16)
    result = SandboxResult()
    with tempfile.TemporaryDirectory(prefix="grade-") as tmpdir:
        read_fd, write_fd = os.pipe()
        payload = dict(job, token=token, result_fd=write_fd, tmpdir=os.path.realpath(tmpdir),
                       limits={"cpu_s": int(math.ceil(cpu_s or timeout_s + MAX_PAUSE_S)) + 1,
                               "memory_mb": int(memory_mb), "fsize_mb": 16})
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_fd,), cwd=tmpdir,
            env=child_env(os.path.realpath(tmpdir)), start_new_session=True)
        os.close(write_fd)
        chunks, out_chunks, flags = [], [], {}
        clock = _PauseClock(token)
        readers = [threading.Thread(target=_drain, args=(read_fd, result_cap, chunks, flags,
                                                         clock.on_line), daemon=True),
                   threading.Thread(target=_drain, args=(os.dup(proc.stdout.fileno()), output_cap,
                                                         out_chunks, {}), daemon=True)]
        proc.stdout.close()
        for t in readers:
            t.start()
        try:
            proc.stdin.write(json.dumps(payload).encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        while True:  # the student's wall clock: elapsed time less trusted start-up and imports
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - start - clock.paused() > timeout_s:
                    result.timed_out = True
                    break
        _kill_group(proc)
        result.returncode = proc.wait()
        for t in readers:
            t.join(timeout=5)
        result.wall_s = time.perf_counter() - start
        result.overflow = bool(flags.get("overflow"))
        result.output = b"".join(out_chunks).decode("utf-8", "replace")
        result.messages = _parse_messages(b"".join(chunks), token)
        for m in result.messages:
            if m.get("type") == "ready":
                result.network = m.get("network", "unknown")
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parse_messages(data: bytes, token: str) -> list[dict]:
    """Complete JSON lines carrying this run's token; a truncated or forged line is dropped."""
    messages = []
    for line in data.split(b"\n"):
        try:
            message = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(message, dict) and message.get("token") == token:
            messages.append(message)
    return messages


# --------------------------------------------------------------------------- child side

class _SoftTimeout(BaseException):
    """Raised in the child by SIGALRM when a cell or a call runs past its time."""


class _CappedText(io.TextIOBase):
    """A stand-in for sys.stdout/sys.stderr that keeps the first ``cap`` characters."""

    encoding, errors = "utf-8", "replace"

    def __init__(self, cap: int = 20_000):
        super().__init__()
        self.cap, self.parts, self.kept, self.total = cap, [], 0, 0

    def writable(self):
        return True

    def write(self, text):
        text = text if type(text) is str else str(text)
        self.total += len(text)
        if self.kept < self.cap:
            self.parts.append(text[: self.cap - self.kept])
            self.kept += len(self.parts[-1])
        return len(text)

    def isatty(self):
        return False

    def getvalue(self):
        return "".join(self.parts)


def _cut_network() -> str:
    """A new, empty network namespace where the OS allows it; else the audit hook refuses
    sockets."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        clone_newnet, clone_newuser = 0x40000000, 0x10000000
        if libc.unshare(clone_newnet) == 0:
            return "network namespace"
        if libc.unshare(clone_newuser | clone_newnet) == 0:
            return "user+network namespace"
    except Exception:
        pass
    return "audit hook only"


def _set_limits(limits: dict) -> None:
    import resource

    mb = 1024 * 1024
    for name, value in (("RLIMIT_CPU", limits["cpu_s"]), ("RLIMIT_AS", limits["memory_mb"] * mb),
                        ("RLIMIT_FSIZE", limits["fsize_mb"] * mb), ("RLIMIT_CORE", 0)):
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod",
                "os.chown", "os.utime", "os.symlink", "os.link", "os.mkdir", "shutil.move",
                "shutil.copyfile", "os.chflags", "os.setxattr", "os.removexattr"}
_BLOCKED_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "os.fork", "os.forkpty", "pty.spawn", "os.killpg", "socket.__new__",
                   "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
                   "resource.setrlimit", "resource.prlimit"}
_CTYPES_EVENTS = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.addressof",
                  "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at", "ctypes.wstring_at",
                  "ctypes.set_errno", "ctypes.get_errno", "ctypes.seh_exception",
                  "ctypes.call_function"}


def _trusted_import_checker():
    """A function telling whether the innermost import on the stack is loading a module file
    from the Python installation or the course's ``utils`` (which the sandbox cannot write):
    such modules (torch, for one) may use ctypes while they import; student code may not."""
    import importlib._bootstrap as bootstrap
    import importlib.machinery as machinery
    import site
    import sysconfig

    load_code = bootstrap._load_unlocked.__code__
    loaders = (machinery.SourceFileLoader, machinery.SourcelessFileLoader,
               machinery.ExtensionFileLoader)
    roots = {os.path.realpath(p) + os.sep for p in
             [sys.prefix, sys.base_prefix, sysconfig.get_paths()["stdlib"],
              sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
              *site.getsitepackages(),
              os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]}  # utils/
    roots = tuple(roots)
    realpath, getframe = os.path.realpath, sys._getframe

    def importing_trusted() -> bool:
        frame = getframe(1)
        while frame is not None:
            if frame.f_code is load_code:
                spec = frame.f_locals.get("spec")
                if type(spec) is not machinery.ModuleSpec or type(spec.loader) not in loaders:
                    return False
                origin = spec.origin
                return isinstance(origin, str) and realpath(origin).startswith(roots)
            frame = frame.f_back
        return False

    return importing_trusted


def _install_audit_hook(allowed_root: str) -> None:
    allowed = os.path.realpath(allowed_root) + os.sep
    realpath, fspath, getpid = os.path.realpath, os.fspath, os.getpid
    guard = threading.local()
    importing_trusted = _trusted_import_checker()

    def outside(path) -> bool:
        if isinstance(path, int):
            return False  # an already open descriptor (the channels we handed out)
        try:
            p = realpath(fspath(path))
            p = p.decode() if isinstance(p, bytes) else p
        except Exception:
            return True
        return not (p + os.sep).startswith(allowed) and p not in ("/dev/null",)

    def hook(event, args):
        if getattr(guard, "busy", False):
            return
        guard.busy = True
        try:
            if event == "open":
                path, mode, flags = (list(args) + [None, None, 0])[:3]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                          (isinstance(flags, int) and flags & _WRITE_FLAGS)
                if writing and outside(path):
                    raise PermissionError(f"grading sandbox: writing {path!r} is not allowed "
                                          "(only the temporary working directory is writable)")
            elif event in _PATH_EVENTS:
                if args and any(outside(a) for a in args[:2] if isinstance(a, (str, bytes))):
                    raise PermissionError(f"grading sandbox: {event} outside the working "
                                          "directory is not allowed")
            elif event == "os.kill":
                if args and args[0] != getpid():
                    raise PermissionError("grading sandbox: signalling other processes")
            elif event in _CTYPES_EVENTS:
                if not importing_trusted():
                    raise PermissionError(f"grading sandbox: {event} is not allowed while "
                                          "grading (ctypes only while importing installed "
                                          "packages)")
            elif event in _BLOCKED_EVENTS:
                raise PermissionError(f"grading sandbox: {event} is not allowed while grading")
        finally:
            guard.busy = False

    sys.addaudithook(hook)


class _FakeIPython:
    """Enough of ``get_ipython()`` for code that IPython's transformer produced from magics:
    line magics and shell escapes do nothing; ``%%time``/``%%capture`` run their body."""

    def __init__(self, namespace):
        self.user_ns = namespace

    def run_line_magic(self, *args, **kwargs):
        return None

    def run_cell_magic(self, name, line, body):
        if name in ("time", "timeit", "capture"):
            exec(compile(body, "<cell magic>", "exec"), self.user_ns)
        return None

    def system(self, *args, **kwargs):
        return None

    def getoutput(self, *args, **kwargs):
        return []

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _child_main() -> None:  # pragma: no cover - runs in the sandboxed process
    job = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    token, fd = job["token"], job["result_fd"]
    write, dumps, monotonic = os.write, json.dumps, time.monotonic

    def send(kind, **payload):
        payload.update(token=token, type=kind)
        try:
            data = (dumps(payload, allow_nan=False) + "\n").encode()
        except (ValueError, TypeError, RecursionError):
            data = (dumps({"token": token, "type": kind, "id": payload.get("id"),
                           "value": {"__unplain__": "unencodable"}}) + "\n").encode()
        view = memoryview(data)
        while view:
            try:
                n = write(fd, view)
            except InterruptedError:
                continue
            except OSError:
                return
            view = view[n:]

    sys.path.insert(0, job["repo_root"])
    network = _cut_network()
    _set_limits(job["limits"])
    import importlib
    import types

    stub = types.ModuleType("utils.labs.check")
    stub.check = lambda *args, **kwargs: None
    stub.__doc__ = "replaced by a no-op while grading"
    import utils.labs  # the package, so that the stub attaches to it

    sys.modules["utils.labs.check"] = stub
    utils.labs.check = stub
    for module in job.get("preimport", []):
        importlib.import_module(module)
    adapters = {}
    for dotted in {c["adapter"] for c in job["calls"] if c.get("adapter")}:
        module, _, name = dotted.partition(":")
        adapters[dotted] = getattr(importlib.import_module(module), name)

    called: set[str] = set()
    wrapped: set[str] = set()
    reference_objects: dict[int, str] = {}  # id of each original and its trip-wire -> name

    def wrap_references():
        """Wrap each reference whose module is imported by now; record calls from cells."""
        for dotted in job.get("references", []):
            module_name, _, attr = dotted.rpartition(".")
            module = sys.modules.get(module_name)
            if dotted in wrapped or module is None or not hasattr(module, attr):
                continue
            original = getattr(module, attr)

            def tripwire(*args, __original=original, __name=dotted, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith("<cell"):
                    called.add(__name)
                return __original(*args, **kwargs)

            tripwire.__name__ = getattr(original, "__name__", attr)
            tripwire.__doc__ = getattr(original, "__doc__", None)
            setattr(module, attr, tripwire)
            wrapped.add(dotted)
            reference_objects[id(original)] = reference_objects[id(tripwire)] = dotted

    wrap_references()

    import importlib.abc
    import importlib.machinery

    reference_modules = {d.rpartition(".")[0] for d in job.get("references", [])}
    import_depth = [0]

    class _WrapOnImport(importlib.abc.MetaPathFinder):
        """Wraps the references of a module the moment student code first imports it."""

        def find_spec(self, name, path, target=None):
            if name not in reference_modules:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_wrap(module):
                # course code importing torch can take seconds: not the student's time
                remaining = signal.setitimer(signal.ITIMER_REAL, 0)[0]
                import_depth[0] += 1
                if import_depth[0] == 1:
                    send("pause")
                try:
                    exec_module(module)
                finally:
                    import_depth[0] -= 1
                    if import_depth[0] == 0:
                        send("resume")
                    if remaining:
                        signal.setitimer(signal.ITIMER_REAL, remaining)
                wrap_references()

            spec.loader.exec_module = exec_and_wrap
            return spec

    sys.meta_path.insert(0, _WrapOnImport())

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)

    def limited(seconds, fn, *args, **kwargs):
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def describe(exc) -> dict:
        t = type(exc)
        try:
            message = str(exc)[:300]
        except BaseException:
            message = "(message unavailable)"
        bases = [c.__name__ for c in t.__mro__ if c.__module__ == "builtins"]
        return {"__raised__": _type_name(t), "__bases__": bases, "message": message}

    stdout, stderr = _CappedText(), _CappedText()
    _install_audit_hook(job["tmpdir"])
    send("ready", network=network)
    sys.stdout, sys.stderr = stdout, stderr
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    namespace["get_ipython"] = lambda: _FakeIPython(namespace)
    for index, source in job["cells"]:
        send("cell_start", index=index)
        error, started = None, monotonic()
        try:
            code = compile(source, f"<cell {index}>", "exec")
            limited(job["cell_timeout_s"], exec, code, namespace)
        except _SoftTimeout:
            error = {"__timeout__": job["cell_timeout_s"]}
        except BaseException as exc:  # noqa: BLE001 - SystemExit, MemoryError, anything
            error = describe(exc)
        send("cell_end", index=index, error=error, seconds=round(monotonic() - started, 3))
        wrap_references()
    timed_out: dict[str, float] = {}  # an exercise that timed out once is not called again
    for call in job["calls"]:
        send("call_start", id=call["id"])
        called.clear()
        name = call["name"]
        if name in timed_out:
            value = {"__timeout__": timed_out[name], "skipped": True}
        elif name not in namespace:
            value = {"__missing__": name}
        elif call["kind"] == "value":
            value = to_plain(namespace[name])
        else:
            fn = namespace[name]
            if id(fn) in reference_objects:  # the answer IS the reference (an alias)
                called.add(reference_objects[id(fn)])
            adapter = adapters.get(call.get("adapter"))
            try:
                if adapter is not None:
                    raw = limited(job["call_timeout_s"], adapter, fn, *call["args"],
                                  **call["kwargs"])
                else:
                    raw = limited(job["call_timeout_s"], fn, *call["args"], **call["kwargs"])
                value = to_plain(raw)
            except _SoftTimeout:
                value = {"__timeout__": job["call_timeout_s"]}
                timed_out[name] = job["call_timeout_s"]
            except BaseException as exc:  # noqa: BLE001
                value = describe(exc)
        send("result", id=call["id"], value=value, refs=sorted(called))
    send("done", stdout=stdout.getvalue()[-4000:], stdout_chars=stdout.total,
         stderr=stderr.getvalue()[-4000:], stderr_chars=stderr.total)
    os._exit(0)  # skip anything the student registered with atexit


if __name__ == "__main__":
    _child_main()
