"""LLaMA pretraining with any optimizer of lowrank-optim, launched with accelerate.

The GaLore paper's workflow (arXiv:2403.03507): a LLaMA model built from a config (tiny for
CPU, 60m ... 7b), cosine schedule with 10% warm-up decaying to 10% of the peak, periodic
validation perplexity, checkpoints with exact resume, on one process or many (DDP, FSDP2,
DeepSpeed through accelerate's configs in ``recipes/accelerate/``).

    accelerate launch recipes/pretrain.py --config recipes/configs/tiny.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/pretrain.py \\
        --config recipes/configs/llama_60m.yaml --optimizer galore_adamw

Settings come from the dataclass :class:`RecipeConfig` (defaults), then the YAML/JSON file
given with ``--config``, then that file's ``optimizer_overrides[<optimizer>]`` block, then
command-line flags (``--max-steps 100``; dicts and lists as JSON or space-separated values).

Data: the offline stdlib-documentation corpus (default), local text files (``--data
'texts/*.txt'``) or a Hugging Face dataset (``--hf-dataset allenai/c4 --hf-config en
--streaming true --tokenizer t5-base``, online).  Outputs in ``output_dir``: ``metrics.jsonl``
(one JSON line per log / eval), ``summary.json`` (final numbers), ``rank<i>.json`` (per-rank
digests of parameters and subspaces, written last: a success marker), ``checkpoints/step_<n>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `corpus` next to this file

import corpus  # noqa: E402

import lowrank_optim as lo  # noqa: E402
from lowrank_optim import distributed  # noqa: E402
from lowrank_optim.model_configs import LLAMA_SHAPES, build_llama  # noqa: E402
from lowrank_optim.registry import BASELINES, MODEL_BUILDERS  # noqa: E402

#: optimizer names the recipe adds to ``lowrank_optim.available()``
RECIPE_BASELINES = ("lora",)


@dataclass
class RecipeConfig:
    """Every setting of the recipe (YAML keys and ``--flag-name`` flags are these names)."""

    # model
    model: str = "tiny"  # one of lowrank_optim.model_configs.LLAMA_SHAPES
    model_overrides: dict = field(default_factory=dict)  # LlamaConfig fields, e.g. layers
    # optimizer
    optimizer: str = "galore_adamw"  # lowrank_optim.available() or "lora"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list | None = None  # None: the optimizer's default (Adafactor takes none)
    rank: int = 128  # projection rank; LoRA's r; SST's sampled vectors
    update_proj_gap: int | None = None  # None: the optimizer's default (GaLore 200, DCT 1)
    scale: float | None = None  # None: the optimizer's default (GaLore 0.25, DCT 1.0)
    proj_type: str = "std"
    target_modules: Any = "all-linear"  # "all-linear", a regex, or a list of names
    optimizer_kwargs: dict = field(default_factory=dict)  # passed to the optimizer as is
    lora_alpha: float = 32.0
    refresh_sync: str = "none"  # "broadcast": refresh on rank 0 and broadcast (DDP)
    optimizer_overrides: dict = field(default_factory=dict)  # {name: {field: value}}
    # data
    data: list = field(default_factory=list)  # local text files (globs); empty: stdlib docs
    hf_dataset: str | None = None  # e.g. allenai/c4 (needs `datasets`, online)
    hf_config: str | None = None
    hf_split: str = "train"
    hf_val_split: str = "validation"
    hf_text_field: str = "text"
    streaming: bool = False
    tokenizer: str = "bpe"  # "bpe" (trained locally), "bytes", tokenizer.json, or a HF name
    vocab_size: int = 1024  # of the locally trained BPE
    corpus_max_chars: int | None = None  # cut the stdlib corpus (tests)
    val_fraction: float = 0.05
    cache_dir: str = "~/.cache/lowrank_optim"
    seq_len: int = 256
    # batch and schedule
    batch_size: int = 8  # per process and micro-step
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps; the schedule spans them
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 0.0  # 0: no clipping
    mixed_precision: str = "auto"  # auto (launcher's, else bf16 on CUDA), no, bf16, fp16
    # evaluation, logging, checkpoints
    eval_every: int = 0  # 0: only at the end
    eval_samples: int = 256  # validation windows per evaluation
    log_every: int = 10
    report_to: list = field(default_factory=lambda: ["console"])  # + tensorboard, wandb, all
    project: str = "lowrank-optim"
    run_name: str | None = None
    output_dir: str = "runs/pretrain"
    save_every: int = 0  # 0: no periodic checkpoint
    keep_checkpoints: int = 2
    resume_from: str | None = None  # a checkpoint directory, or "latest" in output_dir
    stop_after: int | None = None  # stop (with a checkpoint) after this step: an interruption
    save_final_model: bool = False
    check_sync_every: int = 0  # DDP: check every N steps that ranks hold identical replicas
    progress: bool = True
    seed: int = 0


# -- configuration ----------------------------------------------------------------------------
def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(RecipeConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RecipeConfig)}


def _coerce(name: str, value: Any) -> Any:
    """``value`` (from YAML or the command line) as the type of field ``name``."""
    kind = _field_types()[name]
    args = typing.get_args(kind)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), kind) if args else kind
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or base is Any:
            return None
        raise ValueError(f"{name} cannot be null")
    if base is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{name}={value!r}: expected true or false")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if base in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected a number")
        number = base(float(value)) if base is int else float(value)
        if base is int and float(value) != number:
            raise ValueError(f"{name}={value!r}: expected an integer")
        return number
    if base in (dict, list):
        if isinstance(value, str):
            value = json.loads(value) if value[:1] in "[{" else [value]
        if isinstance(value, (list, tuple)) and base is list:
            return list(value)
        if not isinstance(value, base):
            raise ValueError(f"{name}={value!r}: expected a {base.__name__}")
        return value
    if base is Any and isinstance(value, str) and value[:1] == "[":
        return json.loads(value)
    return value


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a YAML or JSON file."""
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return data


