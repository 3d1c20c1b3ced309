"""The test run's machine policy, loaded by pytest (``-p utils.pytest_plugin`` in pyproject.toml).

- Threads: with N parallel workers (pytest-xdist) each process, and each notebook kernel it
  starts, gets ``$COURSE_THREADS = cores // N`` threads (at least 1), so 2 workers on 2 cores
  never oversubscribe (OpenMP spin-waits make that tens of times slower). Set COURSE_THREADS
  yourself to override.
- ``--isa avx2``: force the back-ends whose results depend on the ISA down to AVX2: oneDNN
  (``ONEDNN_MAX_CPU_ISA``: fp32 and bf16 matmul, so bf16 is emulated) and FBGEMM
  (``FBGEMM_ENABLE_INSTRUCTIONS``: int8 GEMM without VNNI), so a run on an AVX-512/AMX machine
  proves the saved notebook outputs also hold on an AVX2-only laptop. CI runs the notebooks this
  way a second time. ``--isa avx2-aten`` also sets ``ATEN_CPU_CAPABILITY=avx2``; with torch
  2.13 on an AVX-512 host that makes a ``torch.compile``d decoder block return NaN (each of its
  operators compiles correctly alone; an AVX2-only CPU compiles it correctly), so it is not
  CI's default.
- Inductor cache: each test run compiles into a fresh cache folder (``TORCHINDUCTOR_CACHE_DIR``,
  shared by its workers and notebook kernels), so an entry a crashed or interrupted earlier run
  left in the machine-wide cache cannot change this run's results.
"""

from __future__ import annotations

import os
import tempfile

FORCED_ISA = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
              "avx2-aten": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}}


def pytest_addoption(parser):
    parser.addoption("--isa", choices=sorted(FORCED_ISA), default=None,
                     help="force torch's CPU kernels down to this ISA for the whole run "
                          "(workers and notebook kernels inherit it)")


def _workers(config) -> int:
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        return int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    n = getattr(config.option, "numprocesses", None)
    if n == "auto" or n == "logical":
        return os.cpu_count() or 1
    return int(n or 1)


def pytest_configure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller: once per run
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    isa = config.getoption("isa")
    if isa:
        os.environ.update(FORCED_ISA[isa])
    workers = _workers(config)
    if workers > 1:
        os.environ.setdefault("COURSE_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    if os.environ.get("COURSE_THREADS"):
        os.environ.setdefault("OMP_NUM_THREADS", os.environ["COURSE_THREADS"])
        from utils.bench import set_threads

        set_threads()


def pytest_report_header(config):
    from utils.bench import cpu_capabilities

    import torch

    caps = cpu_capabilities()
    forced = " ".join(f"{k}={v}" for k, v in caps["forced"].items()) or "none"
    return (f"course: torch threads {torch.get_num_threads()} (COURSE_THREADS="
            f"{os.environ.get('COURSE_THREADS', 'unset')}), aten {caps['aten']}, "
            f"int8 VNNI {caps['int8_vnni']}, native bf16 {caps['native_bf16']}, forced: {forced}")
