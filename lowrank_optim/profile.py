"""Will it fit?  Optimizer-state and training-memory profiler for LLaMA-style models.

Analytic mode builds the model and the *real* optimizer on the ``meta`` device and runs one
real optimizer step there: every state tensor is created by the same code that allocates it on
a GPU, so optimizer-state bytes are exact without using memory (7B on a laptop in seconds).
Measured mode builds everything on a real device and runs a few real training steps; on CUDA
it also reports the peak allocated memory.

    python -m lowrank_optim.profile --model 7b --optimizer galore_adamw --rank 1024 \\
        --precision bf16 --seq-len 256 --batch-size 1 --layerwise --opt-arg bits=8
    python -m lowrank_optim.profile --model path/to/config.json --optimizer adamw --json out.json
    python -m lowrank_optim.profile --model 7b --optimizer galore_adamw --rank 1024 \\
        --world-size 2 --engine fsdp2 --layerwise      # one GPU of 2 (ddp | zero1 | fsdp2)

Model names (``lowrank_optim.model_configs.LLAMA_SHAPES``) are spelled either way: ``7b`` or
``llama_7b`` (as ``recipes/configs/llama_7b.yaml``), ``llama-7b``, ``7B``.  Sizes are printed in
the unit that fits them (B, KiB, MiB, GiB, TiB); the JSON output holds bytes.
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

from lowrank_optim.memory import byte_unit, format_bytes, state_bytes
from lowrank_optim.model_configs import LLAMA_SHAPES, llama_config, model_name, model_names_help

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

    def _engine_note(self) -> str:
        """The header's engine part: ``", ddp x 2 (one GPU's bytes; DDP
        gradient_as_bucket_view=False)"``; empty for one process under DDP."""
        s = self.settings
        if s.get("world_size", 1) == 1 and s.get("engine", "ddp") == "ddp":
            return ""
        note = "one GPU's bytes"
        if "ddp_bucket_view" in s:
            note += f"; DDP gradient_as_bucket_view={s['ddp_bucket_view']}"
        return f", {s.get('engine')} x {s.get('world_size')} ({note})"

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
                 f"layerwise {s.get('layerwise')}"
                 + self._engine_note(), ""]
        lines += [f"  {name:<32}{format_bytes(b):>12}" for name, b in rows]
        per = self.optimizer_state / max(self.num_params, 1)
        lines += [f"  {'optimizer bytes / param':<32}{per:>12.3f}", "",
                  f"  fits (with {format_bytes(OVERHEAD_BYTES)} kept free):"]
        lines += [f"    {'yes' if ok else 'no ':<4}{name:<34}"
                  f"{format_bytes(room * GIB, sign=True):>12}" for name, ok, room in self.fits()]
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
    name = model_name(model)
    if name is not None:
        return llama_config(name)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not (path.suffix == ".json" and path.is_file()):
        hint = _did_you_mean(str(model), [*LLAMA_SHAPES, *(f"llama_{n}" for n in LLAMA_SHAPES)])
        raise ValueError(f"unknown model {str(model)!r}{hint}: use one of "
                         f"{model_names_help()}, or a path to a local Hugging Face config.json")
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
    from lowrank_optim.groups import largest_rank
    from lowrank_optim.optim.base import LowRankOptimizer
    from lowrank_optim.registry import BASELINES, create_optimizer

    kwargs = dict(opt_args)
    if name.lower() not in BASELINES:
        kwargs.setdefault("rank", rank)
        if analytic:
            kwargs.setdefault("nonfinite", "ignore")  # meta tensors have no values to check
    opt = create_optimizer(model, name, **kwargs)
    if name.lower() not in BASELINES and not any(g.get("rank") for g in opt.param_groups):
        # the library trains such a model unprojected (with a warning); a profile of that
        # would answer another question than the one asked
        widest = largest_rank(model, kwargs.get("target_modules", "all-linear"))
        raise ValueError(f"rank={kwargs['rank']} exceeds min(m, n) of every targeted weight "
                         f"(largest {widest}): {name} would project nothing; choose a rank "
                         f"<= {widest}")
    if (layerwise and isinstance(opt, LowRankOptimizer)
            and not opt.projector_type.layerwise):
        raise ValueError(f"layerwise=True: {name} ({type(opt).__name__}) cannot step one "
                         "parameter at a time during backward (lowrank_optim.LayerwiseOptimizer "
                         "refuses it), so this profile could not be trained; drop layerwise")
    return opt


