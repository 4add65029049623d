"""Every wrong input to ``trainer_callbacks`` gets a clear error naming the parameter and the
fix, raised before the Trainer or the model is changed (issue 12, "nothing silent").

Each table row is ``(bad input, exception type, regex the message must match)``; removing the
check it exercises makes that row fail (either no error, or another type / message).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import Trainer

import lowrank_optim as lo
import trainer_callbacks as tc
from lowrank_optim.layerwise import LayerwiseOptimizer
from tests.helpers import tiny_llama
from tests.test_trainer_swap import dataset, one_thread, training_args  # noqa: F401


# -- schedules ------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "exc", "match"), [
    (lambda: tc.FixedGap("10"), ValueError, r"gap='10'.*integer >= 1"),
    (lambda: tc.FixedGap(0), ValueError, r"gap=0.*integer >= 1"),
    (lambda: tc.FixedGap(-3), ValueError, r"gap=-3"),
    (lambda: tc.FixedGap(2.5), ValueError, r"gap=2.5"),
    (lambda: tc.WarmupGap(warmup_steps=-1), ValueError, r"warmup_steps=-1.*>= 0"),
    (lambda: tc.WarmupGap(warmup_gap=0), ValueError, r"warmup_gap=0"),
    (lambda: tc.GrowingGap(factor=0.5), ValueError, r"factor=0.5.*>= 1"),
    (lambda: tc.GrowingGap(factor="2"), TypeError, r"factor must be a number, got str '2'"),
    (lambda: tc.GrowingGap(gap=10, max_gap=5), ValueError, r"max_gap=5.*>= 10"),
    (lambda: tc.AdaptiveGap(overlap_threshold=1.5), ValueError, r"overlap_threshold=1.5.*\[0, 1\]"),
    (lambda: tc.AdaptiveGap(overlap_threshold=-0.1), ValueError, r"overlap_threshold=-0.1"),
    (lambda: tc.AdaptiveGap(overlap_threshold=float("nan")), ValueError, r"overlap_threshold=nan"),
    (lambda: tc.AdaptiveGap(overlap_threshold="0.4"), TypeError,
     r"overlap_threshold must be a number, got str '0.4'"),
    (lambda: tc.AdaptiveGap(energy_threshold=2), ValueError, r"energy_threshold=2.*\[0, 1\]"),
    (lambda: tc.AdaptiveGap(energy_threshold=True), TypeError, r"energy_threshold.*got bool"),
    (lambda: tc.AdaptiveGap(factor=True), TypeError, r"factor must be a number, got bool"),
    (lambda: tc.AdaptiveGap(factor=float("inf")), ValueError, r"factor=inf.*finite"),
    (lambda: tc.AdaptiveGap(gap=10, min_gap=20), ValueError, r"min_gap=20.*exceeds gap=10"),
    (lambda: tc.AdaptiveGap(min_gap=0), ValueError, r"min_gap=0"),
    (lambda: tc.AdaptiveGap(gap=10, max_gap=4), ValueError, r"max_gap=4.*>= 10"),
    (lambda: tc.AdaptiveGap(check_every=0), ValueError, r"check_every=0"),
])
def test_schedule_arguments(make: Callable[[], Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(("spec", "exc", "match"), [
    ("adaptve", ValueError, r"kind='adaptve'\. Did you mean 'adaptive'\?"),
    ({"kind": "fixd", "gap": 3}, ValueError, r"Did you mean 'fixed'"),
    ({"kind": 3}, ValueError, r"Unknown schedule kind=3"),
    ({"kind": "fixed", "gapp": 3}, ValueError, r"field 'gapp'.*Did you mean 'gap'"),
    ({"kind": "adaptive", "threshold": 0.4}, ValueError, r"field 'threshold'.*AdaptiveGap"),
    ("10", ValueError, r"schedule='10' is a string: pass the gap as an int \(10\)"),
    (-5, ValueError, r"gap=-5"),
    (0, ValueError, r"gap=0"),
    (2.5, TypeError, r"schedule=2.5: pass a schedule object"),
    (True, TypeError, r"schedule=True"),
])
def test_make_schedule_rejects(spec: Any, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        tc.make_schedule(spec)


# -- callback constructors ------------------------------------------------------------------
@pytest.mark.parametrize(("make", "exc", "match"), [
    (lambda: tc.SubspaceRefreshCallback(10, stagger="no"), TypeError,
     r"stagger must be True or False, got str 'no'"),
    (lambda: tc.SubspaceRefreshCallback("fixd"), ValueError, r"Did you mean 'fixed'"),
    (lambda: tc.OptimizerMemoryCallback(every=0), ValueError, r"every=0.*integer >= 1"),
    (lambda: tc.OptimizerMemoryCallback(every=-1), ValueError, r"every=-1"),
    (lambda: tc.OptimizerMemoryCallback(every="5"), ValueError, r"every='5'"),
    (lambda: tc.OptimizerMemoryCallback(every=2.0), ValueError, r"every=2.0"),
    (lambda: tc.OptimizerMemoryCallback(print_table="yes"), TypeError,
     r"print_table must be True or False"),
    (lambda: tc.SubspaceStatsCallback(every=0), ValueError, r"every=0"),
    (lambda: tc.SubspaceStatsCallback(prefix=3), TypeError, r"prefix must be a string"),
    (lambda: tc.OptimizerMemoryCallback().bind(tiny_llama()), TypeError,
     r"bind\(\) takes the transformers.Trainer"),
])
def test_callback_arguments(make: Callable[[], Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        make()


# -- LowRankOptimizerFactory ----------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(name="galore_adamx", lr=1e-3), ValueError,
     r"Unknown optimizer name='galore_adamx'\. Did you mean 'galore_adamw'"),
    (dict(name=3, lr=1e-3), TypeError, r"name must be an optimizer name.*got int 3"),
    (dict(name="galore_adamw", rank=8), ValueError, r"needs lr in its kwargs"),
    (dict(name="dct_adamw", rank=8, lr=1e-3, lrr=1), ValueError,
     r"takes no argument 'lrr'\. Did you mean 'lr'"),
    (dict(name="galore_adamw", rank=8, lr=1e-3, refresh=10), ValueError,
     r"refresh= is an argument of trainer_callbacks.attach\(\)"),
    (dict(name="galore_adamw", rank=8, lr=1e-3, layerwise=True), ValueError,
     r"layerwise= is an argument"),
    (dict(name="sst_adamw", rank=8, lr=1e-3, iteration_lenght=4), ValueError,
     r"'iteration_lenght'\. Did you mean 'iteration_length'"),
])
def test_factory_rejects(kwargs: dict[str, Any], exc: type, match: str) -> None:
    model = tiny_llama()
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(exc, match=match):
        tc.LowRankOptimizerFactory()(model, **kwargs)
    assert [type(m) for m in model.modules()] == kinds  # SST converted nothing


def test_factory_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match="LowRankOptimizerFactory needs the torch.nn.Module"):
        tc.LowRankOptimizerFactory()(None, name="galore_adamw", lr=1e-3)


@pytest.mark.parametrize("name", ["galore_adafactor", "dct_adafactor"])
def test_factory_adafactor_as_the_trainer_builds_it(name) -> None:
    """With an lr: relative_step=False, scale_parameter=False (the Trainer's own
    optim="galore_adafactor"); relative_step=True: Adafactor's own step size, no lr; neither:
    an error naming both ways."""
    opt = tc.LowRankOptimizerFactory()(tiny_llama(), name=name, rank=8, lr=1e-2)
    group = opt.param_groups[0]
    assert (group["lr"], group["relative_step"], group["scale_parameter"]) == (1e-2, False, False)
    opt = tc.LowRankOptimizerFactory()(tiny_llama(), name=name, rank=8, relative_step=True)
    assert opt.param_groups[0]["lr"] is None and opt.param_groups[0]["relative_step"] is True
    opt = tc.LowRankOptimizerFactory()(tiny_llama(), name=name, rank=8, lr=1e-2,
                                       scale_parameter=True)
    assert opt.param_groups[0]["scale_parameter"] is True  # what is given is kept
    with pytest.raises(ValueError, match=r"needs lr in its kwargs.*'relative_step': True"):
        tc.LowRankOptimizerFactory()(tiny_llama(), name=name, rank=8)


# -- lowrank_trainer_kwargs -----------------------------------------------------------------
@pytest.mark.parametrize(("name", "kwargs", "exc", "match"), [
    ("dct_adamx", {}, ValueError, r"Did you mean 'dct_adamw'"),
    (None, {}, TypeError, r"name must be an optimizer name"),
    ("galore_adamw", dict(memory="no"), TypeError, r"memory must be True or False"),
    ("galore_adamw", dict(stats=1), TypeError, r"stats must be True or False"),
    ("galore_adamw", dict(layerwise="yes"), TypeError, r"layerwise must be True or False"),
    ("galore_adamw", dict(args=object()), TypeError, r"args must be the transformers"),
    ("galore_adamw", dict(refresh=0), ValueError, r"gap=0"),
    ("galore_adamw", dict(refresh="adaptve"), ValueError, r"Did you mean 'adaptive'"),
    ("galore_adamw", dict(max_grad_norm=1.0), ValueError, r"without layerwise=True use "
     r"TrainingArguments\(max_grad_norm"),
    ("galore_adamw", dict(layerwise=True, max_grad_norm=-1), ValueError, r"max_grad_norm=-1"),
    ("galore_adamw", dict(layerwise=True, max_grad_norm="1"), TypeError,
     r"max_grad_norm must be a number, got str"),
    ("galore_adamw", dict(lrr=1e-3), ValueError, r"'lrr'\. Did you mean 'lr'"),
    ("adamw", dict(refresh=10), ValueError, r"'adamw' \(AdamW\) has no subspaces"),
    ("adamw", dict(stats=True), ValueError, r"stats=True.*'adamw' \(AdamW\) projects nothing"),
    ("adamw", dict(layerwise=True), ValueError, r"layerwise=True.*'adamw' \(AdamW\) cannot"),
    ("sst_adamw", dict(refresh=10), ValueError, r"SSTAdamW defines its own refresh.*"
     r"iteration_length"),
    ("sst_adamw", dict(layerwise=True), ValueError, r"'sst_adamw' \(SSTAdamW\) cannot"),
])
def test_lowrank_trainer_kwargs_rejects(name: Any, kwargs: dict[str, Any], exc: type,
                                        match: str) -> None:
    model = tiny_llama()
    kinds = [type(m) for m in model.modules()]
    rank = {} if name == "adamw" else {"rank": 8}
    with pytest.raises(exc, match=match):
        tc.lowrank_trainer_kwargs(model, name, **rank, **kwargs)
    assert [type(m) for m in model.modules()] == kinds


def test_lowrank_trainer_kwargs_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match="lowrank_trainer_kwargs needs the torch.nn.Module"):
        tc.lowrank_trainer_kwargs("model", "galore_adamw")


# -- attach -----------------------------------------------------------------------------------
def _trainer(tmp_path, *, optimizers: tuple = (None, None), callbacks: list | None = None,
             cls_and_kwargs: tuple | None = None, **args: Any) -> Trainer:
    args.setdefault("max_grad_norm", 0)
    return Trainer(model=tiny_llama(), args=training_args(tmp_path, **args),
                   train_dataset=dataset(4), optimizers=optimizers, callbacks=callbacks,
                   optimizer_cls_and_kwargs=cls_and_kwargs)


def _with_optimizer(tmp_path, name: str = "galore_adamw", **args: Any) -> Trainer:
    model = tiny_llama()
    opt = lo.create_optimizer(model, name, **({} if name == "adamw" else {"rank": 8}))
    return Trainer(model=model, args=training_args(tmp_path, max_grad_norm=0, **args),
                   train_dataset=dataset(4), optimizers=(opt, None))


def _attached_twice(tmp_path) -> Trainer:
    trainer = _trainer(tmp_path)
    tc.attach(trainer, "galore_adamw", rank=8, memory=False)
    return trainer


def _after_create_optimizer(tmp_path) -> Trainer:
    trainer = _trainer(tmp_path)
    trainer.create_optimizer()
    return trainer


def _after_train(tmp_path) -> Trainer:
    trainer = _with_optimizer(tmp_path, max_steps=1)
    trainer.train()
    return trainer


def _layerwise_already(tmp_path) -> Trainer:
    model = tiny_llama()
    lw = LayerwiseOptimizer(lo.create_optimizer(model, "galore_adamw", rank=8))
    return Trainer(model=model, args=training_args(tmp_path, max_grad_norm=0),
                   train_dataset=dataset(4), optimizers=(lw, None))


ATTACH_CASES: list[tuple[str, Callable, tuple, dict[str, Any], type, str]] = [
    # (id, trainer builder, positional args after trainer, keywords, exception, regex)
    ("typo", _trainer, ("galore_adamx",), dict(rank=8), ValueError,
     r"Unknown optimizer name='galore_adamx'\. Did you mean 'galore_adamw'"),
    ("name-type", _trainer, (8,), {}, TypeError, r"name must be an optimizer name.*int 8"),
    ("memory-str", _trainer, ("galore_adamw",), dict(rank=8, memory="no"), TypeError,
     r"memory must be True or False, got str 'no'"),
    ("unknown-kwarg", _trainer, ("galore_adamw",), dict(rank=8, update_proj_gapp=2), ValueError,
     r"'update_proj_gapp'\. Did you mean 'update_proj_gap'"),
    ("twice", _attached_twice, ("galore_adamw",), dict(rank=8), ValueError,
     r"attach\(\) was already called on this Trainer"),
    ("callback-present", lambda p: _trainer(p, callbacks=[tc.OptimizerMemoryCallback()]),
     ("galore_adamw",), dict(rank=8), ValueError,
     r"already has a OptimizerMemoryCallback.*memory=False"),
    ("has-optimizer", _with_optimizer, ("dct_adamw",), dict(rank=8), ValueError,
     r"would replace the optimizer the Trainer already has \(GaLoreAdamW"),
    ("created-optimizer", _after_create_optimizer, ("galore_adamw",), dict(rank=8), ValueError,
     r"would replace the optimizer the Trainer already has \(AdamW"),
    ("cls-and-kwargs", lambda p: _trainer(p, cls_and_kwargs=(
        tc.LowRankOptimizerFactory, {"name": "dct_adamw", "rank": 8, "lr": 1e-3})),
     ("galore_adamw",), dict(rank=8), ValueError, r"conflicts with.*optimizer_cls_and_kwargs"),
    ("hf-galore", lambda p: _trainer(p, optim_target_modules=["attn"]), ("galore_adamw",),
     dict(rank=8), ValueError, r"conflicts with TrainingArguments\(optim_target_modules"),
    ("layerwise-global-clip", lambda p: _trainer(p, max_grad_norm=1.0), ("galore_adamw",),
     dict(rank=8, layerwise=True), ValueError,
     r"max_grad_norm=1.0.*TrainingArguments\(max_grad_norm=0\).*max_grad_norm=\.\.\."),
    ("clip-without-layerwise", _trainer, ("galore_adamw",), dict(rank=8, max_grad_norm=1.0),
     ValueError, r"without layerwise=True use TrainingArguments\(max_grad_norm"),
    ("clip-without-name", _with_optimizer, (), dict(max_grad_norm=1.0), ValueError,
     r"per-parameter clipping of layer-wise mode"),
    ("clip-zero", _trainer, ("galore_adamw",), dict(rank=8, layerwise=True,
                                                        max_grad_norm=0), ValueError,
     r"max_grad_norm=0: must be a finite number > 0"),
    ("layerwise-sst", _trainer, ("sst_adamw",), dict(rank=8, layerwise=True), ValueError,
     r"'sst_adamw' \(SSTAdamW\) cannot"),
    ("layerwise-error-feedback", lambda p: _trainer(p, gradient_accumulation_steps=2),
     ("dct_adamw",), dict(rank=8, layerwise=True, error_feedback=True), ValueError,
     r"error_feedback"),
    ("refresh-adamw", _trainer, ("adamw",), dict(refresh=10), ValueError,
     r"'adamw' \(AdamW\) has no subspaces"),
    ("refresh-sst", _trainer, ("sst_adamw",), dict(rank=8, refresh=tc.FixedGap(4)), ValueError,
     r"iteration_length"),
    ("refresh-typo", _trainer, ("galore_adamw",), dict(rank=8, refresh="adaptve"), ValueError,
     r"Did you mean 'adaptive'"),
    ("stats-adamw", _trainer, ("adamw",), dict(stats=True), ValueError, r"projects nothing"),
    ("kwargs-without-name", _trainer, (), dict(rank=8), ValueError,
     r"Optimizer arguments \['rank'\] need a name"),
    ("refresh-trainer-adamw", _trainer, (), dict(refresh=10), ValueError,
     r"the optimizer the Trainer builds \(optim='adamw_torch"),
    ("refresh-existing-adamw", lambda p: _with_optimizer(p, "adamw"), (), dict(refresh=10),
     ValueError, r"the Trainer's optimizer \(AdamW\) has no subspaces"),
    ("stats-existing-adamw", lambda p: _with_optimizer(p, "adamw"), (), dict(stats=True),
     ValueError, r"projects nothing"),
    ("layerwise-existing-adamw", lambda p: _with_optimizer(p, "adamw"), (),
     dict(layerwise=True), ValueError, r"layerwise=True.*\(AdamW\) cannot"),
    ("layerwise-no-optimizer", _trainer, (), dict(layerwise=True), ValueError,
     r"layerwise=True\) needs an optimizer name"),
    ("layerwise-already", _layerwise_already, (), dict(layerwise=True, max_grad_norm=1.0),
     ValueError, r"already a LayerwiseOptimizer: set its max_grad_norm there"),
    ("layerwise-after-train", _after_train, (), dict(layerwise=True), ValueError,
     r"wrapped \(AcceleratedOptimizer\), as after train\(\); call attach\(\) before"),
    ("factory-typo", lambda p: _trainer(p, cls_and_kwargs=(
        tc.LowRankOptimizerFactory, {"name": "dct_adamx", "rank": 8, "lr": 1e-3})), (),
     dict(refresh=10), ValueError, r"Did you mean 'dct_adamw'"),
    ("factory-no-lr", lambda p: _trainer(p, cls_and_kwargs=(
        tc.LowRankOptimizerFactory, {"name": "dct_adamw", "rank": 8})), (), {}, ValueError,
     r"needs lr in its kwargs"),
    ("factory-sst-refresh", lambda p: _trainer(p, cls_and_kwargs=(
        tc.LowRankOptimizerFactory, {"name": "sst_adamw", "rank": 8, "lr": 1e-3})), (),
     dict(refresh=4), ValueError, r"iteration_length"),
]


@pytest.mark.parametrize(("build", "args", "kwargs", "exc", "match"),
                         [c[1:] for c in ATTACH_CASES], ids=[c[0] for c in ATTACH_CASES])
def test_attach_rejects_before_changing_anything(tmp_path, build: Callable, args: tuple,
                                                 kwargs: dict[str, Any], exc: type,
                                                 match: str) -> None:
    trainer = build(tmp_path)
    optimizer, callbacks = trainer.optimizer, list(trainer.callback_handler.callbacks)
    modules = [type(m) for m in trainer.model.modules()]
    with pytest.raises(exc, match=match):
        tc.attach(trainer, *args, **kwargs)
    assert trainer.optimizer is optimizer
    assert trainer.callback_handler.callbacks == callbacks
    assert [type(m) for m in trainer.model.modules()] == modules


@pytest.mark.parametrize("not_a_trainer", [tiny_llama(), "trainer", None],
                         ids=["model", "str", "none"])
def test_attach_needs_a_trainer(not_a_trainer: Any) -> None:
    hint = "lowrank_trainer_kwargs" if isinstance(not_a_trainer, torch.nn.Module) else ""
    with pytest.raises(TypeError, match=rf"attach\(\) takes a transformers.Trainer.*{hint}"):
        tc.attach(not_a_trainer, "galore_adamw", rank=8)


def test_valid_attach_passes_every_check(tmp_path, caplog) -> None:
    """The control for the table: the same trainers with consistent settings attach."""
    trainer = _trainer(tmp_path, gradient_accumulation_steps=2)
    with caplog.at_level(logging.WARNING, logger="lowrank_optim"):
        callbacks = tc.attach(trainer, "galore_adamw", rank=8, update_proj_gap=4, stats=True,
                              refresh=tc.FixedGap(4), layerwise=True, max_grad_norm=1.0)
    assert "ignored" not in caplog.text  # equal gaps: nothing to warn about
    assert isinstance(trainer.optimizer, LayerwiseOptimizer)
    assert trainer.optimizer.gradient_accumulation_steps == 2  # checked at attach, not later
    assert [type(c).__name__ for c in callbacks] == [
        "SubspaceRefreshCallback", "OptimizerMemoryCallback", "SubspaceStatsCallback",
        "LayerwiseCallback"]
    factory = _trainer(tmp_path, cls_and_kwargs=(
        tc.LowRankOptimizerFactory, {"name": "dct_adamw", "rank": 8, "lr": 1e-3}))
    tc.attach(factory, refresh=4, stats=True)


def test_update_proj_gap_overridden_by_a_schedule_warns(tmp_path, caplog) -> None:
    trainer = _trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lowrank_optim"):
        tc.attach(trainer, "galore_adamw", rank=8, update_proj_gap=50, refresh=tc.FixedGap(200))
    assert "update_proj_gap=50 is ignored: refresh=FixedGap(gap=200)" in caplog.text
