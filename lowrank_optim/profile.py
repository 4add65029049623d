"""Will it fit?  Optimizer-state and training-memory profiler for LLaMA-style models.

Analytic mode builds the model and the *real* optimizer on the ``meta`` device and runs one
real optimizer step there: every state tensor is created by the same code that allocates it on
a GPU, so optimizer-state bytes are exact without using memory (7B on a laptop in seconds).
Measured mode builds everything on a real device and runs a few real training steps; on CUDA
it also reports the peak allocated memory.

    python -m lowrank_optim.profile --model 7b --optimizer galore_adamw --rank 1024 \\
        --precision bf16 --seq-len 256 --batch-size 1 --layerwise --opt-arg bits=8
    python -m lowrank_optim.profile --model path/to/config.json --optimizer adamw --json out.json
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowrank_optim.memory import state_bytes
from lowrank_optim.model_configs import LLAMA_SHAPES, llama_config

GIB = 2**30

#: (name, GiB) of common cards; consumer first
GPUS: list[tuple[str, float]] = [
    ("8 GB (RTX 3070 / 4060)", 8),
    ("12 GB (RTX 3060 / 4070)", 12),
    ("16 GB (RTX 4060 Ti 16G / 4080)", 16),
    ("24 GB (RTX 3090 / 4090)", 24),
    ("24 GB (A10 / L4)", 24),
    ("40 GB (A100 40G)", 40),
    ("80 GB (A100 80G / H100)", 80),
    ("141 GB (H200)", 141),
]
#: headroom kept free for the CUDA context, allocator fragmentation and kernels' workspaces
OVERHEAD_BYTES = int(1.0 * GIB)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class MemoryProfile:
    """Bytes of one training configuration, by component."""

    model: str
    optimizer: str
    mode: str
    num_params: int
    weights: int
    gradients: int
    moments: int
    projectors: int
    indices: int
    other_state: int
    activations: int
    settings: dict[str, Any] = field(default_factory=dict)
    cuda_peak: int | None = None

    @property
    def optimizer_state(self) -> int:
        return self.moments + self.projectors + self.indices + self.other_state

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations

    def fits(self) -> list[tuple[str, bool, float]]:
        """``(gpu, fits, headroom GiB)`` with :data:`OVERHEAD_BYTES` kept free."""
        need = (self.cuda_peak or self.total) + OVERHEAD_BYTES
        return [(name, need <= gib * GIB, (gib * GIB - need) / GIB) for name, gib in GPUS]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "optimizer_state": self.optimizer_state, "total": self.total,
                "fits": {n: ok for n, ok, _ in self.fits()}}

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer: moments", self.moments), ("optimizer: projectors", self.projectors),
                ("optimizer: indices", self.indices), ("optimizer: other", self.other_state),
                ("optimizer state (sum)", self.optimizer_state),
                ("activations (estimate)", self.activations), ("total", self.total)]
        if self.cuda_peak is not None:
            rows.append(("CUDA peak allocated (measured)", self.cuda_peak))
        s = self.settings
        lines = [f"{self.model} ({self.num_params / 1e6:,.1f}M params), {self.optimizer}, "
                 f"{self.mode} | precision {s.get('precision')}, seq {s.get('seq_len')}, "
                 f"batch {s.get('batch_size')}, checkpointing {s.get('checkpointing')}, "
                 f"layerwise {s.get('layerwise')}", ""]
        lines += [f"  {name:<32}{b / GIB:>10.3f} GiB" for name, b in rows]
        per = self.optimizer_state / max(self.num_params, 1)
        lines += [f"  {'optimizer bytes / param':<32}{per:>10.3f}", "",
                  f"  fits (with {OVERHEAD_BYTES / GIB:.1f} GiB kept free):"]
        lines += [f"    {'yes' if ok else 'no ':<4}{name:<34}{room:>+8.2f} GiB"
                  for name, ok, room in self.fits()]
        return "\n".join(lines)


#: config attributes :func:`activation_bytes` reads (a LLaMA-style decoder has them all)
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")


def _did_you_mean(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value.lower(), choices, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def model_config(model: str | os.PathLike):
    """A transformers config from a LLaMA size name or a local ``config.json`` path.

    Raises
    ------
    TypeError
        ``model`` is not a string or path.
    ValueError
        Unknown name (closest names suggested), a path that holds no ``config.json``, a file
        transformers cannot read, or a config without the LLaMA-style sizes of
        :data:`CONFIG_FIELDS`.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a size name such as '7b' or a path to a config.json, "
                        f"got {type(model).__name__} {model!r}")
    if model in LLAMA_SHAPES:
        return llama_config(model)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not (path.suffix == ".json" and path.is_file()):
        hint = _did_you_mean(str(model), list(LLAMA_SHAPES))
        raise ValueError(f"unknown model {str(model)!r}{hint}: "
                         f"use one of {sorted(LLAMA_SHAPES)} or a path to a local Hugging Face "
                         "config.json")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent) if path.name == "config.json"
                                            else str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model config {str(path)!r} could not be read: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    missing = [f for f in CONFIG_FIELDS if not isinstance(getattr(config, f, None), int)]
    if missing:
        raise ValueError(f"model config {str(path)!r} ({type(config).__name__}) has no "
                         f"{', '.join(missing)}: the profiler estimates LLaMA-style decoders "
                         "(hidden_size, intermediate_size, num_hidden_layers, vocab_size)")
    return config


