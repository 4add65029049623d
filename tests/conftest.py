"""Fixtures, the settings of a pytest run (environment, BLAS threads) and the deselection of
the ``interpret`` tests when Triton's CPU interpreter is off.

Shared helpers live in :mod:`tests.helpers` (``from tests.helpers import ...``).
"""

import os

import pytest
import torch

from tests.helpers import tiny_llama

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


@pytest.fixture
def llama():
    return tiny_llama


#: how many ``interpret`` tests this run deselected (an xdist worker reports its count)
_DESELECTED = pytest.StashKey[int]()


def pytest_collection_modifyitems(config, items):
    """Deselect the ``interpret`` tests (Triton kernels on the CPU interpreter) unless
    ``TRITON_INTERPRET`` is on: Triton reads it when it is imported, so those tests run in a
    pytest run of their own (``TRITON_INTERPRET=1 pytest -m interpret``, see scripts/test.sh).
    This file never imports triton."""
    from lowrank_optim.kernels.dispatch import interpreter_enabled

    if interpreter_enabled():
        return
    kept, deselected = [], []
    for item in items:
        (deselected if item.get_closest_marker("interpret") else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
        config.stash[_DESELECTED] = len(deselected)
        if hasattr(config, "workeroutput"):  # an xdist worker: tell the controller
            config.workeroutput["interpret_deselected"] = len(deselected)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: the count of a worker (they all collect the same tests)."""
    count = getattr(node, "workeroutput", {}).get("interpret_deselected", 0)
    node.config.stash[_DESELECTED] = max(count, node.config.stash.get(_DESELECTED, 0))


def pytest_terminal_summary(terminalreporter, config):
    if count := config.stash.get(_DESELECTED, 0):
        terminalreporter.write_line(
            f"{count} interpret tests deselected (TRITON_INTERPRET is off): they run with "
            "TRITON_INTERPRET=1 python -m pytest -m interpret")
