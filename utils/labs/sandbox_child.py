"""The child side of the grading sandbox: runs one submission's cells and calls, sends plain values.

Started by ``utils.labs.sandbox.run_job`` as ``python -I sandbox_child.py``, normally inside a
bubblewrap sandbox (its own user, PID, mount, IPC and network namespaces, a seccomp filter, only
the Python runtime, its packages and the course's ``utils`` visible, read-only). Everything in
this process's memory is the student's once their first cell runs; nothing here is a secret:

- the job (read from stdin) holds the cells and the calls' plain arguments, never an expected
  value; the parent alone compares;
- results go to a pipe (``result_fd``) as JSON lines in a fixed order; the parent checks that
  order and counts any extra, duplicated or malformed line against the submission, so writing to
  the pipe can only send values the submission could have returned anyway;
- the course's reference implementations (``references``) are disabled here before any student
  code runs: a Python reference's code object is swapped in place (every alias, a spec helper or
  a kept original, runs the stub), so calling it raises ``ReferenceImplementationCalled``;
  references that are not Python functions (``torch.softmax``) are wrapped and every call
  made while the learner's function runs is recorded;
- the audit hook and resource limits (``install_audit_hook``, ``set_limits``) are the second
  line, for the trusted mode without bubblewrap: no writes outside the working folder (including
  the ``dir_fd`` and descriptor forms), no new processes (``_posixsubprocess`` and the pidfd calls
  are removed), no ctypes, no tracing or profiling hooks, no signals to other processes.

The pieces are small named functions so that they can be unit-tested outside a sandbox.
"""

from __future__ import annotations

import io
import json
import linecache
import os
import signal
import sys
import threading
import time

REFERENCE_ERROR = "ReferenceImplementationCalled"
MAX_OUTPUT_CHARS = 20_000


class ReferenceImplementationCalled(Exception):
    """Raised by a disabled reference implementation inside the grading sandbox."""


class SoftTimeout(BaseException):
    """Raised in the child by SIGALRM when a cell or a call runs past its time."""


# --------------------------------------------------------------------------- the result channel

class Channel:
    """JSON lines to the parent on ``fd``. Its functions are bound when it is built, so a
    student who replaces ``os.write``, ``json.dumps`` or a builtin does not change what it sends
    (they can write to the pipe themselves; the parent counts that against them)."""

    def __init__(self, fd: int):
        self.fd = fd
        self._write, self._dumps, self._memoryview = os.write, json.dumps, memoryview
        self._len = len

    def send(self, kind: str, **payload) -> None:
        payload["type"] = kind
        try:
            data = (self._dumps(payload, allow_nan=False) + "\n").encode()
        except (ValueError, TypeError, RecursionError):
            data = (self._dumps({"type": kind, "id": payload.get("id"),
                                 "value": {"__unplain__": "unencodable"}}) + "\n").encode()
        view = self._memoryview(data)
        while self._len(view):
            try:
                n = self._write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                return
            view = view[n:]


# --------------------------------------------------------------------------- captured output

class CappedText(io.TextIOBase):
    """A stand-in for sys.stdout/sys.stderr that keeps the first ``cap`` characters."""

    encoding, errors = "utf-8", "replace"

    def __init__(self, cap: int = MAX_OUTPUT_CHARS):
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


# --------------------------------------------------------------------------- limits

def set_limits(limits: dict) -> None:
    """CPU seconds, address space, file size, no core files (hard limits: cannot be raised)."""
    import resource

    mb = 1024 * 1024
    for name, value in (("RLIMIT_CPU", limits.get("cpu_s")),
                        ("RLIMIT_AS", limits.get("memory_mb") and limits["memory_mb"] * mb),
                        ("RLIMIT_FSIZE", limits.get("fsize_mb") and limits["fsize_mb"] * mb),
                        ("RLIMIT_CORE", 0)):
        which = getattr(resource, name, None)
        if which is None or value is None:
            continue
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


# --------------------------------------------------------------------------- reference trip-wires

