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
    python -m benchmarks.kernels --shapes 1b,7b --ranks 128,256,512,1024 --sides auto \
        --dtype bf16 --peak --json kernels.json   # scripts/gpu_check.sh's run

``--shapes`` takes LLaMA config names (``lowrank_optim.model_configs.LLAMA_SHAPES``: the
``hidden x hidden`` and ``hidden x intermediate`` weights) or ``ROWSxCOLS``; ``--sides auto``
times only the side GaLore's ``std`` projection picks.  ``--peak`` first measures the card's
own ceilings in the same run, a large ``torch.matmul`` per dtype (bf16 and fp32, TF32 as torch
is set) and a large tensor copy (bytes read + written), and adds each row's fraction of them;
``--json`` writes every row (rewritten after each case, so an interrupted run keeps what it
measured).

Without CUDA (and without ``--cpu-reference``) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks._common import machine, write_result
from lowrank_optim import kernels
from lowrank_optim.kernels import reference
from lowrank_optim.model_configs import LLAMA_SHAPES

GPU_SHAPES = [(4096, 4096), (4096, 11008)]
GPU_RANKS = [128, 512, 1024]
CPU_SHAPES = [(256, 256), (256, 688)]
CPU_RANKS = [16, 64]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIDES = {"both": ("right", "left"), "right": ("right",), "left": ("left",)}


@dataclass
class Case:
    """One operation at one shape, timed for several implementations."""

    op: str
    shape: str
    flops: float  # 0 for elementwise kernels
    bytes: float  # minimum bytes moved (inputs read once, outputs written once)
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    baseline: str = "torch"
    #: structured description of the case, for ``--json``
    info: dict = field(default_factory=dict)


