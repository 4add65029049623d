"""Each Triton kernel against the unfused torch path and cuBLAS, on LLaMA-7B shapes.

Shapes: weights 4096 x 4096 and 4096 x 11008 at r = 128 / 512 / 1024, both projection sides.
For every kernel the table gives the median time, the FLOP rate (GEMMs) and the effective
bandwidth (the minimum bytes the operation must move, divided by the time; the same numerator
for every implementation), and the speed-up against the torch reference as a ratio.

    python -m benchmarks.kernels                  # CUDA GPU: Triton vs torch, fp32 and bf16
    python -m benchmarks.kernels --dtype bf16     # one dtype
    python -m benchmarks.kernels --write          # also writes results/kernels_<gpu>.md
    python -m benchmarks.kernels --cpu-reference  # no GPU: times the torch path on the CPU at
                                                  # small shapes (exercises the script)

Without CUDA (and without ``--cpu-reference``) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks._common import machine, write_result
from lowrank_optim import kernels
from lowrank_optim.kernels import reference

GPU_SHAPES = [(4096, 4096), (4096, 11008)]
GPU_RANKS = [128, 512, 1024]
CPU_SHAPES = [(256, 256), (256, 688)]
CPU_RANKS = [16, 64]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Case:
    """One operation at one shape, timed for several implementations."""

    op: str
    shape: str
    flops: float  # 0 for elementwise kernels
    bytes: float  # minimum bytes moved (inputs read once, outputs written once)
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    baseline: str = "torch"


def time_gpu(fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` on the GPU (Triton's do_bench: warm-up, L2 flush, events)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def time_cpu(fn: Callable[[], object], repeats: int = 15) -> float:
    """Best-of-``repeats`` seconds of ``fn`` on the CPU (robust to other processes' load)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _rand(*shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def cases(m: int, n: int, r: int, side: str, dtype: torch.dtype, device: str,
          triton: bool) -> list[Case]:
    """The benchmark cases of one (shape, rank, side); Triton entries only when ``triton``."""
    size = torch.finfo(dtype).bits // 8
    low_shape = (m, r) if side == "right" else (r, n)
    basis_shape = (r, n) if side == "right" else (m, r)
    grad = _rand(m, n, dtype=dtype, device=device)
    param = _rand(m, n, dtype=dtype, device=device)
    basis = _rand(*basis_shape, dtype=dtype, device=device)
    low = _rand(*low_shape, dtype=dtype, device=device)
    shape = f"{m}x{n} r={r} {side}"
    gemm_flops = 2.0 * m * n * r
    out: list[Case] = []

    def tri(name: str) -> Callable:
        return getattr(kernels, name)

    # 1. projection: cuBLAS (the reference is torch.matmul) vs Triton
    c = Case("project", shape, gemm_flops, size * (grad.numel() + basis.numel() + low.numel()))
    c.impls["torch"] = lambda: reference.project(grad, basis, side)
    if triton:
        c.impls["triton"] = lambda: tri("project")(grad, basis, side, backend="triton")
    out.append(c)

    # 3. back-projection fused with the update and galore's decay after it
    upd_bytes = size * (2 * m * n + low.numel() + basis.numel())
    c = Case("back+update+decay", shape, gemm_flops, upd_bytes)

    def unfused() -> None:  # full-size back(N) materialised, then two passes
        back = reference.project_back(low, basis, side)
        param.add_(back, alpha=-1e-6)
        param.add_(param, alpha=-1e-6)

    c.impls["torch unfused"] = unfused
    c.impls["torch"] = lambda: reference.project_back_update(
        param, low, basis, side, -1e-6, 0.0, 1e-6)
    if triton:
        c.impls["triton"] = lambda: tri("project_back_update")(
            param, low, basis, side, -1e-6, 0.0, 1e-6, backend="triton")
    out.append(c)

    # 2. Adam moments + direction on the low-rank gradient (fp32 moments as in training)
    g32 = low.float()
    m32, v32 = torch.zeros_like(g32), torch.rand_like(g32)
    c = Case("adam_update", f"{low_shape[0]}x{low_shape[1]}", 0.0, 4 * 6 * g32.numel())
    c.impls["torch"] = lambda: reference.adam_update(g32, m32, v32, 0.9, 0.999, 1e-6)
    if triton:
        c.impls["triton"] = lambda: tri("adam_update")(
            g32, m32, v32, 0.9, 0.999, 1e-6, backend="triton")
    out.append(c)
    return out


