"""Cost of refreshing one layer's subspace: exact SVD (GaLore) against the DCT selection.

For each LLaMA weight shape a fixed random gradient is given to

* ``svd``: :class:`~lowrank_optim.projectors.SVDProjector`'s refresh (one
  ``torch.linalg.svd`` of the gradient in fp32, the basis kept);
* ``dct matmul``: :class:`~lowrank_optim.projectors.DCTProjector`'s refresh with
  ``score_route="matmul"`` (coefficients by one GEMM with the shared basis, top-r selection,
  low-rank gradient gathered from the coefficients);
* ``dct fft``: the same with ``score_route="fft"`` (fast DCT by the real FFT).

The DCT timings include producing the low-rank gradient, the SVD timing does not (GaLore needs
one more ``m n r`` GEMM for it), so the ratios are conservative.  The shared DCT basis is built
before timing (once per size for the whole model) and its build time is reported apart.
State bytes per layer come from :func:`lowrank_optim.memory.state_bytes` after one real
optimizer step (moments + projector or indices); the DCT basis is listed once per size.

    python -m benchmarks.refresh_cost                 # all shapes (~2 min on 2 idle cores)
    python -m benchmarks.refresh_cost --svd-max 2048  # skip the 4096-row SVDs (~70 s of it)
    python -m benchmarks.refresh_cost --quick         # up to 2048 x 2048 only (~15 s)
    python -m benchmarks.refresh_cost --shapes 1024x1024,4096x11008 --repeats 5
    python -m benchmarks.refresh_cost --device cuda --shapes 2048x2048,2048x5461 \
        --json refresh.json --no-write       # scripts/gpu_check.sh's run

Results go to ``benchmarks/results/refresh_cost_<cpu|cuda>.md`` (``--no-write`` prints only;
``--json`` writes the timings too).  On CUDA every timed run is synchronised.  Wall times on a
shared machine move with its load; the 1-minute load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import lowrank_optim as lo
from benchmarks._common import machine, write_result
from lowrank_optim.memory import state_bytes

#: (rows, cols) of LLaMA weights and the GaLore paper's rank for that model size
DEFAULT_SHAPES = ["512x512", "1024x1024", "2048x2048", "4096x4096", "4096x11008"]
PAPER_RANKS = {512: 128, 1024: 256, 2048: 512, 4096: 1024}
METHODS = ("svd", "dct matmul", "dct fft")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_shape(text: str) -> tuple[int, int]:
    rows, cols = (int(v) for v in text.lower().split("x"))
    return rows, cols


def time_refresh(fn, repeats: int, slow_s: float,
                 device: torch.device | None = None) -> tuple[float, int]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up; a first run slower
    than ``slow_s`` is reported alone (the warm-up is skipped for it).  On CUDA each run is
    synchronised before and after."""
    device = device or torch.device("cpu")
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    if first > slow_s:
        return first, 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), repeats


def make_optimizer(method: str, param: torch.nn.Parameter, rank: int) -> lo.LowRankOptimizer:
    group = {"params": [param], "rank": rank, "update_proj_gap": None, "scale": 0.25}
    if method == "svd":
        return lo.GaLoreAdamW([group], lr=1e-3)
    return lo.DCTAdamW([group], lr=1e-3, score_route=method.split()[-1])


