"""Optimizer step time and state bytes on LLaMA-shaped layers: torch AdamW, galore-torch, ours
(GaLore, GaLore 8-bit, DCT).

For each config, the seven weight matrices of one decoder block (q, k, v, o, gate, up, down)
get fixed random gradients and each optimizer steps them.  Steady steps (subspace kept) and
refresh steps (new SVD) are timed separately, the optimizers taking turns, and combined into
the amortised time of training with ``update_proj_gap`` (one refresh per gap).  Ratios are
against galore-torch from the same run.

    python -m benchmarks.step_time            # 60m and 350m, writes results/step_time_<dev>.md
    python -m benchmarks.step_time --quick    # fewer steps
    python -m benchmarks.step_time --device cuda --dtype bf16 --scope model --configs 350m 1b \
        --optimizers "torch AdamW fused" lowrank_optim "lowrank_optim DCT" "lowrank_optim 8-bit" \
        --backends triton torch --baseline "torch AdamW fused" --refreshes 0 \
        --init-subspace random --json step.json --no-write   # scripts/gpu_check.sh's run

``--scope model`` steps every tensor of the model (embedding, each layer's 7 weights and 2
norms, final norm, head; the targeted weights projected, the rest in a plain group as
``create_optimizer`` builds them) instead of one block.  ``--backends triton torch`` times each
of our optimizers once per kernel backend (``lowrank_optim.kernels.set_backend``, set around
each step).  ``--init-subspace random`` gives the GaLore optimizers their first subspace
without the exact SVDs (a first step on the meta device, its state loaded with random values
through ``load_state_dict``): steady-step timings depend on shapes, not values, and the SVDs of
a whole 1B model take minutes on a GPU (``benchmarks.refresh_cost`` times them per layer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager

import torch

import lowrank_optim as lo
from benchmarks._common import block_params, machine, sync, write_result
from lowrank_optim import kernels
from lowrank_optim.memory import state_bytes
from lowrank_optim.model_configs import LLAMA_SHAPES, LLAMA_VOCAB, build_llama

RANKS = {"tiny": 16, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


#: the optimizers compared; DCT re-selects its subspace every step (its default), so all its
#: steps are refresh steps and the gap does not apply to it
NAMES = ["torch AdamW", "galore-torch", "lowrank_optim", "lowrank_optim DCT", "lowrank_optim 8-bit"]
#: the whole-model table's (``--scope model`` without ``--optimizers``): the issue's baseline
#: (torch AdamW with foreach), torch's fused kernel, galore-torch and each of ours
MODEL_NAMES = ["torch AdamW foreach", "torch AdamW fused", "galore-torch", "lowrank_optim",
               "lowrank_optim randomized", "lowrank_optim warm", "lowrank_optim DCT",
               "lowrank_optim 8-bit", "lowrank_optim SST", "lowrank_optim APOLLO",
               "lowrank_optim APOLLO-Mini", "lowrank_optim Fira"]
EVERY_STEP = {"lowrank_optim DCT"}
NO_SUBSPACE = {"torch AdamW", "torch AdamW fused", "torch AdamW foreach"}
#: optimizers that may also be named (``--optimizers``); not in the default block table
EXTRA = ["torch AdamW fused", "torch AdamW foreach", "lowrank_optim randomized",
         "lowrank_optim warm", "lowrank_optim SST", "lowrank_optim APOLLO",
         "lowrank_optim APOLLO-Mini", "lowrank_optim Fira"]
#: ours: the names ``--backends`` times once per kernel backend (``name [backend]``)
OURS = {"lowrank_optim", "lowrank_optim DCT", "lowrank_optim 8-bit", "lowrank_optim randomized",
        "lowrank_optim warm", "lowrank_optim SST", "lowrank_optim APOLLO",
        "lowrank_optim APOLLO-Mini", "lowrank_optim Fira"}
#: GaLore's refresh method of each of our GaLore names
SVD_METHOD = {"lowrank_optim": "exact", "lowrank_optim randomized": "randomized",
              "lowrank_optim warm": "warm", "lowrank_optim 8-bit": "exact"}


def split_name(name: str) -> tuple[str, str | None]:
    """``"lowrank_optim [triton]"`` -> ``("lowrank_optim", "triton")``; no suffix: ``None``."""
    if name.endswith("]") and " [" in name:
        base, backend = name[:-1].rsplit(" [", 1)
        return base, backend
    return name, None


def make(name: str, params, rank: int, gap: int, plain=None):
    """Optimizer ``name`` over ``params`` (projected) and ``plain`` (unprojected, optional).
    ``"lowrank_optim SST"`` takes an SST-converted model as ``params`` (see :func:`sst_model`)
    and ``gap`` as its ``iteration_length``."""
    name = split_name(name)[0]
    if name == "lowrank_optim SST":
        return lo.SSTAdamW(lo.sst.sst_param_groups(params), lr=1e-3, iteration_length=gap,
                           iteration_warmup=0)
    group = [{"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25,
              "proj_type": "std"}]
    rest = [{"params": plain}] if plain else []
    if name == "lowrank_optim DCT":
        return lo.DCTAdamW([{**group[0], "update_proj_gap": 1}, *rest], lr=1e-3)
    if name == "lowrank_optim 8-bit":
        return lo.GaLoreAdamW8bit(group + rest, lr=1e-3)
    if name == "lowrank_optim APOLLO":  # its matrix is redrawn from the seed every step
        return lo.ApolloAdamW([{**group[0], "scale": 1.0}, *rest], lr=1e-3)
    if name == "lowrank_optim APOLLO-Mini":
        return lo.ApolloMini([{**group[0], "rank": 1, "scale": lo.ApolloMini.default_scale},
                              *rest], lr=1e-3)
    if name == "lowrank_optim Fira":
        return lo.FiraAdamW(group + rest, lr=1e-3)
    if name in NO_SUBSPACE:
        kind = name.removeprefix("torch AdamW").strip()
        kw = {"fused": True} if kind == "fused" else {"foreach": True} if kind == "foreach" else {}
        return torch.optim.AdamW(list(params) + list(plain or []), lr=1e-3, **kw)
    if name == "galore-torch":
        import galore_torch

        return galore_torch.GaLoreAdamW(group + rest, lr=1e-3)
    return lo.GaLoreAdamW(group + rest, lr=1e-3, svd_method=SVD_METHOD[name])


def sst_model(config: str, rank: int, device: str, dtype: torch.dtype = torch.float32,
              layers: int | None = None) -> torch.nn.Module:
    """The LLaMA ``config`` converted to SST at ``rank`` (one SVD per weight), with fixed random
    gradients on every parameter."""
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    model = build_llama(config, **overrides).to(device=device, dtype=dtype)
    lo.sst.convert(model, rank=rank)
    g = torch.Generator(device=device).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device, dtype=dtype)
    return model


def model_params(config: str, device: str, dtype: torch.dtype = torch.float32,
                 layers: int | None = None) -> tuple[list, list]:
    """``(projected, plain)``: every tensor of a LLaMA ``config`` (``layers`` overrides its
    depth) with fixed random gradients, made on ``device``.  Projected: each layer's q, k, v,
    o, gate, up, down and the head (the ``nn.Linear`` weights ``create_optimizer`` targets);
    plain: the embedding and the RMSNorm weights."""
    hidden, inter, _, depth = LLAMA_SHAPES[config]
    vocab = LLAMA_VOCAB.get(config, 32000)
    linear = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    projected = linear * (depth if layers is None else layers) + [(vocab, hidden)]
    plain = [(vocab, hidden)] + [(hidden,)] * (2 * (depth if layers is None else layers) + 1)
    g = torch.Generator(device=device).manual_seed(0)

    def make_param(shape):
        p = torch.nn.Parameter(torch.randn(shape, generator=g, device=device, dtype=dtype)
                               .mul_(0.02))
        p.grad = torch.randn(shape, generator=g, device=device, dtype=dtype)
        return p

    return [make_param(s) for s in projected], [make_param(s) for s in plain]


def random_subspace(opt: torch.optim.Optimizer, name: str, rank: int, gap: int,
                    projected: list, plain: list) -> None:
    """Give ``opt`` (a GaLore optimizer) a first subspace without SVDs: the same optimizer
    steps once on meta copies of the tensors (no memory, no arithmetic), and its state, with
    random projectors, zero moments and step 1, is loaded through ``load_state_dict``.  The
    next step is then a steady one, on tensors of the real shapes and dtypes."""
    def meta(ps):
        out = []
        for p in ps:
            q = torch.nn.Parameter(torch.empty_like(p, device="meta"))
            q.grad = torch.empty_like(q)
            out.append(q)
        return out

    shadow = make(name, meta(projected), rank, gap, meta(plain) or None)
    shadow.step()
    sd = shadow.state_dict()
    device = projected[0].device

    def real(key: str, t):
        if not isinstance(t, torch.Tensor):
            return t
        if key == "step":
            return torch.ones(t.shape, dtype=t.dtype, device=device)
        if key.startswith("proj_") and t.is_floating_point():
            return torch.randn(t.shape, dtype=t.dtype, device=device).mul_(t.shape[-1] ** -0.5)
        return torch.zeros(t.shape, dtype=t.dtype, device=device)

    sd["state"] = {i: {k: real(k, v) for k, v in st.items()} for i, st in sd["state"].items()}
    opt.load_state_dict(sd)


@contextmanager
def backend_of(name: str):
    """The kernel backend ``name`` asks for (``"... [triton]"``) while stepping it."""
    backend = split_name(name)[1]
    if backend is None:
        yield
        return
    previous = kernels.set_backend(backend)
    try:
        yield
    finally:
        kernels.set_backend(previous)


def _timed_step(opt: torch.optim.Optimizer, name: str = "") -> float:
    with backend_of(name):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        return time.perf_counter() - t0


def measure(names: list[str], config: str, device: str, gap: int, steady_steps: int,
            refreshes: int, dtype: torch.dtype = torch.float32, scope: str = "block",
            layers: int | None = None, init_subspace: str = "svd", profile_steps: int = 0,
            ) -> dict[str, tuple]:
    """``{name: (steady s/step, refresh s/step, amortised s/step, state bytes, profile)}``
    (profile: :func:`profile_top` of ``profile_steps`` steady steps, or ``""``).

    The optimizers step in turn (the order rotating every round), so a change in machine load
    hits all of them alike; each figure is a median.  A steady step keeps the subspace; a
    refresh step recomputes it (a second copy of each optimizer with ``update_proj_gap=1``).
    Amortised = steady + (refresh - steady) / ``gap``: one refresh per ``gap`` steps, as in
    training with ``update_proj_gap=gap``.  Refresh and amortised are ``None`` for a subspace
    optimizer when ``refreshes`` is 0 (not measured).
    """
    rank = RANKS[config]
    # the whole model: one set of tensors shared by every optimizer (each keeps its own state;
    # the parameters drift, which does not change the cost), so 350m fits in memory
    shared = model_params(config, device, dtype, layers) if scope == "model" else None
    sst = {}

    def tensors() -> tuple[list, list]:
        if shared is not None:
            return shared
        params = block_params(config, device)
        if dtype != torch.float32:
            for p in params:
                p.data, p.grad = p.data.to(dtype), p.grad.to(dtype)
        return params, []

    def build(name: str, gap_: int):
        if split_name(name)[0] == "lowrank_optim SST":
            if "model" not in sst:
                sst["model"] = sst_model(config, rank, device, dtype,
                                         layers if scope == "model" else 1)
            return make(name, sst["model"], rank, gap_)
        projected, plain = tensors()
        opt = make(name, projected, rank, gap_, plain or None)
        if init_subspace == "random" and split_name(name)[0] in SVD_METHOD:
            random_subspace(opt, name, rank, gap_, projected, plain)
        return opt

    steady_opts = {n: build(n, 10**9) for n in names}
    refresh_opts = {n: build(n, 1) for n in names
                    if n not in NO_SUBSPACE | EVERY_STEP and refreshes > 0}
    for n, opt in [*steady_opts.items(), *refresh_opts.items()]:
        with backend_of(n):
            opt.step()  # allocation, first subspace, Triton autotuning: not timed
    times: dict[str, list[float]] = {n: [] for n in names}
    refresh: dict[str, list[float]] = {n: [] for n in refresh_opts}
    for i in range(max(steady_steps, refreshes)):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            if i < steady_steps:
                times[n].append(_timed_step(steady_opts[n], n))
            if i < refreshes and n in refresh_opts:
                refresh[n].append(_timed_step(refresh_opts[n], n))
    out = {}
    for n in names:
        steady = statistics.median(times[n])
        if n in refresh:
            fresh = statistics.median(refresh[n])
        elif n in NO_SUBSPACE | EVERY_STEP:
            fresh = steady
        else:
            fresh = None
        amortised = None if fresh is None else steady + (fresh - steady) / gap
        top = profile_top(steady_opts[n], n, profile_steps) if profile_steps else ""
        out[n] = (steady, fresh, amortised, state_bytes(steady_opts[n]).total, top)
    return out


def expand_backends(names: list[str], backends: list[str] | None) -> list[str]:
    """Each of our optimizers once per backend (``"lowrank_optim [triton]"``)."""
    if not backends:
        return names
    return [x for n in names for x in ([f"{n} [{b}]" for b in backends] if n in OURS else [n])]


def profile_top(opt: torch.optim.Optimizer, name: str, steps: int, top: int = 5) -> str:
    """The ``top`` operators by self CPU time over ``steps`` steps of ``opt`` (torch.profiler),
    as ``op ms (share)`` per step."""
    from torch.profiler import ProfilerActivity, profile

    with backend_of(name), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step()
    events = [e for e in prof.key_averages() if not e.key.startswith("Optimizer.step")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / 1e3 / steps:.1f}"
                     f" ({e.self_cpu_time_total / total:.0%})" for e in events[:top])


def describe(args: argparse.Namespace, scope: str) -> str:
    """What one table measured."""
    if scope == "block":
        what = f"{args.dtype}, one decoder block's 7 weight matrices"
    else:
        layers = f"{args.layers} layers" if args.layers else "all layers"
        what = (f"{args.dtype}, every tensor of the model ({layers}; embedding and norms "
                "unprojected, the head projected as create_optimizer's all-linear+head would; "
                "one set of tensors shared by all optimizers, each with its own state)")
    init = ("; GaLore's first subspace random (meta-device step, no SVD)"
            if args.init_subspace == "random" else "")
    return (f"{what} with fixed random gradients, std projection, rank per config, on "
            f"{args.device}{init}. The optimizers step in turn (rotating order), medians of "
            f"{args.steady_steps} steady steps (subspace kept) and {args.refreshes} refresh steps "
            f"(new subspace); 'amortised' = steady + (refresh - steady) / {args.gap}, i.e. "
            f"update_proj_gap={args.gap} as in the paper. 'lowrank_optim' is GaLoreAdamW "
            "(exact SVD; 'randomized' / 'warm': its svd_method), '8-bit' GaLoreAdamW8bit, 'DCT' "
            "DCTAdamW with its default new selection every step (every step timed as it runs), "
            "'SST' SSTAdamW (refresh step: a redraw of the sampled vectors with its re-SVD, "
            "every iteration_length steps, amortised over the same gap). torch AdamW: "
            "default (for-loop on CPU), 'foreach' and 'fused' implementations.")


def run_table(args: argparse.Namespace, scope: str, names: list[str], baseline: str,
              results: dict) -> list[str]:
    """Measure ``names`` at every config for ``scope``; the table's lines."""
    lines = [describe(args, scope) + f" Ratios against {baseline}.", "",
             "| config | rank | optimizer | steady ms/step | refresh-step ms | amortised "
             f"ms/step | state MiB | steady / {baseline} | amortised / {baseline} "
             f"| state / {baseline} |", "|---|---|---|---|---|---|---|---|---|---|"]
    profiles: list[str] = []
    dtype = DTYPES[args.dtype]
    table = results.setdefault(scope, {"baseline": baseline, "configs": {}})
    for config in args.configs:
        res = measure(names, config, args.device, args.gap, args.steady_steps, args.refreshes,
                      dtype, scope, args.layers, args.init_subspace,
                      profile_steps=args.profile if config == args.configs[0] else 0)
        ts_ref, _, ta_ref, b_ref = res[baseline][:4]
        rows = {}
        for n in names:
            ts, tr, ta, b = res[n][:4]
            fresh = ("-" if split_name(n)[0] in NO_SUBSPACE | EVERY_STEP or tr is None
                     else f"{tr * 1e3:.1f}")
            amort = "-" if ta is None else f"{ta * 1e3:.2f}"
            amort_ratio = "-" if ta is None or ta_ref is None else f"{ta / ta_ref:.2f}"
            lines.append(f"| {config} | {RANKS[config]} | {n} | {ts * 1e3:.2f} | {fresh} "
                         f"| {amort} | {b / 2**20:.2f} | {ts / ts_ref:.2f} "
                         f"| {amort_ratio} | {b / b_ref:.2f} |")
            rows[n] = {"steady_s": ts, "refresh_s": tr, "amortised_s": ta, "state_bytes": b,
                       "steady_ratio": ts / ts_ref}
            if len(res[n]) > 4 and res[n][4]:
                rows[n]["profile"] = res[n][4]
                profiles.append(f"| {config} | {n} | {res[n][4]} |")
        table["configs"][config] = {"rank": RANKS[config], "optimizers": rows}
        print("\n".join(lines[-len(names):]), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    if profiles:
        lines += ["", f"Top operators by self CPU time (torch.profiler, {args.profile} steady "
                  "steps, ms per step and share of the step's operator time):", "",
                  "| config | optimizer | top operators |", "|---|---|---|", *profiles]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["60m", "350m"])
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap (paper: 200)")
    ap.add_argument("--steady-steps", type=int, default=30, help="timed steps without refresh")
    ap.add_argument("--refreshes", type=int, default=5,
                    help="timed refresh steps (0: none, refresh and amortised not measured)")
    ap.add_argument("--quick", action="store_true", help="10 steady steps, 3 refreshes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="parameter and gradient dtype")
    ap.add_argument("--scope", choices=["block", "model", "both"], default="both",
                    help="one decoder block's 7 weights, every tensor of the model, or both "
                         "tables (default)")
    ap.add_argument("--layers", type=int, default=None,
                    help="the model table's decoder layers (default: the config's)")
    ap.add_argument("--optimizers", nargs="+", default=None, choices=NAMES + EXTRA,
                    help=f"the optimizers timed (default: block {', '.join(NAMES)}; model "
                         f"{', '.join(MODEL_NAMES)})")
    ap.add_argument("--backends", nargs="+", default=None, choices=["triton", "torch", "auto"],
                    help="time each of ours once per kernel backend")
    ap.add_argument("--baseline", default=None,
                    help="the optimizer the ratios divide by (with its [backend] if expanded; "
                         "default: galore-torch for the block, torch AdamW foreach for the "
                         "model)")
    ap.add_argument("--init-subspace", choices=["svd", "random"], default="svd",
                    help="the GaLore optimizers' first subspace: exact SVD (default), or "
                         "random through a meta-device step (no SVD; steady timings only)")
    ap.add_argument("--profile", type=int, default=0,
                    help="also profile this many steady steps of each optimizer (first config)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--no-write", action="store_true", help="do not write results/*.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.steady_steps, args.refreshes = 10, 3
    scopes = ["block", "model"] if args.scope == "both" else [args.scope]
    plans = []
    for scope in scopes:
        names = expand_backends(args.optimizers or (NAMES if scope == "block" else MODEL_NAMES),
                                args.backends)
        if scope == "block":
            names = [n for n in names if split_name(n)[0] != "lowrank_optim SST"]
        baseline = args.baseline or ("galore-torch" if scope == "block"
                                     else "torch AdamW foreach")
        if baseline not in names:
            ap.error(f"--baseline {baseline!r} is not among the timed optimizers {names}")
        plans.append((scope, names, baseline))
    load = os.getloadavg()[0]
    results = {"device": args.device, "machine": machine(), "dtype": args.dtype,
               "layers": args.layers, "init_subspace": args.init_subspace,
               "steady_steps": args.steady_steps, "refreshes": args.refreshes, "gap": args.gap,
               "scopes": {}}
    lines: list[str] = []
    for scope, names, baseline in plans:
        title = "One decoder block" if scope == "block" else "The whole model"
        lines += ["", f"## {title}", "", *run_table(args, scope, names, baseline,
                                                     results["scopes"])]
        # the single-scope layout the GPU check reads
        if len(plans) == 1:
            results.update(scope=scope, baseline=baseline,
                           configs=results["scopes"][scope]["configs"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    lines += ["", f"1-minute load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at "
              f"the end ({os.cpu_count()} CPUs; above that, other processes shared the cores)."]
    body = "\n".join(lines).strip()
    if args.no_write:
        print(f"\n{machine()}\n{body}")
        return
    path = write_result(f"step_time_{args.device}", "Optimizer step time and state bytes", body)
    print(f"\n{machine()}\n{body}\n\nwritten to {path}")


if __name__ == "__main__":
    main()
