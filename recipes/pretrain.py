"""LLaMA pretraining with any optimizer of lowrank-optim, launched with accelerate.

The GaLore paper's workflow (arXiv:2403.03507): a LLaMA model built from a config (tiny for
CPU, 60m ... 7b), cosine schedule with 10% warm-up decaying to 10% of the peak, periodic
validation perplexity, checkpoints with exact resume, on one process or many (DDP, FSDP2,
DeepSpeed: accelerate's configs in ``recipes/accelerate/``, or ``--deepspeed ds_zero0.json``
with any launcher, e.g. ``deepspeed --num_gpus 2 --module recipes.pretrain``).  Run it as a
module from the repository's root:

    python -m recipes.pretrain --config recipes/configs/tiny.yaml
    accelerate launch -m recipes.pretrain --config recipes/configs/tiny.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m recipes.pretrain \\
        --config recipes/configs/llama_60m.yaml --optimizer galore_adamw

Settings: :mod:`recipes.config` (defaults < ``--config`` file < its ``optimizer_overrides``
block < flags).  The accelerator and its engine: :mod:`recipes.launch`; checkpoints and
resume: :mod:`recipes.checkpoint`; crash-safe files: :mod:`recipes.files`.

Data: the offline stdlib-documentation corpus (default), local text files (``--data
'texts/*.txt'``) or a Hugging Face dataset (``--hf-dataset allenai/c4 --hf-config en
--streaming true --tokenizer t5-base``, online).  Outputs in the run's directory (``output_dir``
when set, else a new ``<runs_dir>/<optimizer>-<YYYYmmdd-HHMMSS>``, printed at the start):
``metrics.jsonl`` (one JSON line per log / eval), ``summary.json`` (final numbers),
``rank<i>.json`` (per-rank digests of parameters and subspaces, written last: a success
marker), ``checkpoints/step_<n>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lowrank_optim as lo
from lowrank_optim import distributed
from lowrank_optim.model_configs import build_llama
from lowrank_optim.registry import BASELINES, MODEL_BUILDERS
from lowrank_optim.schedules import RefreshScheduler, make_schedule
from recipes import corpus
from recipes.checkpoint import (
    ResumeParts,
    TrainState,
    check_resume_settings,
    choose_output_dir,
    prune,
    restore_parts,
    resume_directory,
    save_checkpoint,
    set_aside_later_checkpoints,
    verify_checkpoint,
)
from recipes.config import (
    RecipeConfig,
    RecipeError,
    bad_setting,
    flat_config,
    normal_name,
    optimizer_names,
    parse_args,
)
from recipes.files import append_line, atomic_write, remove_stale_temporaries
from recipes.launch import (
    engine_name,
    local_rank,
    make_accelerator,
    set_project_dir,
    zero_stage,
)

__all__ = ["Data", "Metrics", "agree_output_dir", "build_model", "build_optimizer",
           "build_refresh_scheduler", "build_scheduler", "cli",
           "evaluate", "format_table", "load_data", "main", "optimizer_names", "parse_args",
           "parse_command_line", "perplexity", "state_bytes", "summary_line", "table_notes",
           "train", "wrap_lora"]


# -- building blocks ----------------------------------------------------------------------------
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
    if cfg.zero1:
        kwargs["zero1"] = True
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


class Metrics:
    """Console lines, accelerate trackers and ``metrics.jsonl`` (main process only).

    Each line is appended with one write and an fsync (:func:`append_line`); ``lines`` counts
    the lines in the file, recorded with each checkpoint so that a resume keeps exactly the
    lines written before it.
    """

    def __init__(self, accelerator, cfg: RecipeConfig, progress, lines: int = 0) -> None:
        self.accelerator, self.cfg, self.progress = accelerator, cfg, progress
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self.console = "console" in cfg.report_to or "all" in cfg.report_to
        self.lines = lines

    @staticmethod
    def truncate(path: Path, step: int, lines: int | None = None) -> int:
        """Keep the first ``lines`` lines (all when ``None``) whose step is at most ``step``
        (a resumed run rewrites what follows); returns how many were kept.

        A partial or unreadable line (a kill mid-write) is dropped with a warning.  The file is
        replaced atomically (:func:`atomic_write`), and only when something is dropped: a kill
        at any moment leaves the old history or the new one.
        """
        if not path.exists():
            return 0
        text = path.read_text(encoding="utf-8", errors="replace")
        raw = text.split("\n")
        tail = raw.pop()  # "" when the file ends with a newline
        if tail:
            warnings.warn(f"{path}: dropping a partial last line (a write was interrupted): "
                          f"{tail[:80]!r}", RuntimeWarning, stacklevel=2)
        kept = []
        for number, line in enumerate(raw, 1):
            try:
                record = json.loads(line)
                line_step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                warnings.warn(f"{path}:{number}: dropping an unreadable line: {line[:80]!r}",
                              RuntimeWarning, stacklevel=2)
                continue
            if line_step <= step and (lines is None or len(kept) < lines):
                kept.append(line)
        if len(kept) != len(raw) or tail:
            atomic_write(path, "".join(x + "\n" for x in kept))
        return len(kept)

    def log(self, values: dict[str, Any], step: int) -> None:
        """One line of ``values`` at ``step``: trackers, ``metrics.jsonl`` and the console."""
        self.accelerator.log(values, step=step)
        if not self.accelerator.is_main_process:
            return
        append_line(self.path, json.dumps({"step": step, **values}))
        self.lines += 1
        if self.console:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in values.items())
            (self.progress.write if self.progress is not None else print)(f"step {step}: {text}")


# -- the run ------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a run holds between its steps (one per process)."""

    cfg: RecipeConfig
    accelerator: Any
    data: Data
    model: Any
    optimizer: Any  # the optimizer built by the recipe (state, subspaces)
    prepared_optimizer: Any  # accelerate's wrapper of it, stepped by the loop
    scheduler: Any
    refresh: RefreshScheduler | None  # per-layer refresh timing (refresh_schedule)
    resume: Path | None
    parts: ResumeParts | None
    config_changes: dict[str, dict[str, Any]]
    state: TrainState = field(default_factory=TrainState)
    metrics: Metrics | None = None
    progress: Any = None
    params: list = field(default_factory=list)
    loss_sum: torch.Tensor | None = None  # this process's train loss since the last log line
    since_log: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    val_loss: float | None = None
    train_seconds: float = 0.0
    tokens_this_run: int = 0
    start_step: int = 0

    @property
    def inexact(self) -> list[str]:
        """What an inexact resume could not restore (empty for an exact one)."""
        return self.parts.inexact if self.parts is not None else []

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, all processes together."""
        cfg = self.cfg
        return cfg.batch_size * self.accelerator.num_processes * cfg.gradient_accumulation_steps


def _check_resume(cfg: RecipeConfig, accelerator) -> tuple[Path | None, ResumeParts | None,
                                                            dict[str, dict[str, Any]]]:
    """The checkpoint to resume, what was read from it and the settings that changed; a
    mismatch or an unsafe file is refused here, before anything is loaded."""
    resume = resume_directory(cfg, verbose=accelerator.is_main_process)
    if resume is None:
        return None, None, {}
    config_changes = check_resume_settings(resume, cfg, accelerator)
    parts = verify_checkpoint(resume, cfg, accelerator)
    resumed_step = TrainState.load(resume).step
    if cfg.stop_after is not None and cfg.stop_after <= resumed_step:
        raise bad_setting("stop_after", cfg.stop_after, f"not after step {resumed_step} of "
                          f"{resume}, so nothing would run; raise it or drop it")
    return resume, parts, config_changes


def _build(cfg: RecipeConfig, accelerator) -> tuple[Data, Any, Any, Any]:
    """Data, model, optimizer and learning-rate scheduler (DeepSpeed's config completed)."""
    with accelerator.main_process_first():  # rank 0 builds the caches, the others read them
        data = load_data(cfg)
    model = build_model(cfg, data.vocab_size)
    model, optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # no prepared dataloader to fill DeepSpeed's "auto" batch size
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm
        # ZeRO 1-3 would flatten the low-rank optimizers' matrices: say so before DeepSpeed runs
        distributed.check_zero_stage(optimizer, zero_stage(accelerator))
    return data, model, optimizer, scheduler


def build_refresh_scheduler(cfg: RecipeConfig, optimizer: Any,
                            accelerator: Any) -> RefreshScheduler | None:
    """The :class:`~lowrank_optim.schedules.RefreshScheduler` of ``cfg.refresh_schedule`` on
    the prepared ``optimizer`` (FSDP2 replaces the parameters it holds), or None.

    Raises
    ------
    RecipeError
        An ``energy_threshold`` under an engine whose optimizer step does not follow the
        backward pass with the gradients in place (FSDP2, DeepSpeed).
    """
    if not cfg.refresh_schedule:
        return None
    schedule, engine = make_schedule(cfg.refresh_schedule), engine_name(accelerator)
    if getattr(schedule, "energy_threshold", None) is not None and engine not in ("single",
                                                                               "ddp"):
        raise bad_setting("refresh_schedule", cfg.refresh_schedule, "energy_threshold reads "
                          f"whole gradients before the step, which {engine} does not give; "
                          "drop it (the overlap rule still applies)")
    if cfg.update_proj_gap is not None and accelerator.is_main_process:
        print(f"[pretrain] warning: update_proj_gap={cfg.update_proj_gap} is ignored: "
              "refresh_schedule times the refreshes", file=sys.stderr, flush=True)
    return RefreshScheduler(optimizer, schedule)


def agree_output_dir(cfg: RecipeConfig, accelerator: Any) -> RecipeConfig:
    """``cfg`` with ``output_dir`` set to the run's directory, the same on every process.

    The main process chooses it (:func:`recipes.checkpoint.choose_output_dir`: ``output_dir``
    as given, the resumed run's directory, or a new ``<runs_dir>/<optimizer>-<stamp>``, which
    it creates) and says where on the console; the others receive it, so no two processes can
    pick different time stamps.  accelerate's project and logging directories (TensorBoard)
    follow.

    Raises
    ------
    RecipeError
        On every process, when the main process could not create the directory.
    """
    from accelerate.utils import broadcast_object_list

    choice: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            path, why = choose_output_dir(cfg)
            choice[0] = str(path)
            print(f"[pretrain] output_dir: {path} ({why})", flush=True)
        except RecipeError as e:
            choice[1] = str(e)
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if choice[1] is not None:
        raise RecipeError(choice[1])
    set_project_dir(accelerator, choice[0])
    return dataclasses.replace(cfg, output_dir=choice[0])


def _setup(cfg: RecipeConfig) -> Run:
    """The accelerator, the run's directory, the resume checks, the prepared model and
    optimizer, the trackers."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg)
    if cfg.zero1 and engine_name(accelerator) != "ddp":
        raise RecipeError(f"--zero1 true splits the optimizer state across DDP ranks, but this "
                          f"launch runs {engine_name(accelerator)} x {accelerator.num_processes}: "
                          "launch with recipes/accelerate/ddp.yaml and 2+ processes, or drop "
                          "--zero1.")
    set_seed(cfg.seed)
    cfg = agree_output_dir(cfg, accelerator)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    resume, parts, config_changes = _check_resume(cfg, accelerator)
    data, model, optimizer, scheduler = _build(cfg, accelerator)
    # The scheduler is stepped here once per optimizer step (accelerate's prepared scheduler
    # would step num_processes times) and checkpointed by the recipe as JSON: registered with
    # accelerate, it would be unpickled with weights_only=False at resume.
    # a ZeroRedundancyOptimizer's state_dict() needs a consolidation first, which accelerate's
    # device placement (a state_dict / load_state_dict round trip of the empty state) skips
    placement = [accelerator.device_placement, False] if cfg.zero1 else None
    model, prepared_optimizer = accelerator.prepare(model, optimizer,
                                                    device_placement=placement)
    if accelerator.is_main_process and set(cfg.report_to) & {"tensorboard", "wandb", "all"}:
        accelerator.init_trackers(cfg.project, config=flat_config(cfg),
                                  init_kwargs={"wandb": {"name": cfg.run_name}}
                                  if cfg.run_name else {})
    if accelerator.is_main_process:
        print(f"[pretrain] {cfg.model} / {cfg.optimizer} / {engine_name(accelerator)} x "
              f"{accelerator.num_processes} / precision {accelerator.mixed_precision} / "
              f"{data.description}", flush=True)
    refresh = build_refresh_scheduler(cfg, prepared_optimizer, accelerator)
    return Run(cfg, accelerator, data, model, optimizer, prepared_optimizer, scheduler, refresh,
               resume, parts, config_changes)


def _restore(run: Run) -> None:
    """Load the checkpoint (every file verified by ``verify_checkpoint``)."""
    run.state = TrainState.load(run.resume)
    run.accelerator.load_state(str(run.resume))
    if engine_name(run.accelerator) == "fsdp":  # accelerate's template load drops some entries
        restored = distributed.restore_dropped_state(run.resume / "optimizer_0", run.model,
                                                     run.optimizer)
        if restored:
            run.accelerator.print(f"[pretrain] restored {len(restored)} optimizer state "
                                  "entries accelerate's FSDP2 load left out: "
                                  + ", ".join(restored[:3]) + (" ..." if len(restored) > 3
                                                                else ""))
    restore_parts(run.parts, run.scheduler, run.accelerator)
    if run.refresh is not None and run.parts.refresh is not None:
        run.refresh.load_state_dict(run.parts.refresh)
    run.accelerator.print(f"[pretrain] resumed from {run.resume} at step {run.state.step}"
                          + (" (inexact: random generators not restored)" if run.inexact
                             else ""))


def _open_outputs(run: Run) -> None:
    """Metrics, progress bar and the resume's notes in ``metrics.jsonl``."""
    from tqdm.auto import tqdm

    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    kept_lines = 0
    if accelerator.is_main_process:  # history up to the checkpoint; later checkpoints set aside
        remove_stale_temporaries(Path(cfg.output_dir))
        kept_lines = Metrics.truncate(Path(cfg.output_dir) / "metrics.jsonl", state.step,
                                      state.metrics_lines)
        set_aside_later_checkpoints(cfg.output_dir, state.step)
        prune(cfg, state.step)  # what a kill during the last save left to do
    run.progress = tqdm(total=cfg.max_steps, initial=state.step, desc=cfg.optimizer,
                        disable=not (cfg.progress and accelerator.is_local_main_process))
    run.metrics = Metrics(accelerator, cfg, run.progress if cfg.progress else None,
                          lines=kept_lines)
    for key, value in (("config_changes", run.config_changes), ("inexact_resume", run.inexact)):
        if value and accelerator.is_main_process:
            append_line(run.metrics.path, json.dumps({"step": state.step,
                                                      "resumed_from": str(run.resume),
                                                      key: value}))
            run.metrics.lines += 1


def _carry_loss(run: Run) -> None:
    """The train-loss sums of the log interval the checkpoint cut, for this process."""
    state, world = run.state, run.accelerator.num_processes
    run.loss_sum = torch.zeros((), device=run.accelerator.device)
    if state.loss_sums is None or not state.since_log:
        return
    if len(state.loss_sums) == world:
        run.loss_sum += state.loss_sums[run.accelerator.process_index]
        run.since_log = state.since_log
    else:
        run.accelerator.print(f"[pretrain] warning: {state.since_log} step(s) of train loss "
                              f"since the last log line were saved by {len(state.loss_sums)} "
                              f"processes, not {world}: the next loss line leaves them out")


def _train_step(run: Run) -> None:
    """One optimizer step: ``gradient_accumulation_steps`` micro-batches on every process."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    t0 = time.perf_counter()
    refresh = run.refresh
    if refresh is not None:
        refresh.before_step(state.step)  # before backward, where layer-wise mode steps
    for k in range(accum):
        start = state.samples + (k * world + rank) * micro
        ids = run.data.train.samples(start, micro).to(accelerator.device)
        with accelerator.accumulate(run.model):
            loss = run.model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            stepping = accelerator.sync_gradients  # the last micro-batch: the optimizer steps
            if stepping and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
            if stepping and refresh is not None:
                refresh.before_optimizer_step(state.step)
            run.prepared_optimizer.step()
            if stepping and refresh is not None:
                refresh.after_step(state.step)
            run.prepared_optimizer.zero_grad(set_to_none=True)
        run.loss_sum += loss.detach().float() / accum
    run.scheduler.step()
    state.step += 1
    state.samples += run.global_batch
    state.tokens += run.global_batch * cfg.seq_len
    run.tokens_this_run += run.global_batch * cfg.seq_len
    run.since_log += 1
    run.train_seconds += time.perf_counter() - t0
    run.progress.update(1)


def _validate(run: Run) -> float:
    """Validation loss now, logged with the perplexity and the optimizer-state bytes."""
    loss = evaluate(run.model, run.data.val, run.cfg, run.accelerator)
    run.metrics.log({"val_loss": loss, "val_ppl": perplexity(loss),
                     "state_bytes": state_bytes(run.optimizer).total}, run.state.step)
    return loss


def _log_loss(run: Run) -> None:
    """The mean train loss since the last log line, the learning rate and the throughput."""
    mean_loss = run.accelerator.reduce(run.loss_sum, "mean").item() / run.since_log
    run.loss_sum.zero_()
    run.since_log = 0
    run.first_loss = mean_loss if run.first_loss is None else run.first_loss
    run.last_loss = mean_loss
    run.metrics.log({"loss": mean_loss, "lr": run.scheduler.get_last_lr()[0],
                     "tokens_per_s": run.tokens_this_run / max(run.train_seconds, 1e-9),
                     "tokens": run.state.tokens}, run.state.step)


def _after_step(run: Run) -> None:
    """Log, evaluate, check the replicas and checkpoint, each when due."""
    cfg, state = run.cfg, run.state
    # not at stop_after: its checkpoint carries the interval on, as an uninterrupted run
    if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
        _log_loss(run)
    if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
        run.val_loss = _validate(run)
    if cfg.check_sync_every and state.step % cfg.check_sync_every == 0 and engine_name(
            run.accelerator) in ("ddp", "deepspeed-zero0"):  # replicated parameters
        distributed.check_in_sync(run.model, run.optimizer)
    if cfg.save_every and state.step % cfg.save_every == 0 or state.step == cfg.stop_after:
        state.metrics_lines, state.since_log = run.metrics.lines, run.since_log
        state.loss_sums = run.accelerator.gather(run.loss_sum.reshape(1)).tolist()
        save_checkpoint(run.accelerator, state, cfg, run.scheduler, run.refresh)


def _summary(run: Run, finished: bool) -> dict[str, Any]:
    cfg, state, sb = run.cfg, run.state, state_bytes(run.optimizer)
    return {
        "optimizer": cfg.optimizer, "model": cfg.model, "engine": engine_name(run.accelerator),
        "num_processes": run.accelerator.num_processes, "step": state.step,
        "finished": finished, "first_loss": run.first_loss, "last_loss": run.last_loss,
        "val_loss": run.val_loss,
        "val_ppl": perplexity(run.val_loss) if run.val_loss is not None else None,
        "state_bytes": sb.total, "state_bytes_per_param": sb.bytes_per_param,
        "trained_params": sb.num_params,
        "tokens_per_s": run.tokens_this_run / max(run.train_seconds, 1e-9),
        "train_steps_this_run": state.step - run.start_step, "data": run.data.description,
        "resumed_from": None if run.resume is None else str(run.resume),
        "config_changes": run.config_changes, "inexact_resume": run.inexact,
        "output_dir": str(cfg.output_dir),
    }


def _finish(run: Run) -> dict[str, Any]:
    """Final validation, ``summary.json``, the final model, and this process's marker."""
    cfg, accelerator = run.cfg, run.accelerator
    finished = run.state.step >= cfg.max_steps
    if finished:
        run.val_loss = _validate(run)
    summary = _summary(run, finished)
    if cfg.save_final_model and finished:
        accelerator.save_model(run.model, str(Path(cfg.output_dir) / "final"))
    if accelerator.is_main_process:
        atomic_write(Path(cfg.output_dir) / "summary.json", json.dumps(summary, indent=1))
        for line in format_table([summary], notes=False).splitlines():
            print(f"[pretrain] {line}", flush=True)
        print(f"[pretrain] wrote {Path(cfg.output_dir) / 'summary.json'} and metrics.jsonl",
              flush=True)
    per_rank = {
        "rank": accelerator.process_index, "step": run.state.step,
        "last_loss": run.last_loss, "val_loss": run.val_loss,
        "param_digest": distributed.digest(run.model.parameters()),
        "subspace_digest": distributed.digest(distributed.subspace_tensors(run.optimizer)),
    }
    accelerator.wait_for_everyone()
    accelerator.end_training()
    atomic_write(Path(cfg.output_dir) / f"rank{accelerator.process_index}.json",
                 json.dumps(per_rank))
    return summary


def train(cfg: RecipeConfig) -> dict[str, Any]:
    """Run the recipe; returns the summary (also written to ``summary.json`` in the run's
    directory, ``cfg.output_dir`` or a new one under ``cfg.runs_dir``: the summary's
    ``output_dir``)."""
    run = _setup(cfg)
    cfg = run.cfg  # with the run's output_dir
    if run.resume is not None:
        _restore(run)
    _open_outputs(run)
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    _carry_loss(run)
    run.start_step = run.state.step
    stop = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    run.model.train()
    while run.state.step < stop:
        _train_step(run)
        _after_step(run)
    run.progress.close()
    return _finish(run)


# -- the final table and the command line -------------------------------------------------------
TABLE_COLUMNS = ("optimizer", "val loss", "val ppl", "state bytes", "trained params",
                 "B/trained param", "tokens/s")
#: column widths of :data:`TABLE_COLUMNS` (the first is left-aligned)
TABLE_WIDTHS = (18, 9, 10, 13, 16, 17, 10)
#: what the per-parameter column divides by, and why SST's bytes move: :func:`format_table`
TABLE_NOTES = {
    "all": ("B/trained param = state bytes / trained params, the parameter elements the "
            "optimizer updates: the whole model for adamw and the projected optimizers"),
    "lora": ("lora: its adapters plus the embeddings, norms and head; the frozen base weights "
             "are left out, so its count is smaller than the model's"),
    "sst": ("sst_*: the converted model (U, S and V of each converted layer in place of its "
            "weight, plus the rest), more elements than the dense model.  State bytes are "
            "counted after the last step: each redraw of the sampled vectors (every "
            "iteration_length steps, 200 by default) drops their moments and the next step "
            "re-creates them, so a count at a redraw step (metrics.jsonl's state_bytes at an "
            "evaluation) is lower; a re-SVD (every round) drops S's moments too"),
}


def _trained_params(s: dict[str, Any]) -> int | None:
    """``trained_params`` of a summary (derived for summaries written before it was kept)."""
    if s.get("trained_params") is not None:
        return int(s["trained_params"])
    per = s.get("state_bytes_per_param")
    return round(s["state_bytes"] / per) if per else None


def summary_line(s: dict[str, Any]) -> str:
    """One row of the final table (columns :data:`TABLE_COLUMNS`)."""
    val = "-" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
    ppl = "-" if s["val_ppl"] is None else f"{s['val_ppl']:.2f}"
    params = _trained_params(s)
    cells = (f"{s['state_bytes']:,}", "-" if params is None else f"{params:,}",
             f"{s['state_bytes_per_param']:.2f}", f"{s['tokens_per_s']:,.0f}")
    w = TABLE_WIDTHS
    return (f"{s['optimizer']:<{w[0]}}{val:>{w[1]}}{ppl:>{w[2]}}"
            + "".join(f"{c:>{width}}" for c, width in zip(cells, w[3:], strict=True)))


def table_notes(summaries: list[dict[str, Any]], width: int = sum(TABLE_WIDTHS)) -> list[str]:
    """The notes under the table, wrapped to ``width``: the denominator of the per-parameter
    column, and the rows whose count differs (LoRA, SST) when the table has them."""
    names = [normal_name(s["optimizer"]) for s in summaries]
    keys = ["all", *(["lora"] if "lora" in names else []),
            *(["sst"] if any(n.startswith("sst_") for n in names) else [])]
    return [line for k in keys for line in textwrap.wrap(
        TABLE_NOTES[k] + ".", width, initial_indent="* ", subsequent_indent="  ")]


def format_table(summaries: list[dict[str, Any]], notes: bool = True) -> str:
    """The final table: optimizer, validation loss / perplexity, state bytes, the parameters
    they are divided by, bytes per parameter, tokens/s.

    Parameters
    ----------
    summaries
        ``summary.json`` contents, one row each.
    notes
        Add :func:`table_notes` under the rows.
    """
    w = TABLE_WIDTHS
    head = f"{TABLE_COLUMNS[0]:<{w[0]}}" + "".join(
        f"{c:>{width}}" for c, width in zip(TABLE_COLUMNS[1:], w[1:], strict=True))
    lines = [head, "-" * len(head), *map(summary_line, summaries)]
    if notes:
        lines += ["", *table_notes(summaries)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the recipe; returns the summary."""
    return train(parse_args(argv))


def _tell_launcher(message: str) -> None:
    """Write ``message`` where torchrun / ``accelerate launch`` look for a failed process's
    error (``TORCHELASTIC_ERROR_FILE``), so that their failure report quotes it instead of
    pointing at a traceback that was never printed."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": message, "extraInfo": {
        "py_callstack": message, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(record), encoding="utf-8")


def parse_command_line(argv: list[str] | None = None) -> RecipeConfig | int:
    """:func:`parse_args` for the command line: the settings, or the exit status 2 after one
    error message.

    Launched processes (``accelerate launch``, ``torchrun``, ``deepspeed``) each parse the same
    command line before any process group exists, so a bad setting or a missing package
    (:func:`recipes.config.check_prerequisites`) stops all of them at once, none waiting for
    another.  Only local rank 0 prints the message (and argparse's usage); the other processes
    exit with the same status silently.  Every process hands the message to an elastic
    launcher's failure report (:func:`_tell_launcher`).
    """
    prog = Path(sys.argv[0]).name
    quiet = local_rank() not in (None, 0)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse_args(argv)
    except RecipeError as e:
        message = f"{prog}: error: {e}"
        print(message, file=captured)
    except SystemExit as e:  # argparse: usage and message are in `captured`
        if not e.code:  # --help
            raise
        lines = captured.getvalue().strip().splitlines()
        message = lines[-1] if lines else f"{prog}: error: bad command line"
    finally:
        if not quiet:  # warnings, or the error, as they would have been printed
            sys.stderr.write(captured.getvalue())
            sys.stderr.flush()
    _tell_launcher(message)
    return 2


def cli(argv: list[str] | None = None) -> int:
    """The command line: :func:`main`, with a :class:`RecipeError` (a bad setting or
    checkpoint) printed as ``pretrain.py: error: ...`` and exit status 2, as argparse does.

    Errors in the settings, and packages or files they need that are missing, are found before
    any process starts working (:func:`parse_command_line`: one message per machine in a
    launched run); errors found later (a checkpoint a resume refuses) are printed by every
    process that meets them."""
    cfg = parse_command_line(argv)
    if isinstance(cfg, int):
        return cfg
    try:
        train(cfg)
    except RecipeError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr, flush=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