def check_optimizer_name(name: str) -> str:
    """``name`` if the registry knows it, else a ``ValueError`` suggesting the closest names
    (``TypeError`` for a non-string)."""
    from lowrank_optim.registry import available

    if not isinstance(name, str):
        raise TypeError(f"optimizer must be a name such as 'galore_adamw', got "
                        f"{type(name).__name__} {name!r}")
    names = available()
    if name.lower().replace("-", "_") not in names:
        raise ValueError(f"Unknown optimizer name={name!r}{_did_you_mean(name, names)}; "
                         f"choose one of {names}")
    return name


def _build(config, device: str, dtype: torch.dtype, checkpointing: bool):
    import transformers
    from transformers import AutoModelForCausalLM

    # ``dtype`` replaced ``torch_dtype`` in transformers 4.56 (the old name now warns)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **{key: dtype})
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _optimizer(model, name: str, rank: int, opt_args: dict[str, Any], analytic: bool,
               layerwise: bool = False):
    from lowrank_optim.optim.base import LowRankOptimizer
    from lowrank_optim.registry import BASELINES, create_optimizer

    kwargs = dict(opt_args)
    if name.lower() not in BASELINES:
        kwargs.setdefault("rank", rank)
        if analytic:
            kwargs.setdefault("nonfinite", "ignore")  # meta tensors have no values to check
    opt = create_optimizer(model, name, **kwargs)
    if (layerwise and isinstance(opt, LowRankOptimizer)
            and not opt.projector_type.layerwise):
        raise ValueError(f"layerwise=True: {name} ({type(opt).__name__}) cannot step one "
                         "parameter at a time during backward (lowrank_optim.LayerwiseOptimizer "
                         "refuses it), so this profile could not be trained; drop layerwise")
    return opt


def _check_opt_args(opt_args: Any) -> dict[str, Any]:
    if opt_args is None:
        return {}
    if not isinstance(opt_args, dict) or not all(isinstance(k, str) and k for k in opt_args):
        raise TypeError(f"opt_args must be a dict of keyword arguments, e.g. {{'bits': 8}}, got "
                        f"{opt_args!r}")
    if "rank" in opt_args:
        raise ValueError("opt_args['rank'] would silently override rank (and the rank shown in "
                         "the profile): pass rank=... (--rank) instead")
    return opt_args


