"""Ahead-of-time compilation of every Triton kernel for real GPU targets, on any machine.

Triton compiles for a named target without a GPU or a driver
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``), so the kernels' GPU
programs are checked where development happens (CPU machines, CI), not only under the CPU
interpreter, which accepts programs a GPU compiler rejects.  What is compiled is what the
launchers launch: :func:`launches` calls every Triton operation of the package the way
:mod:`lowrank_optim.kernels.dispatch` can (each dtype, side, update on/off, gathered indices,
TF32 on/off, 8-bit block sizes) with small CPU tensors inside
:func:`~lowrank_optim.kernels.triton_common.recording`, which captures each launch's kernel,
arguments and constexprs instead of running it; signatures are derived from those
arguments.  Every autotune config is compiled for every target (:data:`TARGETS`), and the
result's shared memory (``metadata.shared``) and registers / spills (``cuobjdump
--dump-resource-usage`` from Triton's wheel) are checked against the target's budgets:
a config over the shared-memory limit must be pruned for that target by the kernel's
autotune pruning (:func:`~lowrank_optim.kernels.triton_common.prune_shared`).

Run ``python -m lowrank_optim.kernels.aot [--out FILE]`` to compile everything and write the
table (``benchmarks/results/kernels_aot.md``); ``tests/test_kernels_aot.py`` runs the same
check in CI.  Needs ``triton`` (no GPU, no driver); the Triton interpreter must be off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: GPU targets users have: compute capability and per-block shared-memory limit (bytes,
#: the opt-in maximum a kernel may use: ``cudaDevAttrMaxSharedMemoryPerBlockOptin``)
TARGETS: dict[str, tuple[int, int]] = {
    "sm_80": (80, 163 * 1024),   # A100
    "sm_86": (86, 99 * 1024),    # RTX 30xx, A10, A40
    "sm_89": (89, 99 * 1024),    # RTX 40xx, L4, L40
    "sm_90": (90, 227 * 1024),   # H100, H200
    "sm_120": (120, 99 * 1024),  # RTX 50xx
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: 8-bit block sizes compiled (each a different tile shape): powers of two from 16 to 4096
#: (bitsandbytes' range); a size in between runs the program of the next power of two.  The
#: settings accept any ``block_size >= 1``: sizes below 16 or above 4096 are valid but their
#: programs are not compiled here
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One program to compile: a kernel, its signature and constexprs, launch options."""

    kernel: str
    fn: Any = dataclasses.field(compare=False, hash=False, repr=False)
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int
    #: shared-memory estimate of the autotune pruning, or None if the kernel is not pruned
    prune: Any = dataclasses.field(compare=False, hash=False, repr=False, default=None)


@dataclasses.dataclass
class Result:
    """What compiling a :class:`Variant` for one target gave."""

    variant: Variant
    target: str
    shared: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    pruned: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        limit = TARGETS[self.target][1]
        return self.pruned or (self.error is None and self.shared is not None
                               and self.shared <= limit)


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument {type(value).__name__}")


def variants_of(launch: Any) -> list[Variant]:
    """The programs one recorded launch compiles to: one per autotune config."""
    from triton.runtime.autotuner import Autotuner

    kernel = launch.kernel
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
    prune = getattr(kernel, "early_config_prune", None)
    runtime = [p.name for p in fn.params if not p.is_constexpr]
    if len(runtime) != len(launch.args):
        raise ValueError(f"{fn.__name__}: {len(launch.args)} arguments for {len(runtime)} "
                         "parameters")
    args = dict(zip(runtime, launch.args, strict=True))
    signature = {name: _arg_type(value) for name, value in args.items()}
    out = []
    for config in configs:
        constexprs = {**launch.constexprs, **(config.kwargs if config else {})}
        signature_all = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        order = [p.name for p in fn.params]
        out.append(Variant(
            kernel=fn.__name__,
            fn=fn,
            signature=tuple((n, signature_all[n]) for n in order),
            constexprs=tuple(sorted(constexprs.items())),
            num_warps=config.num_warps if config else launch.options.get("num_warps", 4),
            num_stages=config.num_stages if config else launch.options.get("num_stages", 3),
            prune=None if prune is None else _estimate(prune, config, args),
        ))
    return out


