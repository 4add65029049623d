"""Shared helpers for benchmark scripts: machine description, timing, result files."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line naming the machine the numbers come from."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
        return f"{dev}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def block_params(config: str, device: str) -> list[torch.nn.Parameter]:
    """One LLaMA decoder block's weights (q, k, v, o, gate, up, down) with fixed random
    gradients, for optimizer-step benchmarks."""
    from lowrank_optim.model_configs import LLAMA_SHAPES

    hidden, inter, _, _ = LLAMA_SHAPES[config]
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    g = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).mul_(0.02).to(device))
        p.grad = torch.randn(shape, generator=g).to(device)
        params.append(p)
    return params


def write_result(name: str, title: str, body: str) -> Path:
    """Write ``benchmarks/results/<name>.md`` with a header naming the machine and date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(f"# {title}\n\nMachine: {machine()}  \nDate: {stamp}\n\n{body}\n")
    return path