def time_gpu(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median seconds of ``fn`` on the GPU (Triton's do_bench: warm-up, L2 flush, events)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                   return_mode="median") * 1e-3


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
    info = {"m": m, "n": n, "r": r, "side": side, "dtype": str(dtype).removeprefix("torch.")}
    out: list[Case] = []

    def tri(name: str) -> Callable:
        return getattr(kernels, name)

    # 1. projection: cuBLAS (the reference is torch.matmul) vs Triton
    c = Case("project", shape, gemm_flops, size * (grad.numel() + basis.numel() + low.numel()),
             info=info)
    c.impls["torch"] = lambda: reference.project(grad, basis, side)
    if triton:
        c.impls["triton"] = lambda: tri("project")(grad, basis, side, backend="triton")
    out.append(c)

    # 3. back-projection fused with the update and galore's decay after it
    upd_bytes = size * (2 * m * n + low.numel() + basis.numel())
    c = Case("back+update+decay", shape, gemm_flops, upd_bytes, info=info)

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
    c = Case("adam_update", f"{low_shape[0]}x{low_shape[1]}", 0.0, 4 * 6 * g32.numel(),
             info={**info, "dtype": "float32"})
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
    info = {"m": m, "n": n, "r": r, "side": side, "dtype": str(dtype).removeprefix("torch.")}
    out = []
    c = Case("dct_scores (l2)", f"{m}x{n} n={k}", 2.0 * m * n * k, size * (m * n + k * k),
             info={**info, "r": None})
    c.impls["torch"] = lambda: reference.dct_scores_matmul(grad, q, side, "l2")
    if triton:
        c.impls["triton"] = lambda: kernels.dct_scores_matmul(
            grad, q, side, "l2", backend="triton")
    out.append(c)
    c = Case("project_indexed", f"{m}x{n} r={r} {side}", 2.0 * m * n * r,
             size * (m * n + 2 * r * k + r * max(m, n)), info=info)
    c.impls["torch"] = lambda: reference.project_indexed(grad, q, idx, side)
    if triton:
        c.impls["triton"] = lambda: kernels.project_indexed(
            grad, q, idx, side, backend="triton")
    out.append(c)
    return out


def table(rows: list[Case], timer: Callable[[Callable], float], peak: dict | None = None,
          records: list[dict] | None = None,
          on_case: Callable[[], None] | None = None) -> str:
    """The markdown table of ``rows``, printed as it goes.  With ``peak`` (see
    :func:`measure_peak`) two columns more: the fraction of the measured matmul rate of the
    case's dtype and of the measured copy bandwidth.  Each timed row is appended to
    ``records`` (for ``--json``) and ``on_case`` is called after each case."""
    head = "| op | shape | impl | time (us) | TFLOP/s | GB/s | speed-up vs torch |"
    rule = "|---|---|---|---:|---:|---:|---:|"
    if peak:
        head += " % matmul peak | % copy BW |"
        rule += "---:|---:|"
    lines = [head, rule]
    print("\n".join(lines))
    for case in rows:
        times = {name: timer(fn) for name, fn in case.impls.items()}
        base = times[case.baseline]
        for name, t in times.items():
            tflops = f"{case.flops / t / 1e12:.2f}" if case.flops else "-"
            line = (f"| {case.op} | {case.shape} | {name} | {t * 1e6:.1f} | {tflops} | "
                    f"{case.bytes / t / 1e9:.1f} | {base / t:.2f}x |")
            rate = peak.get("matmul_tflops", {}).get(case.info.get("dtype")) if peak else None
            frac_flops = case.flops / t / 1e12 / rate if rate and case.flops else None
            frac_bw = (case.bytes / t / 1e9 / peak["copy_gbps"]
                       if peak and peak.get("copy_gbps") else None)
            if peak:
                line += (f" {'-' if frac_flops is None else f'{100 * frac_flops:.0f}%'} | "
                         f"{'-' if frac_bw is None else f'{100 * frac_bw:.0f}%'} |")
            lines.append(line)
            if records is not None:
                records.append({
                    "op": case.op, "shape": case.shape, **case.info, "impl": name,
                    "seconds": t, "flops": case.flops, "bytes": case.bytes,
                    "tflops": case.flops / t / 1e12 if case.flops else None,
                    "gbps": case.bytes / t / 1e9, "speedup_vs_torch": base / t,
                    "speedup_vs_torch_unfused": (times["torch unfused"] / t
                                                 if "torch unfused" in times else None),
                    "frac_matmul_peak": frac_flops, "frac_copy_bw": frac_bw})
        print("\n".join(lines[-len(times):]), flush=True)
        if on_case is not None:
            on_case()
    return "\n".join(lines)


def measure_peak(device: str, timer: Callable[[Callable], float], dtypes: list[str]) -> dict:
    """The machine's own ceilings, measured now: ``torch.matmul`` TFLOP/s of a large square
    product per dtype (bf16 and fp32 always, plus ``dtypes``; fp32 as torch's TF32 switch is
    set) and the GB/s of a large tensor copy (bytes read + bytes written)."""
    size = 8192 if device == "cuda" else 512
    rates = {}
    for name in dict.fromkeys(["bf16", "fp32", *dtypes]):
        dtype = DTYPES[name]
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        seconds = timer(lambda a=a, b=b: a @ b)
        rates[str(dtype).removeprefix("torch.")] = 2.0 * size**3 / seconds / 1e12
        del a, b
    numel = (1 << 28) if device == "cuda" else (1 << 21)  # fp32: 1 GiB on GPU, 8 MiB on CPU
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    copy_s = timer(lambda src=src, dst=dst: dst.copy_(src))
    del src, dst
    peak = {"matmul_size": size, "matmul_tflops": rates, "copy_bytes": moved,
            "copy_gbps": moved / copy_s / 1e9,
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    print("measured ceilings: " + ", ".join(f"{k} matmul {v:.1f} TFLOP/s"
                                            for k, v in rates.items())
          + f", copy {peak['copy_gbps']:.0f} GB/s", flush=True)
    return peak


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``1b,7b`` (config names: their ``hidden x hidden`` and ``hidden x intermediate``
    weights) and/or ``ROWSxCOLS`` items, comma-separated."""
    shapes: list[tuple[int, int]] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in LLAMA_SHAPES:
            hidden, inter, _, _ = LLAMA_SHAPES[item]
            shapes += [(hidden, hidden), (hidden, inter)]
        elif re.fullmatch(r"\d+x\d+", item.lower()):
            rows, cols = item.lower().split("x")
            shapes.append((int(rows), int(cols)))
        else:
            raise argparse.ArgumentTypeError(
                f"shape {item!r}: expected ROWSxCOLS or one of {sorted(LLAMA_SHAPES)}")
    return list(dict.fromkeys(shapes))


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ranks {text!r}: expected integers, e.g. 128,512") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks {text!r}: expected positive integers")
    return ranks


def std_side(m: int, n: int) -> str:
    """The side GaLore's ``std`` projection picks for an ``m x n`` weight."""
    return "right" if m >= n else "left"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--cpu-reference", action="store_true",
                        help="time the torch reference path on the CPU at small shapes")
    parser.add_argument("--write", action="store_true", help="write results/kernels_*.md")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="config names (1b,7b: their hidden x hidden and hidden x "
                             "intermediate weights) or ROWSxCOLS, comma-separated (default: "
                             "4096x4096,4096x11008 on GPU, 256x256,256x688 on CPU)")
    parser.add_argument("--ranks", type=parse_ranks, default=None,
                        help="comma-separated ranks (default 128,512,1024 on GPU, 16,64 on CPU)")
    parser.add_argument("--sides", choices=[*SIDES, "auto"], default="both",
                        help="projection sides; auto: the one GaLore's std projection picks")
    parser.add_argument("--peak", action="store_true",
                        help="measure the matmul rate and copy bandwidth first and report each "
                             "row's fraction of them")
    parser.add_argument("--json", default=None, help="write every row here as JSON")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="GPU: do_bench warm-up")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="GPU: do_bench repetition")
    args = parser.parse_args(argv)
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
        device, shapes, ranks, triton = "cuda", GPU_SHAPES, GPU_RANKS, True

        def timer(fn: Callable[[], object]) -> float:
            return time_gpu(fn, args.warmup_ms, args.rep_ms)
    shapes = args.shapes or shapes
    ranks = args.ranks or ranks

    if device == "cpu":
        note = (f"CPU, 1 torch thread, best of 15; load average {os.getloadavg()[0]:.1f} at "
                "start. Torch reference path only (no Triton on CPU).")
    else:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        note = (f"fp32 GEMMs: {'TF32' if tf32 else 'IEEE fp32'} (torch's setting, which the "
                "Triton kernels follow); median of triton.testing.do_bench.")
    records: list[dict] = []
    result = {"device": device, "machine": machine(), "shapes": shapes, "ranks": ranks,
              "sides": args.sides, "dtypes": dtypes, "peak": None, "rows": records,
              "complete": False}

    def dump() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    peak = None
    if args.peak:
        peak = result["peak"] = measure_peak(device, timer, dtypes)
        rates = ", ".join(f"{k} matmul {v:.1f} TFLOP/s"
                          for k, v in peak["matmul_tflops"].items())
        note += (f" Measured ceilings: {rates}, copy {peak['copy_gbps']:.0f} GB/s "
                 f"({peak['copy_bytes'] / 2**30:.2f} GiB moved per copy).")
        dump()
    sections = [note + " Speed-up = torch time / impl time; GB/s = minimum bytes / time.\n"]
    for dname in dtypes:
        dtype = DTYPES[dname]
        rows = []
        for m, n in shapes:
            for r in ranks:
                if r > min(m, n):
                    continue
                sides = (std_side(m, n),) if args.sides == "auto" else SIDES[args.sides]
                for side in sides:
                    rows += cases(m, n, r, side, dtype, device, triton)
            rows += dct_cases(m, n, min(ranks[0], min(m, n)), dtype, device, triton)
        print(f"\n## {dname} on {device}\n")
        sections.append(f"## {dname}\n\n{table(rows, timer, peak, records, dump)}\n")
    result["complete"] = True
    dump()
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