def _estimate(prune: Callable, config: Any, args: dict) -> int | None:
    """The shared-memory estimate the kernel's pruning makes for ``config`` (its attribute
    ``estimate``), with the recorded arguments."""
    estimate = getattr(prune, "estimate", None)
    return None if estimate is None else int(estimate(config, args))


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _calls() -> Iterator[tuple[str, Callable[[], object]]]:
    """Every way the dispatch can call a Triton operation, on small CPU tensors."""
    from lowrank_optim.kernels import (
        triton_dct,
        triton_elementwise,
        triton_gemm,
        triton_quant,
    )

    def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype)

    m, n, r = 24, 16, 4
    idx = torch.arange(r, dtype=torch.int32)
    for dtype in DTYPES:
        for side in ("right", "left"):
            big = n if side == "right" else m
            basis = t(r, n, dtype=dtype) if side == "right" else t(m, r, dtype=dtype)
            low = t(m, r, dtype=dtype) if side == "right" else t(r, n, dtype=dtype)
            q = t(big, big, dtype=dtype)
            grad = t(m, n, dtype=dtype)
            yield "project", lambda g=grad, b=basis, s=side: triton_gemm.project(g, b, s)
            yield "project_back", lambda lo=low, b=basis, s=side: triton_gemm.project_back(
                lo, b, s)
            yield "project_back_update", lambda g=grad, lo=low, b=basis, s=side: (
                triton_gemm.project_back_update(g.clone(), lo, b, s, -0.1, 0.01, 0.0))
            yield "project_indexed", lambda g=grad, q=q, s=side: triton_gemm.project_indexed(
                g, q, idx, s)
            yield "project_back_indexed", lambda lo=low, q=q, s=side: (
                triton_gemm.project_back_indexed(lo, q, idx, s))
            yield "project_back_indexed_update", lambda g=grad, lo=low, q=q, s=side: (
                triton_gemm.project_back_indexed_update(g.clone(), lo, q, idx, s, -0.1, 0.0,
                                                        0.01))
            for norm in ("l2", "l1"):
                yield "dct_scores_matmul", lambda g=grad, q=q, s=side, nm=norm: (
                    triton_dct.dct_scores_matmul(g, q, s, nm))
            coeffs = t(m, n, dtype=dtype)
            yield "gather_lowrank", lambda c=coeffs, s=side: triton_dct.gather_lowrank(c, idx, s)
            yield "indexed_basis", lambda q=q, s=side: triton_dct.indexed_basis(q, idx, s)
        for formula in ("galore", "torch"):
            g = t(m, n, dtype=dtype)
            yield "adam_update", lambda g=g, f=formula: triton_elementwise.adam_update(
                g, g.clone(), g.clone(), 0.9, 0.999, 1e-8, f, 0.5)
        p = t(m, n, dtype=dtype)
        yield "update_param", lambda p=p: triton_elementwise.update_param(p, p.clone(), -0.1,
                                                                           0.01, 0.0)
        for block in BLOCK_SIZES:
            x = t(64, 80, dtype=dtype)
            yield "quantize_blockwise", lambda x=x, b=block: triton_quant.quantize_blockwise(
                x, b)
            for formula in ("galore", "torch"):
                def adam8(x=x, b=block, f=formula) -> object:
                    from lowrank_optim.kernels.blockwise import zeros
                    m8 = zeros(x.shape, x.device, b, "dynamic", True)
                    v8 = zeros(x.shape, x.device, b, "dynamic", False)
                    return triton_quant.adam_update_8bit(x, *m8, *v8, 0.9, 0.999, 1e-8, f, 0.5,
                                                         b)
                yield "adam_update_8bit", adam8
    for block in BLOCK_SIZES:
        def dequant(b=block) -> object:
            from lowrank_optim.kernels.blockwise import zeros
            codes, absmax = zeros((64, 80), torch.device("cpu"), b, "dynamic", True)
            return triton_quant.dequantize_blockwise(codes, absmax, b)
        yield "dequantize_blockwise", dequant