def measure(shape: tuple[int, int], rank: int, svd_max: int, repeats: int, slow_s: float,
            seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    dev = torch.device(device)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dev, dtype)
    row: dict = {"shape": shape, "rank": rank}
    for method in METHODS:
        if method == "svd" and min(shape) > svd_max:
            row[method] = None
            continue
        param = torch.nn.Parameter(torch.zeros(shape, device=dev, dtype=dtype))
        opt = make_optimizer(method, param, rank)
        group, state = opt.param_groups[0], opt.state[param]
        if method != "svd":
            _, n = lo.projectors.dct_side(shape)
            _sync(dev)
            t0 = time.perf_counter()
            opt.projector.basis(n, grad.device, grad.dtype)
            _sync(dev)
            row["basis build s"] = time.perf_counter() - t0
        def refresh(opt=opt, group=group, state=state) -> None:
            opt.projector.refresh(grad, state, group, opt.rule)

        seconds, runs = time_refresh(refresh, repeats, slow_s, dev)
        # one real step on the refreshed subspace (gap None: no second refresh) for the bytes
        param.grad = grad
        opt.step()
        row[method] = {"s": seconds, "runs": runs, "bytes": state_bytes(opt)}
    return row


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['s'] / b['s']:,.1f}x" if a and b else "n/a"


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | rank | SVD ms | DCT matmul ms | DCT FFT ms | SVD / matmul | SVD / FFT "
        "| matmul / FFT | runs (svd, mm, fft) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        svd, mm, fft = (r[m] for m in METHODS)
        runs = ", ".join(str(r[m]["runs"]) if r[m] else "-" for m in METHODS)
        lines.append(
            f"| {r['shape'][0]} x {r['shape'][1]} | {r['rank']} "
            f"| {fmt_ms(svd['s']) if svd else 'skipped'} | {fmt_ms(mm['s'])} | {fmt_ms(fft['s'])} "
            f"| {ratio(svd, mm)} | {ratio(svd, fft)} | {ratio(mm, fft)} | {runs} |"
        )
    lines += [
        "",
        "State bytes per layer (fp32, Adam moments included; from `memory.state_bytes` after "
        "one step). GaLore's projector is `r x min(m, n)` floats; DCT keeps `r` int32 indices "
        "plus the int64 shape, and one basis per size shared by all layers of that size.",
        "",
        "| shape | rank | GaLore projector B | DCT indices B | projector / indices "
        "| GaLore total B | DCT total B (w/o basis) | GaLore / DCT | shared DCT basis MiB "
        "| basis build ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dct = r["dct fft"]["bytes"]
        dct_total = dct.total - dct.projectors
        rank, (m, n) = r["rank"], r["shape"]
        if r["svd"]:
            g = r["svd"]["bytes"]
            galore_proj, galore_total = g.projectors, g.total
        else:  # analytic when the SVD was skipped: r * min(m, n) fp32, moments as DCT's
            galore_proj = rank * min(m, n) * 4
            galore_total = galore_proj + dct.moments + dct.other
        lines.append(
            f"| {m} x {n} | {rank} | {galore_proj:,} | {dct.indices:,} "
            f"| {galore_proj / dct.indices:,.0f}x | {galore_total:,} | {dct_total:,} "
            f"| {galore_total / dct_total:.3f}x | {dct.projectors / 2**20:.1f} "
            f"| {fmt_ms(r['basis build s'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help="comma-separated ROWSxCOLS (default: LLaMA shapes 512..4096x11008)")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank for every shape (default: GaLore paper rank by min dim)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("--svd-max", type=int, default=4096,
                        help="skip the SVD for shapes whose min dim exceeds this (a 4096-row SVD "
                             "takes 15-60 s on 2 idle cores, minutes on a loaded machine)")
    parser.add_argument("--slow-s", type=float, default=10.0,
                        help="a first run slower than this is reported alone (no repeats)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true",
                        help="shapes up to 2048 x 2048 only (under a minute on 2 cores)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="gradient dtype (the SVD runs in fp32 either way)")
    parser.add_argument("--json", default=None, help="write the timings here as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    torch.set_num_threads(args.threads)
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    if args.quick:
        shapes = [s for s in shapes if max(s) <= 2048]
        args.svd_max = min(args.svd_max, 2048)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for shape in shapes:
        rank = args.rank or PAPER_RANKS.get(min(shape), max(1, min(shape) // 4))
        row = measure(shape, rank, args.svd_max, args.repeats, args.slow_s,
                      device=args.device, dtype=DTYPES[args.dtype])
        rows.append(row)
        done = {m: (f"{row[m]['s'] * 1e3:,.1f} ms" if row[m] else "skipped") for m in METHODS}
        print(f"{shape[0]} x {shape[1]} r={rank}: {done}", flush=True)
        if args.json:
            write_json(args.json, rows, args, complete=False)
    if args.json:
        write_json(args.json, rows, args, complete=True)

    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    skipped = [f"{r['shape'][0]} x {r['shape'][1]}" for r in rows if r["svd"] is None]
    where = ("" if device.type == "cpu" else
             f" on {torch.cuda.get_device_name(device)} (each run synchronised)")
    notes = [
        f"Refresh time of one layer{where}, {args.dtype}, median of {args.repeats} runs after "
        "a warm-up "
        f"(a first run over {args.slow_s:g} s is reported alone: see the runs column); "
        f"torch threads {args.threads}; 1-minute load average {load:.2f} at the start, "
        f"{load_end:.2f} at the end (this run's own threads count; a higher load means other "
        "processes shared the cores and inflated the absolute times).",
        "DCT timings include the low-rank gradient (read from the coefficients); the SVD "
        "timing does not. Route `auto` picks FFT from n >= "
        f"{lo.projectors.dct.AUTO_FFT_MIN_SIZE}.",
    ]
    if skipped:
        notes.append(f"SVD skipped (min dim > --svd-max={args.svd_max}) for: "
                     f"{', '.join(skipped)}; its bytes are computed analytically.")
    body = "\n\n".join(notes) + "\n\n" + table(rows)
    print("\n" + body)
    if not args.no_write:
        if device.type == "cpu":
            path = write_result("refresh_cost_cpu", "Subspace refresh cost on CPU: SVD vs DCT",
                                body)
        else:
            path = write_result("refresh_cost_cuda", "Subspace refresh cost on GPU: SVD vs DCT",
                                body)
        print(f"\nwrote {path}")


def write_json(path: str, rows: list[dict], args: argparse.Namespace, complete: bool) -> None:
    """The timings (seconds, runs, state bytes) of every row, and the settings."""
    def method(cell: dict | None) -> dict | None:
        if cell is None:
            return None
        b = cell["bytes"]
        return {"s": cell["s"], "runs": cell["runs"], "state_bytes": b.total,
                "projector_bytes": b.projectors, "index_bytes": b.indices}

    out = {"device": args.device, "machine": machine(), "dtype": args.dtype,
           "repeats": args.repeats, "complete": complete,
           "rows": [{"shape": list(r["shape"]), "rank": r["rank"],
                     "basis_build_s": r.get("basis build s"),
                     **{m: method(r[m]) for m in METHODS}} for r in rows]}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