def disable_references(references, trusted_roots: tuple[str, ...]) -> tuple[set[str], dict]:
    """Disable every reference that is a Python function: its code object is replaced in place by
    one that raises, so every alias (a ``from x import f`` elsewhere, a spec helper, a kept
    original) raises too. Returns the names disabled and, for the others (C functions such as
    ``torch.softmax``), {name: recording wrapper installed on the module}."""
    import importlib
    import types

    disabled, wrapped = set(), {}
    for dotted in references:
        module_name, _, attr = dotted.rpartition(".")
        try:
            module = importlib.import_module(module_name)
            target = getattr(module, attr)
        except Exception:  # noqa: BLE001 - a missing reference: nothing to disable
            continue
        if isinstance(target, types.FunctionType):
            disable_function(target, dotted)
            disabled.add(dotted)
        elif callable(target):
            wrapped[dotted] = _recording_wrapper(dotted, target, trusted_roots)
            setattr(module, attr, wrapped[dotted])
    return disabled, wrapped


def disable_function(function, dotted: str) -> None:
    """Swap ``function``'s code object, in place, for one raising
    ``ReferenceImplementationCalled`` (with as many free variables as the original, so that a
    closure can take it too)."""
    code = function.__code__
    free = [f"f{i}" for i in range(len(code.co_freevars))]
    body = "".join(f"    {v} = None\n" for v in free)
    uses = "".join(f"        {v}\n" for v in free)
    source = (f"def _factory():\n{body}"
              f"    def disabled(*args, **kwargs):\n{uses}"
              f"        raise __import__('builtins').__dict__.get('{REFERENCE_ERROR}', "
              f"RuntimeError)({dotted!r} + ' is the course reference implementation; it is "
              f"disabled while grading (write the answer yourself)')\n"
              f"    return disabled\n")
    namespace: dict = {}
    exec(compile(source, f"<disabled {dotted}>", "exec"), namespace)
    function.__code__ = namespace["_factory"]().__code__


def disable_spec_expected(lab: str | None) -> set[str]:
    """The lab spec's own ``expected`` functions compute the answers (some without calling a
    listed reference): disabled too, so that a submission cannot call them instead."""
    import types

    if not lab:
        return set()
    from utils.labs.spec import load_spec

    disabled = set()
    for exercise in load_spec(lab).exercises:
        if isinstance(exercise.expected, types.FunctionType):
            name = f"utils.labs.specs.{lab}:expected({exercise.name})"
            disable_function(exercise.expected, name)
            disabled.add(name)
    return disabled


class CallRecord:
    """Names of non-Python references called from student code during the current call."""

    def __init__(self):
        self.names: list[str] = []
        self.active = False


RECORD = CallRecord()


def _recording_wrapper(dotted, original, trusted_roots):
    """Records every call made while the learner's function runs, whoever the caller (the
    learner's code, a spec helper, an adapter): the recording lives in this process, so it is
    the weaker check; Python references are disabled instead."""
    record, append = RECORD, list.append

    def tripwire(*args, **kwargs):
        if record.active:
            append(record.names, dotted)
        return original(*args, **kwargs)

    tripwire.__name__ = getattr(original, "__name__", dotted.rpartition(".")[2])
    tripwire.__doc__ = getattr(original, "__doc__", None)
    return tripwire


# --------------------------------------------------------------------------- second-line fences

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# event -> positions of path arguments, and of dir_fd arguments paired with them
_PATH_EVENTS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
    "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
    "os.truncate": ((0,), ()), "os.chflags": ((0,), ()), "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()), "shutil.rmtree": ((0,), ()), "shutil.move": ((0, 1), ()),
    "shutil.copyfile": ((1,), ()), "os.lchown": ((0,), ()), "os.lchmod": ((0,), ()),
}
_BLOCKED_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "os.fork", "os.forkpty", "pty.spawn", "os.killpg", "socket.__new__",
                   "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
                   "resource.setrlimit", "resource.prlimit", "sys.settrace", "sys.setprofile",
                   "_thread.start_new_thread", "gc.get_objects", "gc.get_referrers",
                   "gc.get_referents", "sys._current_frames", "sys.addaudithook",
                   "os.add_dll_directory", "sys.remote_exec"}
_CTYPES_EVENTS = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.addressof",
                  "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at", "ctypes.wstring_at",
                  "ctypes.set_errno", "ctypes.get_errno", "ctypes.seh_exception",
                  "ctypes.call_function", "ctypes.create_string_buffer",
                  "ctypes.create_unicode_buffer"}