def launches() -> list[Variant]:
    """Every distinct program the Triton operations launch (one per autotune config), found
    by calling them under :func:`recording`, with TF32 off and on."""
    from lowrank_optim.kernels import triton_common

    if triton_common.INTERPRET:
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (under the "
                           "interpreter the kernels carry its single small config)")
    seen: dict[Variant, None] = {}
    for tf32 in (False, True):
        with _tf32(tf32), triton_common.recording() as recorded:
            for _, call in _calls():
                call()
        for launch in recorded:
            for variant in variants_of(launch):
                seen.setdefault(variant, None)
    return list(seen)


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """``(registers per thread, spill bytes (stack + local))`` of a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spills = [int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", out)]
    return (int(regs.group(1)) if regs else None), (sum(spills) if spills else None)


def compile_variant(variant: Variant, target: str) -> Result:
    """Compile ``variant`` for ``target`` (or record that the pruning drops it there)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability, limit = TARGETS[target]
    result = Result(variant, target)
    if variant.prune is not None and variant.prune > limit:
        result.pruned = True
        return result
    source = ASTSource(fn=variant.fn, signature=dict(variant.signature),
                       constexprs=dict(variant.constexprs))
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": variant.num_warps,
                                           "num_stages": variant.num_stages})
    except Exception as e:  # noqa: BLE001 - reported per variant, with the compiler's message
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        return result
    result.shared = int(compiled.metadata.shared)
    result.registers, result.spill_bytes = resource_usage(compiled.asm["cubin"])
    return result


