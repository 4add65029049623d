"""Cost of refreshing one layer's subspace: GaLore's SVD (exact, randomized, warm) against the
DCT selection, and how much gradient energy the cheap refreshes keep on real gradients.

For each LLaMA weight shape a fixed random gradient is given to

* ``svd``: :class:`~lowrank_optim.projectors.SVDProjector`'s refresh with ``svd_method="exact"``
  (one ``torch.linalg.svd`` of the gradient in fp32, the basis kept);
* ``svd randomized``: ``svd_method="randomized"`` (defaults: 10 extra samples, 2 power
  iterations);
* ``svd warm``: ``svd_method="warm"`` (one subspace iteration from the current basis; timed
  from a random orthonormal basis, since its cost does not depend on the values);
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
    python -m benchmarks.refresh_cost --quality-only   # only the real-gradient section

Real gradients (``--quality-steps``, default 150; 0 skips): the tiny recipe
(``recipes/configs/tiny.yaml``: its corpus, tokenizer, model and GaLore settings, rank 16,
a refresh every 50 steps) trains with exact refreshes; at each refresh step, for every projected
weight, the captured energy ``||P(G)||^2 / ||G||^2`` of that step's gradient is computed for the
exact top-r basis, a randomized one and a warm one (one iteration from the basis the optimizer
held, i.e. the previous refresh's), and reported as a share of the exact one.  Then the recipe
runs once per method and seed (``--quality-seeds``) and the validation losses are compared.

Results go to ``benchmarks/results/refresh_cost_<cpu|cuda>.md`` (``--no-write`` prints only;
``--json`` writes the timings too).  On CUDA every timed run is synchronised.  Wall times on a
shared machine move with its load; the 1-minute load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import lowrank_optim as lo
from benchmarks._common import machine, write_result
from lowrank_optim.memory import state_bytes
from lowrank_optim.projectors import fast_svd
from lowrank_optim.projectors import svd as svd_projector

#: (rows, cols) of LLaMA weights and the GaLore paper's rank for that model size
DEFAULT_SHAPES = ["512x512", "1024x1024", "2048x2048", "4096x4096", "4096x11008"]
PAPER_RANKS = {512: 128, 1024: 256, 2048: 512, 4096: 1024}
METHODS = ("svd", "svd randomized", "svd warm", "dct matmul", "dct fft")
SVD_METHODS = {"svd": "exact", "svd randomized": "randomized", "svd warm": "warm"}
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
    if method in SVD_METHODS:
        return lo.GaLoreAdamW([group], lr=1e-3, svd_method=SVD_METHODS[method])
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
        if method == "svd warm":  # a current basis to start from (values do not matter)
            for side in opt.projector.sides(shape, group):
                size = shape[0] if side == "left" else shape[1]
                basis = fast_svd.orthonormalize(torch.randn(size, rank).to(dev))
                state[f"proj_{side}"] = (basis if side == "left" else basis.t()).to(dtype)
        if method not in SVD_METHODS:
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
    names = {"svd": "exact SVD", "svd randomized": "randomized", "svd warm": "warm",
             "dct matmul": "DCT matmul", "dct fft": "DCT FFT"}
    lines = [
        "| shape | rank | " + " | ".join(f"{names[m]} ms" for m in METHODS)
        + " | exact / randomized | exact / warm | exact / DCT FFT | matmul / FFT "
        "| runs (" + ", ".join(names[m] for m in METHODS) + ") |",
        "|---|---|" + "---|" * (len(METHODS) + 5),
    ]
    for r in rows:
        cells = [fmt_ms(r[m]["s"]) if r[m] else "skipped" for m in METHODS]
        runs = ", ".join(str(r[m]["runs"]) if r[m] else "-" for m in METHODS)
        lines.append(
            f"| {r['shape'][0]} x {r['shape'][1]} | {r['rank']} | " + " | ".join(cells)
            + f" | {ratio(r['svd'], r['svd randomized'])} | {ratio(r['svd'], r['svd warm'])} "
            f"| {ratio(r['svd'], r['dct fft'])} | {ratio(r['dct matmul'], r['dct fft'])} "
            f"| {runs} |"
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
    parser.add_argument("--quality-steps", type=int, default=150,
                        help="steps of the tiny recipe for the real-gradient energies (0: skip)")
    parser.add_argument("--quality-seeds", type=int, nargs="*", default=[0, 1],
                        help="seeds of the tiny-recipe runs per SVD method (none: skip)")
    parser.add_argument("--quality-only", action="store_true",
                        help="only the real-gradient section (no timing table)")
    parser.add_argument("--cache-dir", default=None,
                        help="the recipe's corpus and tokenizer cache (default: the recipe's)")
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
    for shape in [] if args.quality_only else shapes:
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
    body = "\n\n".join(notes) + "\n\n" + table(rows) if rows else ""
    if device.type == "cpu" and not args.quick and (args.quality_steps or args.quality_seeds):
        cache = {"cache_dir": args.cache_dir} if args.cache_dir else {}
        energy = (real_gradient_energy(args.quality_steps, **cache) if args.quality_steps
                  else [])
        with tempfile.TemporaryDirectory() as out_dir:
            losses = (recipe_val_losses(args.quality_seeds, out_dir, **cache)
                      if args.quality_seeds else {})
        body = (body + "\n\n" if body else "") + quality_section(energy, losses)
    print("\n" + body)
    if not args.no_write:
        name = "refresh_cost_cpu" if device.type == "cpu" else "refresh_cost_cuda"
        if args.quality_only:
            name += "_quality"
        where = "CPU" if device.type == "cpu" else "GPU"
        path = write_result(name, f"Subspace refresh cost on {where}: SVD (exact, randomized, "
                            "warm) vs DCT", body)
        print(f"\nwrote {path}")


TINY_CONFIG = "recipes/configs/tiny.yaml"


def _tiny_settings(optimizer_kwargs: dict | None = None, **settings) -> list[str]:
    flags = ["--config", TINY_CONFIG, "--optimizer", "galore_adamw"]
    if optimizer_kwargs:
        flags += ["--optimizer-kwargs", json.dumps(optimizer_kwargs)]
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


@torch.no_grad()
def _energies(opt: lo.LowRankOptimizer, step: int) -> list[dict[str, float]]:
    """Captured energy of each projected weight's current gradient: exact, randomized and warm
    (from the basis the optimizer holds), computed beside the optimizer (its state is left
    alone)."""
    out = []
    for name, p, group in opt.projected_params():
        state = opt.state.get(p, {})
        if p.grad is None or not opt.projector.has_subspace(state):
            continue
        g, rank = p.grad.float(), group["rank"]
        sides = opt.projector.sides(g.shape, group)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        exact = {"left": u[:, :rank], "right": vh[:rank]}
        gen = torch.Generator().manual_seed(svd_projector.refresh_seed(group, step))
        stale = {s: state[f"proj_{s}"].float() for s in sides}
        oversample = svd_projector.SVD_DEFAULTS["svd_oversample"]
        iters = svd_projector.DEFAULT_POWER_ITERS
        bases = {
            "exact": {s: exact[s] for s in sides},
            "randomized": fast_svd.randomized_bases(g, rank, sides, oversample,
                                                    iters["randomized"], gen),
            "warm": fast_svd.warm_bases(g, stale, iters["warm"]),
            "warm (1 iteration)": fast_svd.warm_bases(g, stale, 1),
            "stale": stale,
        }
        energy = {k: float(opt.projector.captured_energy(g, {f"proj_{s}": b for s, b in v.items()},
                                                         group)) for k, v in bases.items()}
        out.append({"name": name, "step": step, **energy})
    return out


def real_gradient_energy(steps: int, **cache: str) -> list[dict[str, float]]:
    """Train the tiny recipe's GaLore run (exact refreshes) for ``steps`` steps and measure
    :func:`_energies` at each of its refresh steps (the gradient a refresh would see)."""
    from recipes import config, pretrain

    cfg = config.parse_args(_tiny_settings(max_steps=steps, **cache))
    data = pretrain.load_data(cfg)
    torch.manual_seed(cfg.seed)
    model, opt = pretrain.build_optimizer(cfg, pretrain.build_model(cfg, data.vocab_size))
    scheduler = pretrain.build_scheduler(cfg, opt)
    gap = opt.param_groups[0]["update_proj_gap"]
    rows = []
    for step in range(steps):
        ids = data.train.samples(step * cfg.batch_size, cfg.batch_size)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        if step % gap == 0:
            rows += _energies(opt, step)
        opt.step()
        scheduler.step()
    return rows


def recipe_val_losses(seeds: list[int], out_dir: str, **cache: str) -> dict[str, list[float]]:
    """Validation loss of the tiny recipe (its full length) per SVD method and seed."""
    from recipes import pretrain

    losses: dict[str, list[float]] = {}
    for method in ("exact", "randomized", "warm"):
        for seed in seeds:
            summary = pretrain.main(_tiny_settings(
                {"svd_method": method}, seed=seed, **cache,
                output_dir=os.path.join(out_dir, f"{method}-{seed}")))
            losses.setdefault(method, []).append(summary["val_loss"])
            print(f"tiny recipe, {method}, seed {seed}: val loss {summary['val_loss']:.4f}",
                  flush=True)
    return losses


def quality_section(energy: list[dict[str, float]], losses: dict[str, list[float]]) -> str:
    lines = ["## Real gradients: the tiny recipe", ""]
    if energy:
        def share(key: str) -> list[float]:
            return [r[key] / r["exact"] for r in energy]

        steps = sorted({r["step"] for r in energy})
        lines += [
            f"Captured energy of the gradient at each refresh step ({len(steps)} refreshes, "
            f"steps {steps}, {len(energy) // max(len(steps), 1)} projected weights each, rank "
            "16; GaLore with exact refreshes trains, the cheap bases are computed beside it) as "
            "a share of the exact top-r basis's; default settings (randomized: "
            f"{svd_projector.DEFAULT_POWER_ITERS['randomized']} power iteration(s), "
            f"{svd_projector.SVD_DEFAULTS['svd_oversample']} extra samples; warm: "
            f"{svd_projector.DEFAULT_POWER_ITERS['warm']} iterations). `stale` is the basis "
            "the optimizer held (the previous refresh's), what `warm` iterates from.", "",
            "| method | min share of exact | median share | mean captured energy |",
            "|---|---|---|---|",
        ]
        lines.append(f"| exact | 1.000 | 1.000 | "
                     f"{statistics.mean(r['exact'] for r in energy):.3f} |")
        for key in ("randomized", "warm", "warm (1 iteration)", "stale"):
            lines.append(f"| {key} | {min(share(key)):.4f} | "
                         f"{statistics.median(share(key)):.4f} | "
                         f"{statistics.mean(r[key] for r in energy):.3f} |")
    if losses:
        lines += ["", "Validation loss of the tiny recipe (`recipes/configs/tiny.yaml`, "
                  "GaLore, full length) per refresh method; one run per seed.", "",
                  "| method | val loss per seed | mean | spread (max - min) |", "|---|---|---|---|"]
        for method, values in losses.items():
            lines.append(f"| {method} | {', '.join(f'{v:.4f}' for v in values)} | "
                         f"{statistics.mean(values):.4f} | {max(values) - min(values):.4f} |")
    return "\n".join(lines)


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