# modules whose functions are removed below: importing a fresh copy must not bring them back
_NO_REIMPORT = {"posix", "_posixsubprocess", "_signal", "_ctypes"}
_REMOVED = {"posix": ("pidfd_open", "mkfifo", "mknod", "fork", "forkpty", "execv", "execve",
                      "posix_spawn", "posix_spawnp", "register_at_fork", "kill", "killpg"),
            "os": ("pidfd_open", "mkfifo", "mknod", "fork", "forkpty", "execv", "execve",
                   "posix_spawn", "posix_spawnp", "register_at_fork", "killpg"),
            "_posixsubprocess": ("fork_exec",),
            "signal": ("pidfd_send_signal",), "_signal": ("pidfd_send_signal",)}


def trusted_roots() -> tuple[str, ...]:
    """Folders of the Python installation, its packages and the course's ``utils`` (read-only
    inside the sandbox)."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    roots = {os.path.realpath(p) + os.sep for p in
             [sys.prefix, sys.base_prefix, paths["stdlib"], paths["platstdlib"],
              paths["purelib"], paths["platlib"], *site.getsitepackages(),
              os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] if p}
    return tuple(sorted(roots))


def trusted_import_checker(roots: tuple[str, ...]):
    """A function telling whether ctypes is being used by an installed module while it is
    imported, with no student code anywhere between (a ``sys.settrace`` callback or an import
    hook called from inside a trusted import is student code, so it gets no ctypes)."""
    import importlib._bootstrap as bootstrap
    import importlib.machinery as machinery

    load_code = bootstrap._load_unlocked.__code__
    loaders = (machinery.SourceFileLoader, machinery.SourcelessFileLoader,
               machinery.ExtensionFileLoader)
    realpath, getframe = os.path.realpath, sys._getframe
    here = os.path.abspath(__file__)

    def importing_trusted() -> bool:
        frame = getframe(1)
        while frame is not None:
            code = frame.f_code
            if code is load_code:
                spec = frame.f_locals.get("spec")
                if type(spec) is not machinery.ModuleSpec or type(spec.loader) not in loaders:
                    return False
                origin = spec.origin
                return isinstance(origin, str) and realpath(origin).startswith(roots)
            filename = code.co_filename
            if not (filename.startswith(roots) or filename.startswith("<frozen ")
                    or filename == here):
                return False  # student code between the event and the import
            frame = frame.f_back
        return False

    return importing_trusted


def remove_dangerous_functions() -> None:
    """Take away the calls that raise no audit event: pidfd_open/pidfd_send_signal,
    mkfifo/mknod, ``_posixsubprocess.fork_exec``; the hook refuses re-importing their modules."""
    import importlib

    def refused(*args, **kwargs):
        raise PermissionError("grading sandbox: not allowed while grading")

    for module_name, names in _REMOVED.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            if hasattr(module, name):
                setattr(module, name, refused)


def path_is_outside(path, dir_fd, allowed: str) -> bool:
    """Whether ``path`` (relative to ``dir_fd`` when one is given; an int is a descriptor)
    resolves outside ``allowed`` (a folder path ending with the separator)."""
    try:
        if isinstance(path, int):
            target = os.readlink(f"/proc/self/fd/{path}")
        else:
            p = os.fsdecode(os.fspath(path))
            if isinstance(dir_fd, int) and not os.path.isabs(p):
                p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
            target = os.path.realpath(p)
    except Exception:  # noqa: BLE001 - anything we cannot resolve is outside
        return True
    return not (target + os.sep).startswith(allowed) and target != "/dev/null"


def install_audit_hook(allowed_root: str, roots: tuple[str, ...]) -> None:
    """The audit hook (cannot be removed) refusing what the sandbox must not do."""
    allowed = os.path.realpath(allowed_root) + os.sep
    getpid, modules, isdir = os.getpid, sys.modules, os.path.isdir
    guard = threading.local()
    importing_trusted = trusted_import_checker(roots)
    outside = path_is_outside

    def check(event, args):
        if event == "open":
            path, mode, flags = (list(args) + [None, None, 0])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                      (isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and outside(path, None, allowed):
                raise PermissionError(f"grading sandbox: writing {path!r} is not allowed "
                                      "(only the temporary working directory is writable)")
            # a descriptor of a folder outside would serve as the dir_fd of a later write,
            # which the "open" event does not show: no such descriptor, then
            if not writing and not isinstance(path, int) and outside(path, None, allowed) \
                    and isdir(path):
                raise PermissionError(f"grading sandbox: opening the folder {path!r} is not "
                                      "allowed")
        elif event in _PATH_EVENTS:
            paths, dir_fds = _PATH_EVENTS[event]
            for i, position in enumerate(paths):
                if position >= len(args) or args[position] is None:
                    continue
                fd_position = dir_fds[min(i, len(dir_fds) - 1)] if dir_fds else None
                dir_fd = args[fd_position] if fd_position is not None and \
                    fd_position < len(args) else None
                if outside(args[position], dir_fd, allowed):
                    raise PermissionError(f"grading sandbox: {event} outside the working "
                                          "directory is not allowed")
        elif event == "os.kill":
            if args and args[0] not in (getpid(), 0):
                raise PermissionError("grading sandbox: signalling other processes")
        elif event == "import":
            if args and args[0] in _NO_REIMPORT and args[0] not in modules:
                raise PermissionError(f"grading sandbox: importing {args[0]} is not allowed")
        elif event in _CTYPES_EVENTS:
            if not importing_trusted():
                raise PermissionError(f"grading sandbox: {event} is not allowed while grading "
                                      "(ctypes only while importing installed packages)")
        elif event in _BLOCKED_EVENTS:
            raise PermissionError(f"grading sandbox: {event} is not allowed while grading")

    def hook(event, args):
        if getattr(guard, "busy", False):
            return
        guard.busy = True
        try:
            check(event, args)
        finally:
            guard.busy = False

    sys.addaudithook(hook)


# --------------------------------------------------------------------------- running student code

class FakeIPython:
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


def new_namespace(builtins_module=None) -> dict:
    """The cells' globals, as a notebook's: ``__main__``, with a no-op ``get_ipython()``."""
    namespace = {"__name__": "__main__"}
    if builtins_module is not None:
        namespace["__builtins__"] = builtins_module
    namespace["get_ipython"] = lambda: FakeIPython(namespace)
    return namespace


def to_python(source: str) -> str:
    """IPython syntax (``%magic``, ``!shell``, ``%%cell``) turned into plain Python calling
    ``get_ipython()``; runs here, under the cell's time limit, not in the grader."""
    if "%" not in source and "!" not in source:
        return source
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source)
    except Exception:  # noqa: BLE001 - an odd cell: its own error is reported when it runs
        return source