@functools.cache
def supported_targets() -> tuple[str, ...]:
    """The :data:`TARGETS` the installed Triton's NVIDIA backend can compile for (probed once
    per process)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    out = []
    for name, (capability, _) in TARGETS.items():
        target = GPUTarget("cuda", capability, 32)
        with contextlib.suppress(Exception):
            if CUDABackend.supports_target(target):
                CUDABackend(target)
                out.append(name)
    return tuple(out)


def wanted_targets() -> list[str]:
    """:func:`supported_targets`, restricted to ``$LOWRANK_AOT_TARGETS`` (comma-separated)
    when it is set."""
    wanted = [t for t in os.environ.get("LOWRANK_AOT_TARGETS", "").split(",") if t]
    return [t for t in supported_targets() if not wanted or t in wanted]


_TILE_ORDER = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C", "ROWS", "BLOCK")


def _label(v: Variant) -> str:
    """``kernel [dtypes] flags tile MxNxK wW sS`` of a program, for messages and the table."""
    values = dict(v.constexprs)
    tile = "x".join(str(values[k]) for k in _TILE_ORDER if k in values)
    flags = ",".join(f"{k}={val}" for k, val in v.constexprs
                     if k not in _TILE_ORDER and k != "GROUP_M")
    dtypes = sorted({t[1:] for _, t in v.signature if t[1:] in ("fp32", "bf16", "fp16")})
    return (f"{v.kernel} [{'/'.join(dtypes)}] {flags} tile {tile} "
            f"w{v.num_warps} s{v.num_stages}")


def _worst(rows: list[Result]) -> str:
    built = [r for r in rows if r.shared is not None]
    spilled = [r for r in built if r.spill_bytes]
    spills = (f"{len(spilled)} ({max(r.spill_bytes for r in spilled)} B)" if spilled else "0")
    return (f"{max((r.shared for r in built), default=0) // 1024} KB / "
            f"{max((r.registers or 0 for r in built), default=0)} / {spills}")


def table(results: list[Result], versions: str) -> str:
    """Markdown tables of the compiled programs: per target, per kernel, and the problems."""
    targets = sorted({r.target for r in results}, key=lambda t: TARGETS[t][0])
    lines = [
        "# Ahead-of-time compilation of the Triton kernels",
        "",
        f"{versions}; no GPU. Written by `python -m lowrank_optim.kernels.aot`; checked in CI "
        "by `tests/test_kernels_aot.py` (`scripts/aot_check.sh`). Every program the launchers "
        "launch (each dtype, side, update on/off, gathered indices, TF32 on/off, 8-bit block "
        "size) for every autotune config, compiled for each target; shared memory from the "
        "compiled metadata, registers and spills (stack + local bytes per thread) from "
        "`cuobjdump --dump-resource-usage`. A config whose shared-memory estimate exceeds a "
        "target's limit is pruned there by the kernel's autotune pruning (`prune_shared`) and "
        "not compiled for it.",
        "",
        "| target | shared limit | programs | compiled | pruned (over the limit) | errors | "
        "max shared | max registers | spilling programs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target in targets:
        rows = [r for r in results if r.target == target]
        built = [r for r in rows if r.shared is not None]
        lines.append(
            f"| {target} | {TARGETS[target][1] // 1024} KB | {len(rows)} | {len(built)} | "
            f"{sum(r.pruned for r in rows)} | {sum(r.error is not None for r in rows)} | "
            f"{max((r.shared for r in built), default=0) // 1024} KB | "
            f"{max((r.registers or 0 for r in built), default=0)} | "
            f"{sum(bool(r.spill_bytes) for r in built)} |")
    lines += ["", "## Per kernel: max shared / max registers / spilling programs (max spill)",
              "", "| kernel | programs | " + " | ".join(targets) + " |",
              "|---|---|" + "---|" * len(targets)]
    for kernel in sorted({r.variant.kernel for r in results}):
        count = len({r.variant for r in results if r.variant.kernel == kernel})
        cells = [_worst([r for r in results if r.target == t and r.variant.kernel == kernel])
                 for t in targets]
        lines.append(f"| `{kernel}` | {count} | " + " | ".join(cells) + " |")
    failed = [r for r in results if not r.ok]
    lines += ["", "## Problems", ""]
    lines += [f"- {r.target}: {_label(r.variant)}: "
              + (r.error or f"shared {r.shared} B over the limit, not pruned")
              for r in failed] or ["None: every program compiles within its shared-memory budget."]
    spilled = sorted((r for r in results if r.spill_bytes), key=lambda r: -r.spill_bytes)
    if spilled:
        lines += ["", f"## Largest spills ({len(spilled)} programs spill; the 12 worst)", ""]
        lines += [f"- {r.target}: {_label(r.variant)}: {r.spill_bytes} B, {r.registers} "
                  "registers" for r in spilled[:12]]
    return "\n".join(lines) + "\n"


def versions() -> str:
    import triton

    return f"triton {triton.__version__}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/kernels_aot.md")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--count", action="store_true",
                        help="only print how many programs and targets would be compiled")
    args = parser.parse_args(argv)
    from concurrent.futures import ProcessPoolExecutor

    variants = launches()
    targets = wanted_targets()
    jobs = [(v, t) for t in targets for v in variants]
    print(f"{versions()}: {len(variants)} programs x {len(targets)} targets "
          f"({', '.join(targets)}) = {len(jobs)} compilations")
    if args.count:
        return 0
    with ProcessPoolExecutor(args.jobs) as pool:
        found = list(pool.map(_compile_job, range(len(jobs)), chunksize=8))
    results = [Result(v, t, **fields) for (v, t), fields in zip(jobs, found, strict=True)]
    text = table(results, versions())
    with open(args.out, "w") as f:
        f.write(text)
    bad = [r for r in results if not r.ok]
    print(text.split("\n## Per kernel")[0])
    return 1 if bad else 0


def _compile_job(index: int) -> dict[str, Any]:
    """Worker side of :func:`main`: the variants are rebuilt in each process (kernels do not
    pickle), the ``index``-th job compiled and its figures returned."""
    variants = _variants_cached()
    targets = wanted_targets()
    result = compile_variant(variants[index % len(variants)], targets[index // len(variants)])
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(Result)
            if f.name not in ("variant", "target")}


_CACHE: list[Variant] = []


def _variants_cached() -> list[Variant]:
    if not _CACHE:
        _CACHE.extend(launches())
    return _CACHE


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