def _check_keys(data: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; valid ones: {sorted(known)}")


def make_config(file_settings: dict[str, Any], cli_settings: dict[str, Any]) -> RecipeConfig:
    """Defaults < file < file's ``optimizer_overrides[optimizer]`` < command line."""
    _check_keys(file_settings, "config file")
    _check_keys(cli_settings, "command line")
    merged = {**file_settings, **cli_settings}
    name = str(merged.get("optimizer", RecipeConfig.optimizer))
    overrides = _coerce("optimizer_overrides", merged.get("optimizer_overrides", {}))
    per_optimizer = overrides.get(name, {}) or {}
    _check_keys(per_optimizer, f"optimizer_overrides[{name!r}]")
    settings = {**file_settings, **per_optimizer, **cli_settings}
    cfg = RecipeConfig(**{k: _coerce(k, v) for k, v in settings.items()})
    validate_config(cfg)
    return cfg


def validate_config(cfg: RecipeConfig) -> None:
    """Raise ``ValueError`` on settings the recipe cannot run."""
    names = optimizer_names()
    if cfg.optimizer.lower().replace("-", "_") not in names:
        raise ValueError(f"optimizer={cfg.optimizer!r}: choose one of {names}")
    if cfg.model not in LLAMA_SHAPES:
        raise ValueError(f"model={cfg.model!r}: choose one of {sorted(LLAMA_SHAPES)}")
    for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "seq_len", "log_every",
                "eval_samples"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)} must be >= 1")
    if not 0.0 <= cfg.warmup_ratio < 1.0 or not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
    if cfg.refresh_sync not in ("none", "broadcast"):
        raise ValueError(f"refresh_sync={cfg.refresh_sync!r}: choose 'none' or 'broadcast'")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision={cfg.mixed_precision!r}: auto, no, bf16 or fp16")
    trackers = {"console", "tensorboard", "wandb", "all", "none"}
    if set(cfg.report_to) - trackers:
        raise ValueError(f"report_to={cfg.report_to}: choose from {sorted(trackers)}")