class Limiter:
    """Runs a function under a soft SIGALRM time limit (``SoftTimeout`` when it runs over)."""

    def __init__(self):
        self._setitimer, self._real = signal.setitimer, signal.ITIMER_REAL

        def on_alarm(signum, frame):
            raise SoftTimeout()

        signal.signal(signal.SIGALRM, on_alarm)

    def run(self, seconds, fn, *args, **kwargs):
        self._setitimer(self._real, seconds)
        try:
            return fn(*args, **kwargs)
        finally:
            self._setitimer(self._real, 0)


def describe(exc: BaseException, type_name) -> dict:
    """What the parent learns of an exception: its class name, builtin bases and message."""
    t = type(exc)
    try:
        message = str(exc)[:300]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        message = "(message unavailable)"
    bases = [c.__name__ for c in t.__mro__ if c.__module__ == "builtins"]
    if t is ReferenceImplementationCalled:
        bases.append(REFERENCE_ERROR)
    return {"kind": "raised", "name": type_name(t), "bases": bases, "message": message}


def compile_cell(source: str, index) -> object:
    """The cell's code object, its source registered with ``linecache`` as IPython does, so that
    ``inspect.getsource`` finds the cell's functions (``@triton.jit`` reads its kernel's source)."""
    text, name = to_python(source), f"<cell {index}>"
    linecache.cache[name] = (len(text), None, text.splitlines(keepends=True), name)
    return compile(text, name, "exec")


def run_cells(cells, namespace, channel: Channel, limiter: Limiter, timeout_s: float,
              type_name) -> None:
    """Each cell under its time limit: ``cell_start``, then ``cell_end`` with its error."""
    monotonic = time.monotonic
    for index, source in cells:
        channel.send("cell_start", index=index)
        error, started = None, monotonic()
        try:
            code = limiter.run(timeout_s, compile_cell, source, index)
            limiter.run(timeout_s, exec, code, namespace)
        except SoftTimeout:
            error = {"kind": "timeout", "seconds": timeout_s}
        except BaseException as exc:  # noqa: BLE001 - SystemExit, MemoryError, anything
            error = describe(exc, type_name)
        channel.send("cell_end", index=index, error=error,
                     seconds=round(monotonic() - started, 3))