def activation_bytes(config, seq_len: int, batch_size: int, precision: str,
                     checkpointing: bool) -> int:
    """Estimate of activations kept for backward in a LLaMA decoder (SDPA attention).

    Per layer and token, in the compute dtype: the two norm inputs, q/k/v, the attention output
    (h each: 6h), the MLP's gate, up and activated product (3i) plus the SDPA statistics
    (2 heads-worth of fp32, negligible); with checkpointing only each layer's input (h) is kept
    plus one layer's full set during recomputation.  Logits: the compute-dtype logits and the
    fp32 upcast used by the loss and its gradient (2 x 4 bytes per vocab entry).
    """
    h, i = config.hidden_size, config.intermediate_size
    layers, vocab = config.num_hidden_layers, config.vocab_size
    el = torch.finfo(DTYPES[precision]).bits // 8
    tokens = seq_len * batch_size
    per_layer = tokens * (6 * h + 3 * i) * el
    kept = (tokens * h * el * layers + per_layer) if checkpointing else per_layer * layers
    logits = tokens * vocab * (el + 8)
    return kept + logits


def profile(
    model: str = "tiny",
    optimizer: str = "galore_adamw",
    *,
    rank: int = 128,
    opt_args: dict[str, Any] | None = None,
    seq_len: int = 256,
    batch_size: int = 1,
    precision: str = "bf16",
    checkpointing: bool = False,
    layerwise: bool = False,
    mode: str = "analytic",
    device: str | None = None,
    steps: int = 2,
) -> MemoryProfile:
    """Memory profile of training ``model`` with ``optimizer`` (see module docstring).

    ``device`` (default CUDA when available, else CPU) and ``steps`` apply to
    ``mode="measured"`` only: a ``device`` in analytic mode is an error, ``steps`` is ignored
    there (the command line rejects ``--steps`` without ``--mode measured``).

    Raises
    ------
    TypeError
        An argument of the wrong type (a string or bool where an int goes, a non-bool
        ``checkpointing`` / ``layerwise``, ``opt_args`` not a dict).
    ValueError
        A value out of range or unknown (sizes < 1, precision, mode, model, optimizer name,
        device), ``device`` in analytic mode, ``opt_args`` holding ``rank``,
        ``layerwise`` with an optimizer that cannot step per parameter, and every error of
        :func:`lowrank_optim.create_optimizer` (rank larger than the model, bad settings).
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("rank", rank),
                        ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("checkpointing", checkpointing), ("layerwise", layerwise)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} "
                            f"{value!r}")
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    if mode not in ("analytic", "measured"):
        raise ValueError(f"mode must be 'analytic' or 'measured', got {mode!r}")
    analytic = mode == "analytic"
    if analytic and device is not None:
        raise ValueError(f"device={device!r} applies to mode='measured' only (analytic mode "
                         "runs on the meta device): drop it or pass mode='measured'")
    check_optimizer_name(optimizer)
    opt_args = _check_opt_args(opt_args)
    config = model_config(model)
    dev = "meta" if analytic else _measured_device(device)
    dtype = DTYPES[precision]
    net = _build(config, dev, dtype, checkpointing)
    opt = _optimizer(net, optimizer, rank, opt_args, analytic, layerwise)
    params = [p for g in opt.param_groups for p in g["params"]]
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if analytic:
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    else:
        g = torch.Generator(device="cpu").manual_seed(0)
        for _ in range(steps):
            ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g).to(dev)
            opt.zero_grad(set_to_none=True)
            net(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    sb = state_bytes(opt)
    weights = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    grads = [p.numel() * p.element_size() for p in params if p.requires_grad]
    gradients = max(grads, default=0) if layerwise else sum(grads)
    return MemoryProfile(
        model=model, optimizer=optimizer, mode=mode, num_params=sb.num_params,
        weights=weights, gradients=gradients, moments=sb.moments, projectors=sb.projectors,
        indices=sb.indices, other_state=sb.other,
        activations=activation_bytes(config, seq_len, batch_size, precision, checkpointing),
        settings=dict(rank=rank, opt_args=opt_args, seq_len=seq_len,
                      batch_size=batch_size, precision=precision, checkpointing=checkpointing,
                      layerwise=layerwise, device=dev),
        cuda_peak=torch.cuda.max_memory_allocated() if dev.startswith("cuda") else None,
    )


def _measured_device(device: str | None) -> str:
    """The device of a measured run, checked: a bad name is a ``ValueError``, not a traceback."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got "
                         f"{device!r}") from e
    if dev.type == "meta":
        raise ValueError("device='meta' is the analytic mode: pass mode='analytic' instead")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is available: use device='cpu' "
                         "or the analytic mode")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: measured mode runs on 'cpu' or 'cuda'")
    return str(dev)