def parse_args(argv: list[str] | None = None) -> RecipeConfig:
    """The recipe's command line: ``--config FILE`` plus one flag per :class:`RecipeConfig`
    field."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", help="YAML or JSON file of settings")
    for f in dataclasses.fields(RecipeConfig):
        flag = "--" + f.name.replace("_", "-")
        if _field_types()[f.name] in (list, list | None):
            ap.add_argument(flag, dest=f.name, nargs="+", metavar=f.name.upper())
        else:
            ap.add_argument(flag, dest=f.name, metavar=f.name.upper())
    ns = vars(ap.parse_args(argv))
    path = ns.pop("config", None)
    cli = {k: (v if not isinstance(v, list) or len(v) > 1 or v[0][:1] != "[" else v[0])
           for k, v in ns.items()}
    return make_config(load_config_file(path) if path else {}, cli)


def optimizer_names() -> list[str]:
    """Every optimizer the recipe can run: the library's, plus the LoRA baseline."""
    return sorted({*lo.available(), *RECIPE_BASELINES})


# -- building blocks ----------------------------------------------------------------------------
def make_accelerator(cfg: RecipeConfig):
    """An ``Accelerator`` with the recipe's accumulation, precision and trackers.

    accelerate runs FSDP only on accelerator devices; launched with an FSDP2 config on CPU
    (``ACCELERATE_USE_CPU=true``, gloo) it would silently fall back to DDP.  The recipe then
    turns accelerate's own FSDP2 path back on, so CPU tests exercise the same code as GPUs.
    """
    from accelerate import Accelerator

    mixed = cfg.mixed_precision
    if mixed == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            mixed = None  # what the launcher / accelerate config says
        else:
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            mixed = "bf16" if cuda_bf16 else "no"
    trackers = set(cfg.report_to)
    log_with = sorted({"tensorboard", "wandb"} if "all" in trackers
                      else trackers & {"tensorboard", "wandb"})
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=mixed, log_with=log_with or None,
                              project_dir=cfg.output_dir)
    _enable_fsdp2_on_cpu(accelerator)
    return accelerator


def _enable_fsdp2_on_cpu(accelerator) -> None:
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants_fsdp or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ValueError("On CPU the recipe runs FSDP2 only (fsdp_version: 2).")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


@dataclass
class Data:
    """Token windows for training and validation, and the tokenizer's vocabulary size."""

    train: Any  # corpus.PackedWindows or corpus.StreamingWindows
    val: corpus.PackedWindows
    vocab_size: int
    description: str


def load_data(cfg: RecipeConfig) -> Data:
    """The configured corpus, tokenized (cached) and cut into windows."""
    if cfg.hf_dataset:
        texts = corpus.hf_texts(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, cfg.hf_text_field,
                                cfg.streaming)
        val_iter = corpus.hf_texts(cfg.hf_dataset, cfg.hf_config, cfg.hf_val_split,
                                   cfg.hf_text_field, cfg.streaming)()
        tokenizer = corpus.make_tokenizer(cfg.tokenizer, None, cfg.vocab_size, cfg.cache_dir)
        val_texts, need = [], cfg.eval_samples * cfg.seq_len
        for text in val_iter:  # enough validation text for eval_samples windows
            val_texts.append(text)
            need -= len(text) // 2
            if need <= 0:
                break
        val_ids = corpus.encode_documents(tokenizer, val_texts)
        train = corpus.StreamingWindows(texts, tokenizer, cfg.seq_len)
        return Data(train, corpus.PackedWindows(val_ids, cfg.seq_len, shuffle=False),
                    tokenizer.vocab_size, f"{cfg.hf_dataset} ({tokenizer.name})")
    if cfg.data:
        docs, source = corpus.file_documents(cfg.data), f"{len(cfg.data)} file pattern(s)"
    else:
        docs = corpus.cached_stdlib_documents(cfg.cache_dir, cfg.corpus_max_chars)
        source = "stdlib docs"
    train_texts, val_texts = corpus.split_documents(docs, cfg.val_fraction)
    tokenizer = corpus.make_tokenizer(cfg.tokenizer, train_texts, cfg.vocab_size, cfg.cache_dir)
    train_ids, val_ids = corpus.cached_token_streams(tokenizer, train_texts, val_texts,
                                                     cfg.cache_dir)
    description = (f"{source}, {tokenizer.name}: {len(train_ids):,} train / "
                   f"{len(val_ids):,} val tokens")
    return Data(corpus.PackedWindows(train_ids, cfg.seq_len, seed=cfg.seed),
                corpus.PackedWindows(val_ids, cfg.seq_len, shuffle=False),
                tokenizer.vocab_size, description)