def dct_cases(m: int, n: int, r: int, dtype: torch.dtype, device: str,
              triton: bool) -> list[Case]:
    """DCT scoring (``G Q^T`` never stored by Triton) and the indexed projection."""
    size = torch.finfo(dtype).bits // 8
    side = "right" if m >= n else "left"
    k = min(m, n)
    grad = _rand(m, n, dtype=dtype, device=device)
    q = torch.linalg.qr(torch.randn(k, k, device=device))[0].to(dtype)
    idx = torch.randperm(k, device=device)[:r].sort().values.to(torch.int32)
    out = []
    c = Case("dct_scores (l2)", f"{m}x{n} n={k}", 2.0 * m * n * k, size * (m * n + k * k))
    c.impls["torch"] = lambda: reference.dct_scores_matmul(grad, q, side, "l2")
    if triton:
        c.impls["triton"] = lambda: kernels.dct_scores_matmul(
            grad, q, side, "l2", backend="triton")
    out.append(c)
    c = Case("project_indexed", f"{m}x{n} r={r} {side}", 2.0 * m * n * r,
             size * (m * n + 2 * r * k + r * max(m, n)))
    c.impls["torch"] = lambda: reference.project_indexed(grad, q, idx, side)
    if triton:
        c.impls["triton"] = lambda: kernels.project_indexed(
            grad, q, idx, side, backend="triton")
    out.append(c)
    return out


def table(rows: list[Case], timer: Callable[[Callable], float]) -> str:
    lines = ["| op | shape | impl | time (us) | TFLOP/s | GB/s | speed-up vs torch |",
             "|---|---|---|---:|---:|---:|---:|"]
    print("\n".join(lines))
    for case in rows:
        times = {name: timer(fn) for name, fn in case.impls.items()}
        base = times[case.baseline]
        for name, t in times.items():
            tflops = f"{case.flops / t / 1e12:.2f}" if case.flops else "-"
            lines.append(f"| {case.op} | {case.shape} | {name} | {t * 1e6:.1f} | {tflops} | "
                         f"{case.bytes / t / 1e9:.1f} | {base / t:.2f}x |")
        print("\n".join(lines[-len(times):]), flush=True)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--cpu-reference", action="store_true",
                        help="time the torch reference path on the CPU at small shapes")
    parser.add_argument("--write", action="store_true", help="write results/kernels_*.md")
    args = parser.parse_args()
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]

    if args.cpu_reference:
        torch.set_num_threads(1)
        device, shapes, ranks, timer, triton = "cpu", CPU_SHAPES, CPU_RANKS, time_cpu, False
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the Triton kernels run only there; "
              "TRITON_INTERPRET timings are meaningless). No CUDA device found: nothing to "
              "measure. Use --cpu-reference to time the torch reference path on the CPU.")
        return 0
    else:
        if not kernels.dispatch.triton_available():
            print("triton is not installed: pip install 'lowrank-optim[triton]'")
            return 0
        device, shapes, ranks, timer, triton = "cuda", GPU_SHAPES, GPU_RANKS, time_gpu, True

    if device == "cpu":
        note = (f"CPU, 1 torch thread, best of 15; load average {os.getloadavg()[0]:.1f} at "
                "start. Torch reference path only (no Triton on CPU).")
    else:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        note = (f"fp32 GEMMs: {'TF32' if tf32 else 'IEEE fp32'} (torch's setting, which the "
                "Triton kernels follow); median of triton.testing.do_bench.")
    sections = [note + " Speed-up = torch time / impl time; GB/s = minimum bytes / time.\n"]
    for dname in dtypes:
        dtype = DTYPES[dname]
        rows = []
        for m, n in shapes:
            for r in ranks:
                for side in ("right", "left"):
                    rows += cases(m, n, r, side, dtype, device, triton)
            rows += dct_cases(m, n, ranks[0], dtype, device, triton)
        print(f"\n## {dname} on {device}\n")
        sections.append(f"## {dname}\n\n{table(rows, timer)}\n")
    body = "\n".join(sections)
    print()
    if args.write:
        name = "kernels_cpu_reference" if device == "cpu" else \
            "kernels_" + torch.cuda.get_device_name().lower().replace(" ", "_")
        title = ("Kernel benchmark: torch reference path on CPU (no Triton)" if device == "cpu"
                 else "Kernel benchmark: Triton vs torch / cuBLAS")
        print(f"wrote {write_result(name, title, body)}  ({machine()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