def plot(profiles: list[MemoryProfile], path: str) -> None:
    """Stacked bar chart (weights / gradients / states / activations) in GiB."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional dependency
        raise SystemExit("--png needs matplotlib: pip install matplotlib") from e
    parts = ["weights", "gradients", "optimizer_state", "activations"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(profiles), 4))
    bottom = [0.0] * len(profiles)
    labels = [f"{p.model}\n{p.optimizer}" for p in profiles]
    for part in parts:
        vals = [getattr(p, part) / GIB for p in profiles]
        ax.bar(labels, vals, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for gib in sorted({g for _, g in GPUS if g <= max(bottom) * 1.3}):
        ax.axhline(gib, color="grey", lw=0.6, ls="--")
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parse_opt_args(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--opt-arg {item!r}: expected key=value, e.g. bits=8")
        if key in out:
            raise ValueError(f"--opt-arg {key} is given twice ({key}={out[key]!r} and "
                             f"{item!r}): keep one")
        if key == "rank":
            raise ValueError("--opt-arg rank=... would override --rank: use --rank")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _check_output(flag: str, path: str) -> None:
    """``ValueError`` unless ``path`` can be written (checked before profiling, which may take
    a while, so a typo does not cost the results)."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ValueError(f"{flag} {path!r} is a directory: give a file name, e.g. "
                         f"{str(target / ('out' + ('.json' if flag == '--json' else '.png')))!r}")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path!r}: directory {str(parent)!r} does not exist (create it "
                         "first)")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {path!r} is not writable: choose another path")
    if flag == "--png":
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ValueError("--png needs matplotlib: pip install matplotlib") from e
        formats = sorted(Figure().canvas.get_supported_filetypes())
        if target.suffix.lstrip(".").lower() not in formats:
            raise ValueError(f"--png {path!r}: the file name must end in an image format "
                             f"matplotlib writes ({', '.join('.' + f for f in formats)})")


def _message(error: Exception) -> str:
    """One line for ``ap.error``: a ``KeyError`` prints its key in quotes, strip them."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowrank_optim.profile",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="7b", help=f"{sorted(LLAMA_SHAPES)} or a config.json")
    ap.add_argument("--optimizer", nargs="+", default=["adamw", "galore_adamw"])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--opt-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra optimizer argument, e.g. bits=8 or update_proj_gap=200")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--layerwise", action="store_true", help="per-layer updates (one grad live)")
    ap.add_argument("--mode", choices=["analytic", "measured"], default="analytic")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps in measured mode (default 2)")
    ap.add_argument("--json", help="write the profiles as JSON here")
    ap.add_argument("--png", help="write a stacked bar chart here")
    args = ap.parse_args(argv)
    if args.mode == "analytic" and args.steps is not None:
        ap.error("--steps applies to --mode measured only (analytic mode takes one step on "
                 "the meta device)")
    profiles = []
    try:
        opt_args = _parse_opt_args(args.opt_arg)
        for name in args.optimizer:  # every name before the first (maybe long) profile
            check_optimizer_name(name)
        for flag, path in (("--json", args.json), ("--png", args.png)):
            if path is not None:
                _check_output(flag, path)
        for name in args.optimizer:
            profiles.append(profile(
                args.model, name, rank=args.rank, opt_args=opt_args, seq_len=args.seq_len,
                batch_size=args.batch_size, precision=args.precision,
                checkpointing=args.checkpointing, layerwise=args.layerwise, mode=args.mode,
                device=args.device, steps=2 if args.steps is None else args.steps))
    except (ValueError, TypeError, KeyError) as e:
        ap.error(_message(e))
    for p in profiles:
        print(p.table(), end="\n\n")
    try:
        if args.json:
            Path(args.json).write_text(json.dumps([p.as_dict() for p in profiles], indent=2))
        if args.png:
            plot(profiles, args.png)
    except OSError as e:
        ap.error(f"could not write the output: {_message(e)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