def build_model(cfg: RecipeConfig, vocab_size: int) -> torch.nn.Module:
    """A freshly initialised LLaMA of ``cfg.model``'s shape with the tokenizer's vocabulary."""
    overrides = {"vocab_size": vocab_size,
                 "max_position_embeddings": max(1024, cfg.seq_len), **cfg.model_overrides}
    return build_llama(cfg.model, seed=cfg.seed, **overrides)


def wrap_lora(model: torch.nn.Module, cfg: RecipeConfig) -> torch.nn.Module:
    """peft LoRA on the targeted Linear layers; embeddings, norms and the head stay trainable
    (pretraining from scratch), the wrapped base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=cfg.target_modules)
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if ".base_layer." not in name:
            p.requires_grad_(True)
    return model


def build_optimizer(cfg: RecipeConfig, model: torch.nn.Module):
    """``(model, optimizer)`` for ``cfg.optimizer`` (LoRA wraps the model, SST converts it)."""
    name = cfg.optimizer.lower().replace("-", "_")
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                              **cfg.optimizer_kwargs}
    if cfg.betas is not None:
        kwargs["betas"] = tuple(float(b) for b in cfg.betas)
    if name == "lora":
        model = wrap_lora(model, cfg)
        optimizer = lo.create_optimizer(model, "adamw", **kwargs)
    elif name in BASELINES:
        optimizer = lo.create_optimizer(model, name, **kwargs)
    else:
        kwargs.update(rank=cfg.rank, target_modules=cfg.target_modules)
        if name not in MODEL_BUILDERS:  # projected optimizers; SST has its own schedule
            kwargs["proj_type"] = cfg.proj_type
            for key in ("update_proj_gap", "scale"):
                if getattr(cfg, key) is not None:
                    kwargs[key] = getattr(cfg, key)
        optimizer = lo.create_optimizer(model, name, **kwargs)
    if cfg.refresh_sync == "broadcast":
        if not isinstance(optimizer, lo.LowRankOptimizer):
            raise ValueError(f"refresh_sync='broadcast' needs a low-rank optimizer, not {name}")
        distributed.broadcast_refreshes(optimizer)
    return model, optimizer


def build_scheduler(cfg: RecipeConfig, optimizer: torch.optim.Optimizer):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine to ``min_lr_ratio``."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=round(cfg.warmup_ratio * cfg.max_steps),
        num_training_steps=cfg.max_steps, min_lr_rate=cfg.min_lr_ratio)


def state_bytes(optimizer: torch.optim.Optimizer) -> lo.memory.StateBytes:
    """Optimizer-state bytes held by this rank (FSDP2 shards counted locally)."""
    return lo.memory.state_bytes(optimizer)


@torch.no_grad()
def evaluate(model, val: corpus.PackedWindows, cfg: RecipeConfig, accelerator) -> float:
    """Mean validation loss over the same windows whatever the number of processes."""
    world, rank, micro = accelerator.num_processes, accelerator.process_index, cfg.batch_size
    n = max(1, min(cfg.eval_samples, len(val)) // (micro * world)) * micro * world
    total = torch.zeros((), device=accelerator.device)
    model.eval()
    for start in range(rank * micro, n, micro * world):
        ids = val.samples(start % len(val), micro).to(accelerator.device)
        total += model(input_ids=ids, labels=ids).loss.float()
    model.train()
    return accelerator.reduce(total, "sum").item() / (n // micro)


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped (a diverged run reports a huge number, not an overflow)."""
    return math.exp(min(loss, 50.0))