ENGINES = ("ddp", "zero1", "fsdp2")
#: DDP's default ``bucket_cap_mb`` (25 MiB): a bucket's gradients are all-reduced together
DDP_BUCKET_BYTES = 25 * 2**20


def _check_engine(world_size: Any, engine: Any, mode: str, layerwise: bool,
                  ddp_bucket_view: Any) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if not isinstance(ddp_bucket_view, bool):
        raise TypeError(f"ddp_bucket_view must be True or False, got "
                        f"{type(ddp_bucket_view).__name__} {ddp_bucket_view!r}")
    if engine in ("zero1", "fsdp2") and mode != "analytic":
        raise ValueError(f"engine={engine!r} is profiled in analytic mode (one process cannot "
                         "measure another rank's share); drop mode='measured'")
    if engine == "zero1" and layerwise:
        raise ValueError("engine='zero1' with layerwise=True: ZeroRedundancyOptimizer steps "
                         "after backward and then broadcasts each rank's parameters, while "
                         "layer-wise updates step inside backward; drop one of them (layer-wise "
                         "runs under engine='ddp' or 'fsdp2')")
    if ddp_bucket_view and (engine == "fsdp2" or world_size == 1):
        raise ValueError("ddp_bucket_view=True describes DDP's gradient buckets "
                         "(DistributedDataParallel(gradient_as_bucket_view=True)): it applies "
                         "to engine='ddp' or 'zero1' with world_size > 1 only")


def _zero1_rank(opt, name: str, world_size: int):
    """``(the optimizer of the rank with the most state, every rank's state bytes)``: each
    rank's share of ``opt``'s param groups (``ZeroRedundancyOptimizer``'s partition) gets an
    optimizer of ``opt``'s class, stepped on the meta device."""
    from lowrank_optim.distributed import check_zero1, partition_by_size
    from lowrank_optim.optim.base import LowRankOptimizer

    cls = type(opt)
    check_zero1(cls, name)
    extra = {"nonfinite": "ignore"} if isinstance(opt, LowRankOptimizer) else {}
    ranks = []
    for groups in partition_by_size(opt.param_groups, world_size):
        local = cls(groups, **extra)
        local.step()
        ranks.append(local)
    totals = [state_bytes(r).total for r in ranks]
    return ranks[totals.index(max(totals))], totals


def _check_fsdp2(opt, name: str) -> None:
    """``ValueError`` where the library's FSDP2 step refuses a parameter of ``opt``
    (:func:`lowrank_optim.distributed.layout.fsdp2_problem`, the check behind
    ``sharding_problem`` for FSDP2's ``Shard(0)`` layout), with the engines that do run it."""
    from lowrank_optim.distributed import REPLICATED_ENGINES
    from lowrank_optim.distributed.layout import fsdp2_problem
    from lowrank_optim.optim.base import LowRankOptimizer

    if not isinstance(opt, LowRankOptimizer):
        return  # torch optimizers step DTensors shard by shard
    for group in opt.param_groups:
        for param in group["params"]:
            problem = fsdp2_problem(opt, group, opt.projects(group, param))
            if problem:
                raise ValueError(f"engine='fsdp2': {problem}. {name} runs as configured under "
                                 f"{REPLICATED_ENGINES}: profile it with engine='ddp' or "
                                 "'zero1'")


