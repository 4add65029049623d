"""Layer-wise updates: each parameter steps inside its post-accumulate-grad hook.

The full gradient of a parameter then lives only from the moment backward finishes it until its
own step, instead of until every gradient of the model exists: peak memory drops by about the
size of all gradients but the largest few.  :class:`LayerwiseOptimizer` wraps a
:class:`~lowrank_optim.LowRankOptimizer` and adds what the Hugging Face Trainer's
``*_layerwise`` options lack:

* **Gradient accumulation.**  A projected parameter keeps a *low-rank* accumulator in its
  optimizer state (key :data:`ACCUMULATOR_KEY`, memory category "other"): each micro-batch's
  gradient is projected into the current subspace and freed, the step on the last micro-batch
  uses the summed low-rank gradient.  Projection is linear, so this equals projecting the
  summed full gradient (to rounding).  In a window where the subspace refreshes (the first
  step, a requested refresh, every ``update_proj_gap`` steps) the new subspace is computed
  from the full gradient, so that window accumulates full gradients in ``param.grad``;
  unprojected parameters always do, and so does every parameter of a rule that steps with the
  full gradient (:attr:`Rule.full_gradient`: APOLLO, Fira).
* **Learning-rate schedules.**  ``param_groups`` *is* the wrapped optimizer's list, so an LR
  scheduler built on the wrapper (``transformers.get_scheduler``, ``torch.optim.lr_scheduler``)
  drives the real learning rates, and the Trainer logs them correctly.
* **Clipping that applies.**  Clipping by the global norm needs every gradient before the
  first step, which this mode never holds (that is where its memory saving comes from), so it
  cannot work here without a second backward pass; ``max_grad_norm`` clips each parameter's
  gradient (the low-rank one for accumulated projected parameters) by its own norm instead.
  :class:`trainer_callbacks.LayerwiseCallback` rejects ``TrainingArguments.max_grad_norm > 0``
  with that explanation rather than let the Trainer clip gradients that no longer exist.

* **Data parallelism.**  Under DDP, :meth:`LayerwiseOptimizer.attach_ddp` moves the steps
  into DDP's communication hook: a parameter steps once its bucket is all-reduced (equal to
  the regular DDP step bit for bit without accumulation), micro-batches under
  ``ddp.no_sync()`` accumulate locally (low-rank where the window allows; the accumulators are
  averaged over the ranks with the window's last, synchronised micro-batch), and ``param.grad``
  is freed after each step; DDP's own buckets (one copy of every gradient) stay.  Under FSDP2
  (parameters sharded by ``fully_shard`` before the optimizer is built) torch runs the
  post-accumulate-grad hooks of the sharded parameters after each reduce-scatter, so each shard
  steps on its reduced gradient (equal to the regular FSDP2 step; sharded gradients accumulate
  in full, they are already 1/N), with norms and the non-finite check taken over all ranks.  A
  multi-process run that is neither raises at the first backward instead of stepping on one
  rank's gradient (:mod:`lowrank_optim.distributed.layerwise`).

Call :meth:`LayerwiseOptimizer.step` once per optimizer step, as with any optimizer (the
Trainer does): the parameters have already stepped in their hooks, so it only steps the ones
left with a partial window (an epoch that ends mid-accumulation), and it checks that the
accumulation length matches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from lowrank_optim import distributed
from lowrank_optim.core import refresh_due
from lowrank_optim.distributed import layerwise as dist_layerwise
from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.validation import check_int_at_least, check_positive, param_label

#: optimizer-state key of the low-rank gradient accumulator (present only mid-window)
ACCUMULATOR_KEY = "layerwise_grad_accum"


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Per-parameter optimizer steps in ``register_post_accumulate_grad_hook`` hooks.

    Parameters
    ----------
    optimizer
        The :class:`~lowrank_optim.LowRankOptimizer` whose :meth:`step_param` does the work.
        Its ``param_groups`` and ``state`` are shared, not copied.
    gradient_accumulation_steps
        Micro-batches per optimizer step; a parameter steps in the hook of its last one.
        :class:`trainer_callbacks.LayerwiseCallback` sets it from ``TrainingArguments``.
    max_grad_norm
        Clip each parameter's gradient to this l2 norm before its step (``None``: no
        clipping).  Per-parameter, not global: see the module notes.

    Notes
    -----
    :attr:`last_grad_norm` is the l2 norm, before clipping, of all the gradients the previous
    step used (the Trainer's own ``grad_norm`` reads freed gradients in layer-wise mode and
    shows 0; :class:`trainer_callbacks.LayerwiseCallback` logs this one instead).  With
    low-rank accumulation (``gradient_accumulation_steps > 1`` on projected parameters) those
    parameters contribute the norm of their accumulated low-rank gradient, which is what they
    step on.

    The non-finite check follows the wrapped optimizer's ``nonfinite`` setting per parameter:
    ``"raise"`` raises before that parameter changes (parameters stepped earlier in the same
    backward pass have been updated already), ``"skip"`` skips that parameter's step with a
    warning, ``"ignore"`` does no check.  Each check costs one host sync per parameter.

    Examples
    --------
    >>> lw = LayerwiseOptimizer(create_optimizer(model, "galore_adamw", rank=128))
    >>> for ids in batches:
    ...     model(input_ids=ids, labels=ids).loss.backward()  # parameters step in here
    ...     lw.step()  # no-op unless a window was left partial
    """

    def __init__(
        self,
        optimizer: LowRankOptimizer,
        *,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(optimizer, LowRankOptimizer):
            raise TypeError(
                f"LayerwiseOptimizer wraps a lowrank_optim.LowRankOptimizer, got "
                f"{type(optimizer).__name__}; build one with lowrank_optim.create_optimizer."
            )
        if not optimizer.projector_type.layerwise:
            raise ValueError(
                f"{type(optimizer).__name__}'s parameters are not independent within a step "
                f"(its projector {optimizer.projector_type.__name__} is not layer-wise capable: "
                "SSTAdamW advances a layer's schedule and may re-decompose U, S, V after V's "
                "step, which must not happen in the middle of a backward pass). Use it with a "
                "regular optimizer.step()."
            )
        # torch.optim.Optimizer's bookkeeping (hooks, step patching) on a placeholder group;
        # from then on param_groups, state and defaults are the wrapped optimizer's
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self.optimizer = optimizer
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        #: param -> (group index, index in group): groups are looked up at each step, since
        #: ``load_state_dict`` replaces the group dicts (accelerate's prepare() does one)
        self._where: dict[torch.Tensor, tuple[int, int]] = {}
        self._projected: set[int] = set()
        self._lowrank_window: dict[torch.Tensor, bool] = {}
        self._pending: dict[torch.Tensor, int] = {}  # micro-batches in the open window
        self._seen: dict[torch.Tensor, int] = {}  # hook calls since the last step()
        self._handles: list[Any] = []
        self._ddp: Any = None  # the DDP module whose buckets step the parameters (attach_ddp)
        self._ddp_sync = True  # whether DDP's last forward will all-reduce in its backward
        #: params whose accumulated gradient holds this rank's unreduced part (DDP no_sync)
        self._local: set[torch.Tensor] = set()
        self._sq_norm: torch.Tensor | None = None  # sum of squared norms of this step's grads
        #: l2 norm (before clipping) of every gradient used by the previous step; a 0-d fp32
        #: tensor (read it with ``float()``, one host sync), ``None`` before the first step
        self.last_grad_norm: torch.Tensor | None = None
        self._register(optimizer.param_groups)

    # -- shared with the wrapped optimizer ----------------------------------------------------
    def _shared(name: str) -> property:  # run once, at class creation
        def get(self):
            inner = self.__dict__.get("optimizer")
            return getattr(inner, name) if inner is not None else self.__dict__[f"_own_{name}"]

        def set_(self, value):
            inner = self.__dict__.get("optimizer")
            if inner is not None:
                setattr(inner, name, value)
            else:
                self.__dict__[f"_own_{name}"] = value

        return property(get, set_, doc=f"The wrapped optimizer's ``{name}`` (shared).")

    param_groups = _shared("param_groups")
    state = _shared("state")
    defaults = _shared("defaults")
    reproject_on_load = _shared("reproject_on_load")
    del _shared

    def state_categories(self) -> dict[str, str]:
        """The wrapped optimizer's :meth:`LowRankOptimizer.state_categories`."""
        return self.optimizer.state_categories()

    # -- settings ---------------------------------------------------------------------------
    @property
    def gradient_accumulation_steps(self) -> int:
        return self._accumulation

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, value: int) -> None:
        check_int_at_least("gradient_accumulation_steps", value, 1)
        if value > 1:
            for group in self.optimizer.param_groups:
                if group.get("rank") is not None and group.get("error_feedback"):
                    raise ValueError(
                        "error_feedback needs the full accumulated gradient of each step, but "
                        "layer-wise gradient accumulation keeps only its low-rank part; use "
                        "gradient_accumulation_steps=1 or error_feedback=False."
                    )
        self._accumulation = value

    @property
    def max_grad_norm(self) -> float | None:
        return self._max_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        if value is not None:
            check_positive("max_grad_norm", value)
        self._max_norm = value

    # -- hooks ------------------------------------------------------------------------------
    def _register(self, groups: list[dict]) -> None:
        self._projected |= {id(p) for _, p, _ in self.optimizer.projected_params()}
        first = len(self.optimizer.param_groups) - len(groups)
        for g, group in enumerate(groups, start=first):
            for i, p in enumerate(group["params"]):
                if p.requires_grad and p not in self._where:
                    self._where[p] = (g, i)
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _group(self, param: torch.Tensor) -> tuple[dict, int]:
        g, i = self._where[param]
        return self.optimizer.param_groups[g], i

    def remove_hooks(self) -> None:
        """Detach from the parameters (the wrapped optimizer can then step normally)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._where.clear()

    def _accumulates_lowrank(self, param: torch.Tensor, group: dict) -> bool:
        """At a window's first micro-batch: accumulate the projected gradient, unless the
        parameter is unprojected or its subspace is due for a refresh in this window."""
        if (self._accumulation == 1 or id(param) not in self._projected
                or self.optimizer.rule.full_gradient  # APOLLO / Fira need each full gradient
                or distributed.is_dtensor(param)):  # FSDP2 accumulates the sharded gradient
            return False
        state = self.optimizer.state[param]
        step = int(state["step"]) if "step" in state else 0
        # refresh_due pops a pending request: ask it on a copy of the state
        return not refresh_due(self.optimizer.projector, dict(state), group, step)

    @torch.no_grad()
    def _hook(self, param: torch.Tensor) -> None:
        if param.grad is None or param not in self._where:
            return
        if (self._ddp is None and not distributed.is_dtensor(param)
                and dist_layerwise.multi_process()):
            raise RuntimeError(
                f"{self._label(param)}: layer-wise step on this rank's own gradient in a "
                "multi-process run. Wrap the model in DistributedDataParallel and call "
                "LayerwiseOptimizer.attach_ddp(ddp) before the first backward (the parameters "
                "then step once DDP has all-reduced them), or shard it with FSDP2's fully_shard "
                "before building the optimizer.")
        group, index = self._group(param)
        count = self._pending.get(param, 0) + 1
        self._pending[param] = count
        self._seen[param] = self._seen.get(param, 0) + 1
        if count == 1:
            self._lowrank_window[param] = self._accumulates_lowrank(param, group)
        if self._ddp is not None:
            if self._ddp_sync:  # DDP reduces this gradient: its bucket's hook steps it
                return
            self._local.add(param)  # no_sync: accumulate this rank's part
        if self._lowrank_window[param]:
            self._accumulate(param, param.grad, group)
            param.grad = None  # the full gradient of this micro-batch is not kept
        if self._ddp is None and count >= self._accumulation:
            self._step(param, group, index)

    def _accumulate(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        projector, state = self.optimizer.projector, self.optimizer.state[param]
        low = projector.project(grad, projector.subspace(state), group)
        acc = state.get(ACCUMULATOR_KEY)
        state[ACCUMULATOR_KEY] = low.clone() if acc is None else acc.add_(low)

    def _label(self, param: torch.Tensor) -> str:
        group, index = self._group(param)
        return param_label(group, index, param)

    # -- DDP ----------------------------------------------------------------------------------
    def attach_ddp(self, ddp: torch.nn.Module) -> LayerwiseOptimizer:
        """Step each parameter once DDP has all-reduced its gradient bucket.

        Installs a DDP communication hook (torch's default all-reduce, then the steps of the
        bucket's parameters; see :mod:`lowrank_optim.distributed.layerwise`).  Call it once,
        before the first backward, with the ``DistributedDataParallel`` module whose
        parameters this optimizer holds (built with ``find_unused_parameters=False``).
        Micro-batches under ``ddp.no_sync()`` accumulate this rank's gradient (projected
        into the low-rank accumulator where the window allows); the all-reduced micro-batch
        ends the window: accumulators are averaged over the ranks in one all-reduce per
        bucket and every parameter steps.  Returns ``self``.
        """
        if self._ddp is not None:
            raise RuntimeError("attach_ddp was already called for this LayerwiseOptimizer")
        dist_layerwise.check_ddp(ddp, list(self._where), self._label)
        dist_layerwise.register_bucket_step(ddp, self._bucket_step)

        def record_sync(module: torch.nn.Module, args: Any) -> None:
            self._ddp_sync = bool(module.require_backward_grad_sync and torch.is_grad_enabled())

        self._handles.append(ddp.register_forward_pre_hook(record_sync))
        self._ddp = ddp
        return self

    def _bucket_step(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """DDP's comm hook, on a reduced bucket: average the accumulators, then step."""
        mine = [(p, g) for p, g in zip(params, grads, strict=True) if p in self._pending]
        local = [self.optimizer.state[p][ACCUMULATOR_KEY] for p, _ in mine
                 if p in self._local and ACCUMULATOR_KEY in self.optimizer.state[p]]
        dist_layerwise.all_reduce_mean_(local, self._ddp.process_group)
        for param, grad in mine:
            self._local.discard(param)
            group, index = self._group(param)
            if self._lowrank_window[param]:
                self._accumulate(param, grad, group)
                param.grad = None
            if self._pending[param] >= self._accumulation:
                self._step(param, group, index, None if self._lowrank_window[param] else grad)
            elif not self._lowrank_window[param]:  # reduced each micro-batch: keep the sum
                param.grad = grad.clone()

    def _step(self, param: torch.Tensor, group: dict, index: int,
              full: torch.Tensor | None = None) -> None:
        state = self.optimizer.state[param]
        low = state.pop(ACCUMULATOR_KEY, None)
        grad = low if low is not None else param.grad if full is None else full
        self._pending.pop(param, None)
        self._lowrank_window.pop(param, None)
        if grad is None:
            return
        if self.optimizer.nonfinite != "ignore" and not self._finite(grad, group, index, param):
            param.grad = None
            return
        sq = dist_layerwise.global_sq_norm(grad)  # a shard's: summed over the ranks
        norm = sq.sqrt()
        self._sq_norm = sq if self._sq_norm is None else self._sq_norm.add_(
            sq.to(self._sq_norm.device))
        if self._max_norm is not None:
            distributed.local_tensor(grad).mul_(
                (self._max_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype))
        self.optimizer.step_param(param, group, index, grad, projected=low is not None)
        param.grad = None  # freed right after its step

    def _finite(self, grad: torch.Tensor, group: dict, index: int, param: torch.Tensor) -> bool:
        finite = bool(distributed.local_tensor(grad).sum(dtype=torch.float32).isfinite())
        if distributed.all_ranks_true(finite, [grad]):  # a shard's verdict: every rank's
            return True
        label = param_label(group, index, param)
        if self.optimizer.nonfinite == "raise":
            raise RuntimeError(
                f"non-finite (NaN/Inf) gradient in {label}; in layer-wise mode parameters "
                "stepped earlier in this backward pass were already updated, this one and the "
                "following were not. Lower the learning rate, clip (max_grad_norm=...), or "
                "pass nonfinite='skip' to the optimizer to skip such parameters."
            )
        warnings.warn(f"Skipping the layer-wise step of {label}: non-finite gradient.",
                      RuntimeWarning, stacklevel=2)
        self.optimizer.skipped_steps += 1
        return False

    # -- torch.optim.Optimizer API ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """End the optimizer step: step parameters left with a partial accumulation window.

        Raises ``RuntimeError`` if more backward passes than ``gradient_accumulation_steps``
        reached a parameter since the previous call (the accumulation settings disagree).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        seen = max(self._seen.values(), default=0)
        self._seen.clear()
        if self._local:
            names = ", ".join(self._label(p) for p in list(self._local)[:3])
            self.zero_grad()
            raise RuntimeError(
                f"step() after a backward under ddp.no_sync(): the gradients of {names} ... "
                "were never all-reduced, so stepping them would desynchronise the replicas "
                "(the window was dropped). Run the last micro-batch of each optimizer step "
                "outside no_sync().")
        if seen > self._accumulation:
            raise RuntimeError(
                f"{seen} backward passes reached the parameters between two step() calls but "
                f"gradient_accumulation_steps={self._accumulation}, so each window stepped "
                "early. Pass the training loop's accumulation length to LayerwiseOptimizer "
                "(in a Trainer, trainer_callbacks.LayerwiseCallback sets it from the arguments)."
            )
        for param in list(self._pending):
            self._step(param, *self._group(param))
        if self._sq_norm is not None:
            self.last_grad_norm, self._sq_norm = self._sq_norm.sqrt(), None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop gradients, including low-rank accumulators of an unfinished window."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for param in self._pending:
            self.optimizer.state[param].pop(ACCUMULATOR_KEY, None)
        self._pending.clear()
        self._lowrank_window.clear()
        self._local.clear()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # torch.optim.Optimizer.__init__'s placeholder
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._register(self.optimizer.param_groups[-1:])

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any], **kwargs: Any) -> None:
        """The wrapped optimizer's load (``reproject=True`` passes through)."""
        self.optimizer.load_state_dict(state_dict, **kwargs)