@dataclass
class TrainState:
    """The data position and counters, saved as ``train_state.json`` with each checkpoint."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # training windows consumed (all processes)
    tokens: int = 0

    def save(self, directory: Path) -> None:
        (directory / "train_state.json").write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        return cls(**json.loads((directory / "train_state.json").read_text()))


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with ``train_state.json``), oldest first."""
    root = Path(output_dir) / "checkpoints"
    done = [p for p in root.glob("step_*") if (p / "train_state.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator, state: TrainState, cfg: RecipeConfig) -> Path:
    """``accelerator.save_state`` (model, optimizer, scheduler, RNG of every process) plus the
    data position; older checkpoints beyond ``keep_checkpoints`` are removed."""
    directory = Path(cfg.output_dir) / "checkpoints" / f"step_{state.step}"
    accelerator.save_state(str(directory))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(directory)  # written last: marks the checkpoint complete
        for old in checkpoints(cfg.output_dir)[:-max(1, cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return directory


def resume_directory(cfg: RecipeConfig) -> Path | None:
    if cfg.resume_from in (None, ""):
        return None
    if cfg.resume_from == "latest":
        done = checkpoints(cfg.output_dir)
        return done[-1] if done else None
    path = Path(cfg.resume_from)
    if not (path / "train_state.json").exists():
        raise FileNotFoundError(f"resume_from={cfg.resume_from!r} is not a complete checkpoint")
    return path


class Metrics:
    """Console lines, accelerate trackers and ``metrics.jsonl`` (main process only)."""

    def __init__(self, accelerator, cfg: RecipeConfig, progress) -> None:
        self.accelerator, self.cfg, self.progress = accelerator, cfg, progress
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self.console = "console" in cfg.report_to or "all" in cfg.report_to

    @staticmethod
    def truncate(path: Path, step: int) -> None:
        """Keep the lines of steps up to ``step`` (a resumed run rewrites what follows)."""
        if not path.exists():
            return
        lines = [x for x in path.read_text().splitlines() if json.loads(x)["step"] <= step]
        path.write_text("".join(x + "\n" for x in lines))

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.console:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in values.items())
            (self.progress.write if self.progress is not None else print)(f"step {step}: {text}")


def _engine(accelerator) -> str:
    kind = str(accelerator.distributed_type).split(".")[-1].lower()
    return {"no": "single", "multi_cpu": "ddp", "multi_gpu": "ddp"}.get(kind, kind)


# -- the run ------------------------------------------------------------------------------------
def train(cfg: RecipeConfig) -> dict[str, Any]:
    """Run the recipe; returns the summary (also written to ``summary.json``)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    with accelerator.main_process_first():  # rank 0 builds the caches, the others read them
        data = load_data(cfg)
    model = build_model(cfg, data.vocab_size)
    model, optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # no prepared dataloader to fill DeepSpeed's "auto" batch size
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm
    # The scheduler is stepped here once per optimizer step (accelerate's prepared scheduler
    # would step num_processes times) and checkpointed through register_for_checkpointing.
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.is_main_process and set(cfg.report_to) & {"tensorboard", "wandb", "all"}:
        accelerator.init_trackers(cfg.project, config=_flat_config(cfg),
                                  init_kwargs={"wandb": {"name": cfg.run_name}}
                                  if cfg.run_name else {})
    if accelerator.is_main_process:
        print(f"[pretrain] {cfg.model} / {cfg.optimizer} / {_engine(accelerator)} x "
              f"{accelerator.num_processes} / precision {accelerator.mixed_precision} / "
              f"{data.description}", flush=True)

    state = TrainState()
    resume = resume_directory(cfg)
    if resume is not None:
        accelerator.load_state(str(resume))
        state = TrainState.load(resume)
        accelerator.print(f"[pretrain] resumed from {resume} at step {state.step}")
    if accelerator.is_main_process:
        Metrics.truncate(Path(cfg.output_dir) / "metrics.jsonl", state.step)

    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    global_batch = micro * world * accum
    stop = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc=cfg.optimizer,
                    disable=not (cfg.progress and accelerator.is_local_main_process))
    metrics = Metrics(accelerator, cfg, progress if cfg.progress else None)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, since_log = torch.zeros((), device=accelerator.device), 0
    first_loss = last_loss = None
    train_seconds, tokens_this_run, start_step = 0.0, 0, state.step
    val_loss = None

    def validate() -> float:
        loss = evaluate(model, data.val, cfg, accelerator)
        metrics.log({"val_loss": loss, "val_ppl": perplexity(loss),
                     "state_bytes": state_bytes(optimizer).total}, state.step)
        return loss

    model.train()
    while state.step < stop:
        t0 = time.perf_counter()
        for k in range(accum):
            start = state.samples + (k * world + rank) * micro
            ids = data.train.samples(start, micro).to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=ids, labels=ids).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                prepared_optimizer.step()
                prepared_optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float() / accum
        scheduler.step()
        state.step += 1
        state.samples += global_batch
        state.tokens += global_batch * cfg.seq_len
        tokens_this_run += global_batch * cfg.seq_len
        since_log += 1
        train_seconds += time.perf_counter() - t0
        progress.update(1)

        if state.step % cfg.log_every == 0 or state.step == stop:
            mean_loss = accelerator.reduce(loss_sum, "mean").item() / since_log
            loss_sum.zero_()
            since_log = 0
            first_loss = mean_loss if first_loss is None else first_loss
            last_loss = mean_loss
            metrics.log({"loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                         "tokens_per_s": tokens_this_run / max(train_seconds, 1e-9),
                         "tokens": state.tokens}, state.step)
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
            val_loss = validate()
        if cfg.check_sync_every and state.step % cfg.check_sync_every == 0 and _engine(
                accelerator) == "ddp":
            distributed.check_in_sync(model, optimizer)
        if cfg.save_every and state.step % cfg.save_every == 0 or state.step == cfg.stop_after:
            save_checkpoint(accelerator, state, cfg)
    progress.close()

    finished = state.step >= cfg.max_steps
    if finished:
        val_loss = validate()
    sb = state_bytes(optimizer)
    summary = {
        "optimizer": cfg.optimizer, "model": cfg.model, "engine": _engine(accelerator),
        "num_processes": world, "step": state.step, "finished": finished,
        "first_loss": first_loss, "last_loss": last_loss, "val_loss": val_loss,
        "val_ppl": perplexity(val_loss) if val_loss is not None else None,
        "state_bytes": sb.total, "state_bytes_per_param": sb.bytes_per_param,
        "tokens_per_s": tokens_this_run / max(train_seconds, 1e-9),
        "train_steps_this_run": state.step - start_step, "data": data.description,
    }
    if cfg.save_final_model and finished:
        accelerator.save_model(model, str(Path(cfg.output_dir) / "final"))
    if accelerator.is_main_process:
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"[pretrain] {summary_line(summary)}", flush=True)
    per_rank = {
        "rank": rank, "step": state.step, "last_loss": last_loss, "val_loss": val_loss,
        "param_digest": distributed.digest(model.parameters()),
        "subspace_digest": distributed.digest(distributed.subspace_tensors(optimizer)),
    }
    accelerator.wait_for_everyone()
    accelerator.end_training()
    (Path(cfg.output_dir) / f"rank{rank}.json").write_text(json.dumps(per_rank))
    return summary


def _flat_config(cfg: RecipeConfig) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v))
            for k, v in asdict(cfg).items()}


TABLE_COLUMNS = ("optimizer", "val loss", "val ppl", "state bytes", "B/param", "tokens/s")


def summary_line(s: dict[str, Any]) -> str:
    """One row of the final table."""
    val = "-" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
    ppl = "-" if s["val_ppl"] is None else f"{s['val_ppl']:.2f}"
    return (f"{s['optimizer']:<18}{val:>9}{ppl:>10}{s['state_bytes']:>13,}"
            f"{s['state_bytes_per_param']:>9.2f}{s['tokens_per_s']:>10,.0f}")


def format_table(summaries: list[dict[str, Any]]) -> str:
    """The final table: optimizer, validation loss / perplexity, state bytes, tokens/s."""
    head = (f"{TABLE_COLUMNS[0]:<18}{TABLE_COLUMNS[1]:>9}{TABLE_COLUMNS[2]:>10}"
            f"{TABLE_COLUMNS[3]:>13}{TABLE_COLUMNS[4]:>9}{TABLE_COLUMNS[5]:>10}")
    return "\n".join([head, "-" * len(head), *map(summary_line, summaries)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
