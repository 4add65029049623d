"""Fixtures, the settings of a pytest run (environment, BLAS threads) and the deselection of
the tests that run elsewhere: ``interpret`` (Triton's CPU interpreter off), ``aot`` (unless
``-m`` names it) and ``gpu`` (no CUDA GPU), one summary line each instead of a skip line per
test.

Shared helpers live in :mod:`tests.helpers` (``from tests.helpers import ...``).
"""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one BLAS thread per xdist worker: the workers already fill the cores, and oversubscribed
# OpenMP threads spin at barriers (an SVD then runs up to 50x slower)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


@pytest.fixture
def one_thread():
    """One BLAS thread per pytest worker for in-process recipe runs (CI: two workers, two
    cores); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: how many tests of each run-of-its-own marker this run deselected (xdist workers report)
_DESELECTED = pytest.StashKey[dict]()
#: markers whose tests run in a pytest run of their own (see scripts/test.sh)
OWN_RUN = {
    "interpret": "TRITON_INTERPRET=1 python -m pytest -m interpret",
    "aot": "python -m pytest -m aot (ahead-of-time GPU compilation, minutes)",
    "gpu": ("a CUDA GPU (bash scripts/gpu_check.sh), or on the interpreter with "
            "LOWRANK_OPTIM_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 python -m pytest -m gpu"),
}


def _own_run_wanted(config, marker: str) -> bool:
    from lowrank_optim.kernels.dispatch import interpreter_enabled

    if marker == "interpret":
        return interpreter_enabled()
    named = marker in (config.option.markexpr or "")
    if marker == "gpu":  # a run on a GPU, or one that names them (it then reports skips)
        return (torch.cuda.is_available() or named
                or any("test_gpu.py" in str(a) for a in config.args)
                or os.environ.get("LOWRANK_OPTIM_GPU_TESTS_ON_CPU", "") == "1")
    return named


def pytest_collection_modifyitems(config, items):
    """Deselect the tests of :data:`OWN_RUN` markers unless this run is theirs: ``interpret``
    (Triton kernels on the CPU interpreter) unless ``TRITON_INTERPRET`` is on, since Triton
    reads it when it is imported; ``aot`` (compiling every kernel for GPU targets) unless
    ``-m`` names it; ``gpu`` without a CUDA GPU unless the run names them.  This file never
    imports triton."""
    wanted = {m for m in OWN_RUN if _own_run_wanted(config, m)}
    kept, counts = [], dict.fromkeys(OWN_RUN, 0)
    deselected = []
    for item in items:
        marker = next((m for m in OWN_RUN if item.get_closest_marker(m)), None)
        if marker is None or marker in wanted:
            kept.append(item)
        else:
            counts[marker] += 1
            deselected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
    config.stash[_DESELECTED] = counts
    if hasattr(config, "workeroutput"):  # an xdist worker: tell the controller
        config.workeroutput["own_run_deselected"] = counts


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: the counts of a worker (they all collect the same tests)."""
    counts = getattr(node, "workeroutput", {}).get("own_run_deselected", {})
    mine = node.config.stash.get(_DESELECTED, {})
    node.config.stash[_DESELECTED] = {m: max(counts.get(m, 0), mine.get(m, 0))
                                      for m in OWN_RUN}


def pytest_terminal_summary(terminalreporter, config):
    for marker, count in config.stash.get(_DESELECTED, {}).items():
        if count:
            terminalreporter.write_line(
                f"{count} {marker} tests deselected: they run with {OWN_RUN[marker]}")