def _row_sharded(opt, group: dict, param: torch.Tensor):
    """Which state entries of ``param`` FSDP2's step keeps split by rows like the parameter
    (a predicate on ``(key, value)``): for a library optimizer the moments of shard-local steps
    (:func:`lowrank_optim.distributed.fsdp2.step_layout`, as ``sharded_step`` decides it), for a
    torch optimizer every entry of the parameter's shape (``zeros_like`` of a DTensor)."""
    from lowrank_optim.distributed.fsdp2 import step_layout
    from lowrank_optim.optim.base import LowRankOptimizer

    if not isinstance(opt, LowRankOptimizer):
        return lambda key, value: value.dim() > 0 and value.shape == param.shape
    projector = opt.projector if opt.projects(group, param) else None
    keys = step_layout(opt.rule, projector, tuple(param.shape), group)[2]
    return lambda key, value: value.dim() > 0 and key in keys


def _local_rows(rows: int, world_size: int, rank: int) -> int:
    """Rows of a dim-0 ``Shard`` that ``rank`` holds (``torch.chunk``: the last ranks get
    fewer, or none)."""
    from lowrank_optim.distributed.tensors import Shard

    return Shard.local_shard_size_and_offset(rows, world_size, rank)[0]


def _fsdp2_rank(opt, world_size: int):
    """``(a view of the rank with the most state, every rank's state bytes)`` under FSDP2:
    ``opt``'s state (stepped on the meta device) with each row-sharded entry cut to the rows
    that rank holds and every other entry (bases, indices, counters, gathered steps' moments)
    kept whole; the view has what :func:`lowrank_optim.memory.state_bytes` reads."""
    from types import SimpleNamespace

    sharded = {id(p): _row_sharded(opt, g, p) for g in opt.param_groups for p in g["params"]}
    views = []
    for rank in range(world_size):
        state = {}
        for param, entries in opt.state.items():
            split = sharded[id(param)]
            state[param] = {
                k: torch.empty((_local_rows(param.shape[0], world_size, rank), *v.shape[1:]),
                               dtype=v.dtype, device="meta")
                if isinstance(v, torch.Tensor) and split(k, v) else v
                for k, v in entries.items()}
        views.append(SimpleNamespace(state=state, param_groups=opt.param_groups,
                                     state_categories=getattr(opt, "state_categories", None),
                                     projector=getattr(opt, "projector", None)))
    totals = [state_bytes(v).total for v in views]
    return views[totals.index(max(totals))], totals


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _padded_shard_bytes(t: torch.Tensor, world_size: int) -> int:
    """Bytes one rank allocates for FSDP2's shard of ``t``: dim 0 padded to a multiple of
    ``world_size`` (every rank holds ``ceil(rows / N)`` rows, the last ones zero padding)."""
    rows = -(-t.shape[0] // world_size) if t.dim() else 1
    return rows * (t.numel() // max(t.shape[0], 1) if t.dim() else 1) * t.element_size()


def _fsdp2_units(net) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """``(decoder layers' parameters, the root unit's)``: the recipe's FSDP2 units, one per
    decoder layer (the model's largest ``nn.ModuleList``) and the root for the rest
    (embeddings, final norm, LM head)."""
    lists = [m for m in net.modules() if isinstance(m, torch.nn.ModuleList)]
    layers = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=[])
    units = [list(layer.parameters()) for layer in layers]
    inside = {id(p) for unit in units for p in unit}
    return units, [p for p in net.parameters() if id(p) not in inside]


def _fsdp2_memory(net, world_size: int, layerwise: bool) -> tuple[int, int, dict[str, int]]:
    """``(weights, gradients, their parts)`` of one FSDP2 rank in the backward of a decoder
    layer (see :func:`profile`)."""
    layers, root = _fsdp2_units(net)
    n = world_size

    def gathered(unit: list[torch.Tensor], grads: bool = False) -> int:
        # the all-gather output (a reduce-scatter input): N padded shards of every tensor
        return sum(n * _padded_shard_bytes(p, n) for p in unit if p.requires_grad or not grads)

    def shards(unit: list[torch.Tensor], grads: bool = False) -> int:
        return sum(_padded_shard_bytes(p, n) for p in unit if p.requires_grad or not grads)

    everything = [*root, *(p for u in layers for p in u)]
    embedding = net.get_input_embeddings().weight
    parts = {
        "weight_shards": shards(everything),
        "weights_gathered": gathered(root) + 2 * max(map(gathered, layers), default=0),
        # layerwise: one unit's reduce-scatter output, its parameters stepping one by one
        "gradient_shards": (max(shards(u, True) for u in [root, *layers]) if layerwise
                            else shards(everything, True)),
        "gradients_gathered": gathered([p for p in root if p is not embedding], True)
        + max((gathered(u, True) for u in layers), default=0),
    }
    buffers = sum(_nbytes(b) for b in net.buffers())  # not sharded by fully_shard
    return (parts["weight_shards"] + parts["weights_gathered"] + buffers,
            parts["gradient_shards"] + parts["gradients_gathered"], parts)


def _ddp_gradients(grads: list[int], world_size: int, layerwise: bool,
                   bucket_view: bool) -> tuple[int, dict[str, int]]:
    """``(gradients, their parts)`` of one DDP (or ZeRO-1, which runs under DDP) rank."""
    total, largest = sum(grads), max(grads, default=0)
    if world_size == 1:  # one process: no DDP
        return (largest if layerwise else total), {}
    in_flight = min(total, max(DDP_BUCKET_BYTES, largest))  # the bucket being filled
    grad_bytes = 0 if bucket_view else (in_flight if layerwise else total)
    return total + grad_bytes, {"ddp_buckets": total, "param_grads": grad_bytes}


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
    plus one layer's full set during recomputation.  Logits: the compute-dtype logits, the
    fp32 upcast the loss makes of half-precision ones (none in fp32, where ``.float()`` returns
    the same tensor) and the fp32 gradient of the loss input: 10 bytes per token and vocabulary
    entry in bf16, 8 in fp32 (both equal to the CPU allocator's peak, tests).
    """
    h, i = config.hidden_size, config.intermediate_size
    layers, vocab = config.num_hidden_layers, config.vocab_size
    el = torch.finfo(DTYPES[precision]).bits // 8
    tokens = seq_len * batch_size
    per_layer = tokens * (6 * h + 3 * i) * el
    kept = (tokens * h * el * layers + per_layer) if checkpointing else per_layer * layers
    upcast = 4 if el < 4 else 0
    logits = tokens * vocab * (el + upcast + 4)
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
    world_size: int = 1,
    engine: str = "ddp",
    ddp_bucket_view: bool = False,
) -> MemoryProfile:
    """Memory profile of training ``model`` with ``optimizer`` (see module docstring).

    ``device`` (default CUDA when available, else CPU) and ``steps`` apply to
    ``mode="measured"`` only: a ``device`` in analytic mode is an error, ``steps`` is ignored
    there (the command line rejects ``--steps`` without ``--mode measured``).

    ``world_size`` and ``engine`` give the bytes one GPU of a data-parallel run holds, at
    the peak of a step (the backward of a decoder layer); N is ``world_size``, G the bytes of
    all gradients, g the largest gradient's:

    * ``"ddp"``: weights and optimizer state replicated (the single-process numbers).  With
      N > 1, DDP's reducer keeps its bucket buffers (one flat copy of all gradients, always
      allocated) besides ``param.grad``: gradients = 2 G under torch's default
      ``gradient_as_bucket_view=False``, G with ``ddp_bucket_view=True`` (``param.grad`` views
      the buckets).  Layer-wise (a communication hook steps each parameter after its bucket is
      all-reduced and frees ``param.grad``): G + min(G, max(25 MiB, g)), the buckets plus the
      ``param.grad`` of the bucket being filled (DDP's ``bucket_cap_mb=25``); G with
      ``ddp_bucket_view=True``.  N = 1 runs without DDP: G, or g layer-wise.
    * ``"zero1"`` (analytic mode): DDP's gradients and weights; the optimizer state split by
      whole parameters as ``ZeroRedundancyOptimizer`` does
      (:func:`lowrank_optim.distributed.partition_by_size`): each rank's optimizer is built for
      its share and stepped on the meta device.  Not layer-wise (it steps after backward and
      broadcasts the parameters).
    * ``"fsdp2"`` (analytic mode), the recipe's units (``fully_shard`` on every decoder layer,
      then on the model: the root unit holds the embeddings, final norm and LM head), no
      ``MixedPrecisionPolicy`` (parameters and gradients in ``precision``).  FSDP2 pads dim 0
      to a multiple of N, so a tensor of ``rows`` rows costs every rank ``ceil(rows / N)`` rows
      (``shard``), and its all-gathered copy N of those.  Weights = the shards of every
      parameter + buffers + the gathered root unit (unsharded from forward until the end of
      backward, whose final callback reshards it) + 2 gathered decoder layers (the one in
      backward and the one its pre-backward hook prefetches; forward's implicit prefetch also
      holds two).  Gradients = the sharded gradients (shards of every parameter) + the
      gathered gradients of the root unit but the input embedding (the LM head's, from the
      start of backward to the root's reduce-scatter at its end; the embedding's comes after
      the layers) + one decoder layer's (until its reduce-scatter).  Layer-wise (each
      parameter steps on its sharded gradient after the reduce-scatter): the sharded
      gradients shrink to one unit's (the reduce-scatter output is one buffer per unit, which
      its parameters' gradients view).  Left out: the reduce-scatter input (a copy of one
      unit's gradients, briefly) and allocator caching.  Optimizer state per rank is what the
      library's sharded step keeps: the optimizer is stepped on the meta device and every
      state entry that :mod:`lowrank_optim.distributed.fsdp2` keeps split by rows (moments of
      shard-local steps) is cut to the rows that rank holds (unpadded); bases, indices,
      counters and the moments of gathered (left / two-sided) steps are counted whole.
      Optimizers FSDP2 cannot step are refused with the library's reason.

    Under ``"zero1"`` and ``"fsdp2"`` the profile shows the rank with the most state and
    ``settings["per_rank_state"]`` lists every rank's (equal to the measured bytes on 2 CPU
    ranks: ``tests/test_zero1.py``, ``tests/test_profile_engines.py``); the parts of weights
    and gradients are in ``settings`` (``weight_shards``, ``weights_gathered``,
    ``gradient_shards``, ``gradients_gathered``; ``ddp_buckets``, ``param_grads``).

    Raises
    ------
    TypeError
        An argument of the wrong type (a string or bool where an int goes, a non-bool
        ``checkpointing`` / ``layerwise`` / ``ddp_bucket_view``, ``opt_args`` not a dict).
    ValueError
        A value out of range or unknown (sizes < 1, precision, mode, model, optimizer name,
        device, engine), ``device`` in analytic mode, ``opt_args`` holding ``rank``,
        ``layerwise`` with an optimizer that cannot step per parameter or with ``"zero1"``,
        ``"zero1"`` / ``"fsdp2"`` in measured mode, ``ddp_bucket_view`` without DDP, an
        optimizer FSDP2 cannot step (the library's reason), and every error of
        :func:`lowrank_optim.create_optimizer` (rank larger than the model, bad settings).
    NotImplementedError
        ``"zero1"`` with an optimizer ZeRO-1 cannot run
        (:func:`lowrank_optim.distributed.check_zero1`).
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
    _check_engine(world_size, engine, mode, layerwise, ddp_bucket_view)
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
    if engine == "fsdp2":
        _check_fsdp2(opt, optimizer)
    params = [p for g in opt.param_groups for p in g["params"]]
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    per_rank = None
    if analytic:
        for p in params:
            p.grad = torch.empty_like(p)
        if engine == "zero1":
            opt, per_rank = _zero1_rank(opt, optimizer, world_size)
        else:
            opt.step()
        if engine == "fsdp2":
            opt, per_rank = _fsdp2_rank(opt, world_size)
    else:
        g = torch.Generator(device="cpu").manual_seed(0)
        for _ in range(steps):
            ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g).to(dev)
            opt.zero_grad(set_to_none=True)
            net(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    sb = state_bytes(opt)
    if engine == "fsdp2":
        weights, gradients, parts = _fsdp2_memory(net, world_size, layerwise)
    else:
        weights = sum(map(_nbytes, [*net.parameters(), *net.buffers()]))
        gradients, parts = _ddp_gradients([_nbytes(p) for p in params if p.requires_grad],
                                          world_size, layerwise, ddp_bucket_view)
        if parts:
            parts["ddp_bucket_view"] = ddp_bucket_view
    return MemoryProfile(
        model=model_name(model) or str(model), optimizer=optimizer, mode=mode,
        num_params=sum(p.numel() for p in params),  # the model's, also under zero1
        weights=weights, gradients=gradients, moments=sb.moments, projectors=sb.projectors,
        indices=sb.indices, other_state=sb.other,
        activations=activation_bytes(config, seq_len, batch_size, precision, checkpointing),
        settings=dict(rank=rank, opt_args=opt_args, seq_len=seq_len,
                      batch_size=batch_size, precision=precision, checkpointing=checkpointing,
                      layerwise=layerwise, device=dev, world_size=world_size, engine=engine,
                      **parts,
                      **({"per_rank_state": per_rank} if per_rank is not None else {})),
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


def gpu_capacities() -> dict[float, str]:
    """``{GiB: label}`` of the cards in :data:`GPUS`, cards of one size on one label
    (``24: "24 GB: RTX 3090 / 4090, A10 / L4"``)."""
    names: dict[float, list[str]] = {}
    for name, gib in GPUS:
        card = name.partition("(")[2].rstrip(")") or name
        names.setdefault(gib, []).append(card)
    return {gib: f"{gib:g} GB: {', '.join(cards)}" for gib, cards in sorted(names.items())}


def _title(profiles: list[MemoryProfile]) -> str:
    """What the chart shows: models, mode and the settings (one value, or the values seen)."""
    from lowrank_optim.registry import BASELINES

    def values(key: str, among: list[MemoryProfile] = profiles) -> str:
        return "/".join(dict.fromkeys(str(p.settings.get(key)) for p in among))

    models = ", ".join(dict.fromkeys(p.model for p in profiles))
    modes = "/".join(dict.fromkeys(p.mode for p in profiles))
    lowrank = [p for p in profiles if p.optimizer.lower() not in BASELINES]  # rank applies
    rank = f", rank {values('rank', lowrank)}" if lowrank else ""
    return (f"Training memory by component: {models} ({modes})\n"
            f"precision {values('precision')}, seq {values('seq_len')}, batch "
            f"{values('batch_size')}{rank}, checkpointing {values('checkpointing')}, "
            f"layerwise {values('layerwise')}")


def figure(profiles: list[MemoryProfile]):
    """The stacked bar chart of :func:`plot` as a ``matplotlib.figure.Figure``.

    One bar per profile (weights, gradients, optimizer state, activations), in the unit that
    fits the tallest bar; a title naming the models, the mode and the settings; a dashed line
    for each GPU capacity of :data:`GPUS` up to 1.3 times the tallest bar, labelled with the
    cards (the fit verdicts of :meth:`MemoryProfile.fits` keep :data:`OVERHEAD_BYTES` free
    below that line).

    Raises
    ------
    ValueError
        ``profiles`` is empty.
    ImportError
        matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    if not profiles:
        raise ValueError("profiles is empty: pass at least one MemoryProfile to plot")
    parts = ["weights", "gradients", "optimizer_state", "activations"]
    tallest = max(p.weights + p.gradients + p.optimizer_state + p.activations
                  for p in profiles)
    unit, scale = byte_unit(tallest)
    fig = Figure(figsize=(4.0 + 1.4 * len(profiles), 4.6))
    ax = fig.subplots()
    bottom = [0.0] * len(profiles)
    labels = [f"{p.model}\n{p.optimizer}" for p in profiles]
    for part in parts:
        vals = [getattr(p, part) / scale for p in profiles]
        ax.bar(labels, vals, bottom=bottom, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    shown = {gib: label for gib, label in gpu_capacities().items()
             if gib * GIB <= tallest * 1.3}
    for gib, label in shown.items():
        ax.axhline(gib * GIB / scale, color="grey", lw=0.8, ls="--")
        ax.text(1.01, gib * GIB / scale, label, transform=ax.get_yaxis_transform(),
                ha="left", va="center", fontsize=7, color="dimgrey")
    note = f"dashed: GPU memory (a fit keeps {format_bytes(OVERHEAD_BYTES)} free)"
    above = [g for g in gpu_capacities() if g not in shown]
    if above:
        note += f"; cards of {min(above):g} GB and more are above this scale"
    ax.text(0.0, 1.01, note, transform=ax.transAxes, fontsize=7, color="dimgrey",
            va="bottom")
    ax.set_title(_title(profiles), fontsize=9, pad=14)
    ax.set_ylabel(unit)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(parts),
              frameon=False)
    return fig


def plot(profiles: list[MemoryProfile], path: str) -> None:
    """Write :func:`figure` (stacked bars by component, GPU capacities labelled) to ``path``."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:  # pragma: no cover - optional dependency
        raise SystemExit("--png needs matplotlib: pip install matplotlib") from e
    figure(profiles).savefig(path, dpi=120, bbox_inches="tight")


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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and ``(default: ...)`` after every option that has one
    (``None`` and ``False`` defaults say nothing, and neither do helps that name theirs)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def argument_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lowrank_optim.profile`` (``--help`` lists the model and
    optimizer names and every default)."""
    from lowrank_optim.registry import available

    ap = argparse.ArgumentParser(prog="python -m lowrank_optim.profile", description=__doc__,
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--model", default="7b",
                    help=f"a LLaMA size: {model_names_help()}; or a path to a Hugging Face "
                    "config.json (or its directory)")
    ap.add_argument("--optimizer", nargs="+", default=["adamw", "galore_adamw"],
                    metavar="NAME", help="one or more of: " + ", ".join(available())
                    + " (default: adamw galore_adamw)")
    ap.add_argument("--rank", type=int, default=128,
                    help="projection rank of the low-rank optimizers (SST: sampled vectors)")
    ap.add_argument("--opt-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra optimizer argument, repeatable, e.g. bits=8 or "
                    "update_proj_gap=200 (default: none)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    ap.add_argument("--precision", choices=sorted(DTYPES), default="bf16",
                    help="dtype of weights, gradients and activations")
    ap.add_argument("--checkpointing", action="store_true",
                    help="activation checkpointing (default: off)")
    ap.add_argument("--layerwise", action="store_true",
                    help="per-parameter updates during backward: one gradient live in one "
                    "process; with --world-size > 1 under ddp the DDP buckets plus one bucket's "
                    "gradients, under fsdp2 one unit's gradient shards (default: off)")
    ap.add_argument("--mode", choices=["analytic", "measured"], default="analytic",
                    help="analytic: the real optimizer stepped on meta tensors (exact state "
                    "bytes, no memory used); measured: real steps on --device")
    ap.add_argument("--device", default=None,
                    help="measured mode's device (default: cuda when available, else cpu)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps in measured mode (default: 2)")
    ap.add_argument("--world-size", type=int, default=1,
                    help="data-parallel processes (GPUs); the profile is one GPU's")
    ap.add_argument("--engine", choices=list(ENGINES), default="ddp",
                    help="ddp: everything replicated, gradients plus DDP's bucket copy; zero1: "
                    "optimizer state split across ranks by whole parameters "
                    "(ZeroRedundancyOptimizer; analytic mode); fsdp2: weights, gradients and "
                    "state sharded by rows, one decoder layer per unit (analytic mode)")
    ap.add_argument("--ddp-bucket-view", action="store_true",
                    help="DDP with gradient_as_bucket_view=True: param.grad views DDP's "
                    "buckets, no second gradient copy (default: off, torch's default)")
    ap.add_argument("--json", help="write the profiles as JSON (bytes) to this file")
    ap.add_argument("--png", help="write a stacked bar chart to this image file")
    return ap


def main(argv: list[str] | None = None) -> int:
    """The command line: profile every ``--optimizer``, print the tables, write the files;
    returns 0 (a bad input exits with status 2 and one ``error:`` line)."""
    ap = argument_parser()
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
                device=args.device, steps=2 if args.steps is None else args.steps,
                world_size=args.world_size, engine=args.engine,
                ddp_bucket_view=args.ddp_bucket_view))
    except (ValueError, TypeError, KeyError, NotImplementedError) as e:
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