def make_call(call: dict, namespace: dict, adapters: dict, limiter: Limiter, timeout_s: float,
              to_plain, type_name) -> tuple[dict, list[str]]:
    """One call of the learner's function: ({"value": plain} or {"error": {...}}, references
    recorded)."""
    name = call["name"]
    if name not in namespace:
        return {"error": {"kind": "missing", "name": name}}, []
    if call["kind"] == "value":
        return {"value": to_plain(namespace[name])}, []
    fn = namespace[name]
    adapter = adapters.get(call.get("adapter"))
    RECORD.names, RECORD.active = [], True
    try:
        if adapter is not None:
            raw = limiter.run(timeout_s, adapter, fn, *call["args"], **call["kwargs"])
        else:
            raw = limiter.run(timeout_s, fn, *call["args"], **call["kwargs"])
        RECORD.active = False
        outcome = {"value": limiter.run(timeout_s, to_plain, raw)}
    except SoftTimeout:
        outcome = {"error": {"kind": "timeout", "seconds": timeout_s}}
    except BaseException as exc:  # noqa: BLE001
        outcome = {"error": describe(exc, type_name)}
    finally:
        RECORD.active = False
    return outcome, list(dict.fromkeys(RECORD.names))


def run_calls(calls, namespace, adapters, channel: Channel, limiter: Limiter, timeout_s: float,
              to_plain, type_name) -> None:
    """Every call in order: ``call_start`` then exactly one ``result``. A function that timed out
    once is not called again."""
    timed_out: set[str] = set()
    for call in calls:
        channel.send("call_start", id=call["id"])
        if call["name"] in timed_out:
            outcome, refs = {"error": {"kind": "skipped", "seconds": timeout_s}}, []
        else:
            outcome, refs = make_call(call, namespace, adapters, limiter, timeout_s, to_plain,
                                      type_name)
            if outcome.get("error", {}).get("kind") == "timeout":
                timed_out.add(call["name"])
        channel.send("result", id=call["id"], refs=refs, **outcome)


def load_adapters(calls) -> dict:
    import importlib

    adapters = {}
    for dotted in {c["adapter"] for c in calls if c.get("adapter")}:
        module, _, name = dotted.partition(":")
        adapters[dotted] = getattr(importlib.import_module(module), name)
    return adapters


def replace_check() -> None:
    """``utils.labs.check.check`` becomes a no-op (the learner's self-check is not graded)."""
    import types

    import utils.labs

    stub = types.ModuleType("utils.labs.check")
    stub.check = lambda *args, **kwargs: None
    stub.__doc__ = "replaced by a no-op while grading"
    sys.modules["utils.labs.check"] = stub
    utils.labs.check = stub


def main() -> None:  # pragma: no cover - runs in the sandboxed process (its pieces are tested)
    job = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    channel = Channel(job["result_fd"])
    sys.path.insert(0, job["repo_root"])
    os.chdir(job["workdir"])
    set_limits(job["limits"])
    import importlib

    from utils.labs.sandbox import _type_name, to_plain

    builtins_module = importlib.import_module("builtins")
    setattr(builtins_module, REFERENCE_ERROR, ReferenceImplementationCalled)
    replace_check()
    for module in job.get("preimport", []):
        importlib.import_module(module)
    if job.get("ipython"):
        importlib.import_module("IPython.core.inputtransformer2")
    adapters = load_adapters(job["calls"])
    roots = trusted_roots()
    disable_references(job.get("references", []), roots)
    disable_spec_expected(job.get("lab"))
    limiter = Limiter()
    remove_dangerous_functions()
    install_audit_hook(job["workdir"], roots)
    channel.send("ready", sandbox=job.get("sandbox", "none"))
    stdout, stderr = CappedText(), CappedText()
    sys.stdout, sys.stderr = stdout, stderr
    namespace = new_namespace(builtins_module)
    run_cells(job["cells"], namespace, channel, limiter, job["cell_timeout_s"], _type_name)
    run_calls(job["calls"], namespace, adapters, channel, limiter, job["call_timeout_s"],
              to_plain, _type_name)
    channel.send("done", stdout=stdout.getvalue()[-4000:], stdout_chars=stdout.total,
                 stderr=stderr.getvalue()[-4000:], stderr_chars=stderr.total)
    os._exit(0)  # skip anything the student registered with atexit


if __name__ == "__main__":
    main()
