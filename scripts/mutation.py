"""Mutation testing of the library's core: do the tests catch plausible one-line bugs?

A table of hand-written, named mutants (file, exact source snippet, replacement), each with
the targeted pytest selection that should catch it.  For every mutant the script applies it to
a private copy of the repository (never to the working tree: someone else may be editing it),
runs the selection there and records *killed* (some test failed, errored or timed out) or
*survived*.  Surviving mutants must be explained as equivalent (``equivalent=...``: no
behaviour the library promises can tell them from the original) or be killed by a new test.

    python scripts/mutation.py              # the whole sweep (about 15 minutes on 2 cores)
    python scripts/mutation.py --list       # the mutants, one line each
    python scripts/mutation.py --only NAME [--only NAME ...]   # re-run some (comma lists too)

Results accumulate in ``benchmarks/results/mutation.json`` (one entry per mutant, the latest
run of each) and are written as ``benchmarks/results/mutation.md``: the score and one row per
mutant with the tests that killed it.  Every snippet must occur exactly once in its file;
the script stops before running anything if one moved.  Not part of CI (``scripts/test.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: what the private copy holds (the tests import the package, its tests and nothing else)
COPIED = ("lowrank_optim", "tests", "trainer_callbacks", "recipes", "benchmarks",
          "pyproject.toml", "setup.cfg")
TIMEOUT_S = 240


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    bug: str
    #: why no test can kill it (an equivalent mutant), or None
    equivalent: str | None = None
    #: one of the mutations of issue 20's table
    issue_table: bool = False


# -- test selections ------------------------------------------------------------------------------
NONFINITE = ("tests/test_nonfinite.py", "tests/test_step_inputs.py", "tests/test_validation.py")
LOWBIT = ("tests/test_lowbit_spec.py", "tests/test_quantization.py",
          "tests/test_quant_kernels.py")
OPT8 = ("tests/test_8bit_optim.py::test_first_step_equals_32bit_and_moments_within_bound",
        "tests/test_8bit_optim.py::test_dequantized_context_shows_fp32_moments_and_requantizes",
        "tests/test_8bit_optim.py::test_dct_rotation_reaches_quantized_moments",
        "tests/test_8bit_optim.py::test_positive_second_moments_never_store_as_zero",
        "tests/test_8bit_optim.py::test_8bit_step_within_the_stated_bound_of_the_32bit_step",
        "tests/test_8bit_optim.py::test_small_tensors_keep_32bit_state_and_formats_are_kept",
        "tests/test_8bit_optim.py::test_8bit_moment_bytes_are_exact_and_about_a_quarter")
PROFILE = ("tests/test_profile_formulas.py",
           "tests/test_profile.py::test_analytic_state_bytes_equal_measured_exactly_tiny",
           "tests/test_profile.py::test_galore_saves_state_against_adamw_at_7b")
ADAM = ("tests/test_galore_conformance.py::test_galore_adamw_matches_reference",
        "tests/test_galore_conformance.py::test_torch_formula_matches_torch_adamw_without_rank",
        "tests/test_step_options.py",
        "tests/test_dct_optim.py::test_dct_adamw_matches_independent_loop",
        "tests/test_kernels_dispatch.py::"
        "test_reference_adam_direction_is_the_step_of_independent_optimizers")
ADAFACTOR = ("tests/test_galore_conformance.py::test_galore_adafactor_matches_reference",
             "tests/test_dct_adafactor_reference.py")
DCT = ("tests/test_dct_optim.py", "tests/test_dct_projector.py",
       "tests/test_dct_adafactor_reference.py",
       "tests/test_lowbit_spec.py::test_dct_refresh_rotates_8bit_moments_by_the_specification",
       "tests/test_lowbit_spec.py::"
       "test_dct_refresh_rotates_adafactor_statistics_along_the_rank_axis")
RESUME = ("tests/test_resume.py", "tests/test_8bit_optim.py::test_8bit_resume_is_bit_exact")
SVD = ("tests/test_galore_conformance.py", "tests/test_callbacks.py")
SST = ("tests/test_sst_optim.py", "tests/test_sst_layers.py")
FSDP2 = ("tests/test_nonfinite.py::"
         "test_fsdp2_ranks_agree_on_nonfinite_shards_and_refuse_rotation_with_broadcast",
         "tests/test_recipe_engines.py::test_fsdp2_sharded_steps_equal_unsharded_steps_or_fail_fast")
LAYERWISE = ("tests/test_layerwise.py",)
MEMORY = ("tests/test_profile_formulas.py", "tests/test_groups_registry_memory.py",
          "tests/test_dct_optim.py::test_state_bytes_indices_instead_of_float_projectors",
          "tests/test_dct_optim.py::test_state_bytes_count_only_this_optimizers_bases")

APOLLO_FIRA = ("tests/test_apollo_fira.py",)

M = Mutant
MUTANTS: list[Mutant] = [
    # -- issue 20's table ------------------------------------------------------------------------
    M("nonfinite-ignores-1d", "lowrank_optim/optim/base.py",
      "grads = [(g, i, p) for g, i, p in grads if not p.grad.is_meta]",
      "grads = [(g, i, p) for g, i, p in grads if not p.grad.is_meta and p.grad.dim() > 1]",
      NONFINITE, "the non-finite gradient check ignores 1-D gradients", issue_table=True),
    M("profile-drops-fp32-logits", "lowrank_optim/profile.py",
      "logits = tokens * vocab * (el + upcast + 4)", "logits = tokens * vocab * el",
      PROFILE, "the activation estimate drops the fp32 logits (upcast and gradient)",
      issue_table=True),
    M("profile-fp32-logits-upcast", "lowrank_optim/profile.py",
      "upcast = 4 if el < 4 else 0", "upcast = 4",
      PROFILE, "fp32 logits counted with an fp32 upcast they never get (12 B, not 8)"),
    M("profile-swaps-projectors-indices", "lowrank_optim/profile.py",
      "projectors=sb.projectors,\n        indices=sb.indices,",
      "projectors=sb.indices,\n        indices=sb.projectors,",
      PROFILE, "the profiler swaps projector and index bytes", issue_table=True),
    M("8bit-v-dequantised-signed", "lowrank_optim/kernels/reference.py",
      "v_table = blockwise.table(code, False, grad.device)",
      "v_table = blockwise.table(code, True, grad.device)",
      (*LOWBIT, *OPT8), "8-bit Adam dequantises exp_avg_sq with the signed table",
      issue_table=True),
    M("dynamic-table-fewer-decades", "lowrank_optim/kernels/blockwise.py",
      "decades = bits - 1 if signed else bits", "decades = bits - 3 if signed else bits - 2",
      (*LOWBIT, *OPT8), "the dynamic 8-bit table covers 5-6 decades instead of 7-8",
      issue_table=True),
    M("rotation-skips-reduced-moments", "lowrank_optim/rules/base.py",
      "                if position is not None:\n"
      "                    value.copy_(fn(value, position))",
      "                if position is not None and m.reduced is None:\n"
      "                    value.copy_(fn(value, position))",
      DCT, "DCT rotation skips Adafactor's rank-axis statistic (moments that reduce an axis)",
      issue_table=True),
    M("load-keeps-torch-casts", "lowrank_optim/optim/base.py",
      "                if isinstance(value, torch.Tensor):\n"
      "                    self.state[param][key] = value.to(device=param.device)",
      "                if False:\n"
      "                    self.state[param][key] = value.to(device=param.device)",
      RESUME, "load_state_dict does not restore the saved dtypes (torch casts to the param's)",
      issue_table=True),
    # -- core step ---------------------------------------------------------------------------
    M("refresh-gap-off-by-one", "lowrank_optim/core.py",
      "return bool(gap) and step % gap == 0", "return bool(gap) and (step + 1) % gap == 0",
      (*SVD[:1], "tests/test_schedules.py"), "refreshes one step late"),
    M("refresh-request-ignored", "lowrank_optim/core.py",
      'if state.pop("refresh_requested", None) is not None:\n        return True',
      'if state.pop("refresh_requested", None) is not None:\n        return False',
      ("tests/test_schedules.py", "tests/test_callbacks.py", "tests/test_sst_optim.py"),
      "request_refresh() is dropped"),
    M("step-counted-after-rule", "lowrank_optim/core.py",
      "    update = rule.step(low, state, group, param, projection)\n",
      '    state["step"] -= 1\n    update = rule.step(low, state, group, param, projection)\n'
      '    state["step"] += 1\n',
      ADAM, "the step counter advances after the rule (bias correction with t = 0)"),
    M("scale-dropped", "lowrank_optim/core.py",
      "update.direction, update.alpha * scale,", "update.direction, update.alpha,",
      ADAM, "GaLore's scale is not applied"),
    M("decay-applied-twice", "lowrank_optim/rules/base.py",
      "return (self.decay, 0.0) if self.decay_first else (0.0, self.decay)",
      "return (self.decay, self.decay) if self.decay_first else (0.0, self.decay)",
      ADAM, "decoupled decay applied before and after the update"),
    M("fp16-steps-in-fp16", "lowrank_optim/core.py",
      "FP32_STEP_DTYPES = (torch.float16,)", "FP32_STEP_DTYPES = ()",
      ("tests/test_precision.py",), "fp16 parameters step in fp16 (squared gradients flush)"),
    M("projected-gradient-reprojected", "lowrank_optim/core.py",
      "if projector is not None and not projected:", "if projector is not None:",
      LAYERWISE, "layer-wise pre-projected gradients are projected again"),
    M("refresh-step-recorded-late", "lowrank_optim/core.py",
      'state["refresh_step"] = torch.tensor(step, dtype=torch.int64)',
      'state["refresh_step"] = torch.tensor(step + 1, dtype=torch.int64)',
      ("tests/test_schedules.py", "tests/test_callbacks.py"),
      "the step of the last refresh recorded one late (steps_since_refresh, schedules)"),
    # -- rules ---------------------------------------------------------------------------------
    M("adam-bias2-uses-beta1", "lowrank_optim/rules/adam.py",
      "return 1.0 - beta1**step, 1.0 - beta2**step",
      "return 1.0 - beta1**step, 1.0 - beta1**step",
      ADAM, "second-moment bias correction with beta1"),
    M("correct-bias-ignored", "lowrank_optim/rules/adam.py",
      'if not group["correct_bias"]:\n            return 1.0, 1.0',
      'if False:\n            return 1.0, 1.0',
      ADAM, "correct_bias=False still divides by 1 - beta1^t"),
    M("torch-formula-decay-after", "lowrank_optim/rules/adam.py",
      "-lr / bias1, decay=decay, decay_first=True)",
      "-lr / bias1, decay=decay, decay_first=False)",
      ADAM, "torch formula decays after the update"),
    M("torch-formula-no-bias1", "lowrank_optim/rules/adam.py",
      "return Update(direction, -lr / bias1,", "return Update(direction, -lr,",
      ADAM, "torch formula without first-moment bias correction"),
    M("galore-decay-without-lr", "lowrank_optim/rules/adam.py",
      'decay = lr * group["weight_decay"]',
      'decay = group["weight_decay"]',
      ADAM, "weight decay not scaled by lr"),
    M("adam-eps-on-bias2-not-sqrt", "lowrank_optim/kernels/reference.py",
      "denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)",
      "denom = (exp_avg_sq.sqrt() / bias_correction2).add_(eps)",
      ADAM, "torch formula divides by 1 - beta2^t instead of its square root"),
    M("adam-v-uses-beta1", "lowrank_optim/kernels/reference.py",
      "exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)",
      "exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta1)",
      ADAM, "second moment accumulates with 1 - beta1"),
    M("adafactor-row-not-normalised", "lowrank_optim/rules/adafactor.py",
      "r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)",
      "r_factor = row.rsqrt().unsqueeze(-1)",
      ADAFACTOR, "factored second moment not divided by the row mean"),
    M("adafactor-clip-inverted", "lowrank_optim/rules/adafactor.py",
      '.clamp_(min=1.0))', '.clamp_(max=1.0))',
      ADAFACTOR, "update clipping enlarges small updates"),
    M("adafactor-beta2-next-step", "lowrank_optim/rules/adafactor.py",
      'beta2t = 1.0 - math.pow(step, group["decay_rate"])',
      'beta2t = 1.0 - math.pow(step + 1, group["decay_rate"])',
      ADAFACTOR, "decay-rate schedule one step ahead"),
    M("adafactor-relative-step-1e-3", "lowrank_optim/rules/adafactor.py",
      'min_step = 1e-6 * step if group["warmup_init"] else 1e-2',
      'min_step = 1e-6 * step if group["warmup_init"] else 1e-3',
      ADAFACTOR, "relative step capped at 1e-3 instead of 1e-2"),
    M("adafactor-param-scale-min", "lowrank_optim/rules/adafactor.py",
      'lr = max(group["eps"][1], rms) * lr', 'lr = min(group["eps"][1], rms) * lr',
      ADAFACTOR, "parameter scale floor applied as a ceiling"),
    M("halfprec-moments-in-half", "lowrank_optim/rules/base.py",
      "dtype = torch.float32 if self.float32 and half else grad.dtype", "dtype = grad.dtype",
      ("tests/test_precision.py", *RESUME[:1]),
      "Adafactor's statistics kept in bf16 for bf16 gradients"),
    M("axis-of-ignores-reduced-axis", "lowrank_optim/rules/base.py",
      "return axis if axis < reduced else axis - 1", "return axis",
      DCT, "a reduced moment's axis position not shifted past the averaged axis",
      equivalent="the only reduced moments are Adafactor's 1-D statistics of a 2-D gradient; "
                 "for those the wrong position (1 instead of 0) makes the rotation use "
                 "rot^T @ t instead of t @ rot, the same vector for 1-D t"),
    M("8bit-state-recreated-every-step", "lowrank_optim/rules/base.py",
      "return any(m.name in state or m.storage[0] in state for m in self.moments)",
      "return any(m.name in state for m in self.moments)",
      (*OPT8, "tests/test_lowbit_spec.py"), "8-bit moments are zeroed at every step"),
    M("min-8bit-size-exclusive", "lowrank_optim/rules/lowbit.py",
      "return bits == 8 and numel >= min_size", "return bits == 8 and numel > min_size",
      (*OPT8, *PROFILE[:1]), "a tensor of exactly min_8bit_size elements stays 32-bit"),
    M("lowbit-requantise-signed", "lowrank_optim/rules/lowbit.py",
      "kernels.quantize_blockwise(state.pop(m.name), block_size, code, m.signed, out=out)",
      "kernels.quantize_blockwise(state.pop(m.name), block_size, code, True, out=out)",
      (*OPT8, *DCT[-2:]), "a rotated second moment is requantised with the signed table"),
    M("lowbit-dequantise-signed", "lowrank_optim/rules/lowbit.py",
      "kernels.dequantize_blockwise(codes, absmax, block_size, code, m.signed)",
      "kernels.dequantize_blockwise(codes, absmax, block_size, code, True)",
      (*OPT8, *DCT[-2:]), "moments shown to map_moments decoded with the signed table"),
    M("block-size-mismatch-unchecked", "lowrank_optim/rules/lowbit.py",
      "if absmax.numel() != num_blocks(codes.numel(), block_size):", "if False:",
      ("tests/test_step_inputs.py", *OPT8), "a state saved with another block_size is stepped"),
    # -- 8-bit codes ---------------------------------------------------------------------------
    M("unsigned-flushes-to-zero", "lowrank_optim/kernels/blockwise.py",
      "        mids[0] = 0.0\n", "        pass\n",
      (*LOWBIT, *OPT8), "small positive second moments are stored as zero"),
    M("absmax-ignores-negatives", "lowrank_optim/kernels/blockwise.py",
      "absmax = torch.maximum(high, low.neg_(), out=absmax)",
      "absmax = torch.maximum(high, high, out=absmax)",
      LOWBIT, "block scale from the maximum, not the largest magnitude"),
    M("linear-table-128", "lowrank_optim/kernels/blockwise.py",
      "torch.arange(-half, half + 1) / float(half)",
      "torch.arange(-half, half + 1) / float(half + 1)",
      LOWBIT, "signed linear table does not reach 1"),
    M("dynamic-levels-midpoints", "lowrank_optim/kernels/blockwise.py",
      "pos += [scale * (0.1 + 0.9 * (j + 1) / n) for j in range(n)]",
      "pos += [scale * (0.1 + 0.9 * (j + 0.5) / n) for j in range(n)]",
      LOWBIT, "levels at the middle of each step (bitsandbytes' map), not the documented end"),
    M("nbytes-scales-one-byte", "lowrank_optim/kernels/blockwise.py",
      "return numel + 4 * num_blocks(numel, block_size)",
      "return numel + num_blocks(numel, block_size)",
      ("tests/test_quantization.py", *OPT8), "8-bit size formula counts 1-byte scales"),
    M("8bit-m-requantised-unsigned", "lowrank_optim/kernels/reference.py",
      "blockwise.quantize_chunk(chunk, 0, code, True, m_codes[elems], m_absmax[blocks])",
      "blockwise.quantize_chunk(chunk, 0, code, False, m_codes[elems], m_absmax[blocks])",
      (*LOWBIT, *OPT8), "first moment requantised with the unsigned table"),
    # -- projectors ----------------------------------------------------------------------------
    M("galore-square-goes-left", "lowrank_optim/projectors/svd.py",
      'return ("right",) if m >= n else ("left",)', 'return ("right",) if m > n else ("left",)',
      SVD[:1], "square weights projected on the left"),
    M("galore-svd-in-grad-dtype", "lowrank_optim/projectors/svd.py",
      "        g = grad.float()\n        m, n = grad.shape",
      "        g = grad\n        m, n = grad.shape",
      ("tests/test_precision.py",), "SVD in bf16 (unsupported / inaccurate)"),
    M("svd-basis-kept-as-view", "lowrank_optim/projectors/svd.py",
      "state[name] = basis.to(dtype=dtype, copy=True).contiguous()", "state[name] = basis",
      (*PROFILE[:1], "tests/test_state_structure.py"),
      "the basis is a view of the SVD output, keeping all of U or V^T alive"),
    M("svd-overlap-max-side", "lowrank_optim/projectors/svd.py",
      "values.append(cross.square().sum() / min(cross.shape))",
      "values.append(cross.square().sum() / max(cross.shape))",
      ("tests/test_schedules.py", "tests/test_callbacks.py"),
      "subspace overlap normalised by the larger side",
      equivalent="cross = B_old B_new^T is r x r for two bases of the same rank (the rank is a "
                 "group setting, fixed for a parameter's life), so min and max of its shape are "
                 "the same number"),
    M("dct-indices-unsorted", "lowrank_optim/projectors/dct.py",
      "torch.topk(scores, rank, sorted=False).indices.sort().values.to(torch.int32)",
      "torch.topk(scores, rank, sorted=True).indices.to(torch.int32)",
      DCT, "selected frequencies in score order, not the canonical increasing order"),
    M("dct-scores-always-l1", "lowrank_optim/projectors/dct.py",
      "scores = kernels.dct_scores(coeffs, side, norm)",
      'scores = kernels.dct_scores(coeffs, side, "l1")',
      DCT, "score_norm ignored"),
    M("dct-rotates-only-when-equal", "lowrank_optim/projectors/dct.py",
      "and not torch.equal(old, idx):", "and torch.equal(old, idx):",
      DCT, "moments never rotated when the selection changes"),
    M("dct-rotation-inverted", "lowrank_optim/projectors/dct.py",
      "kernels.selection_remap(old.to(value.device),\n"
      "                                                               new.to(value.device))",
      "kernels.selection_remap(new.to(value.device),\n"
      "                                                               old.to(value.device))",
      DCT, "moments rotated with the inverse map"),
    M("dct-error-feedback-sign", "lowrank_optim/projectors/dct.py",
      "residual = acc - back", "residual = back - acc",
      DCT[:1], "error feedback adds the residual with the wrong sign"),
    M("dct-row-scores-not-squared", "lowrank_optim/projectors/dct.py",
      'scores = scores.float().square() if norm == "l2" else scores',
      "scores = scores.float()",
      FSDP2, "FSDP2 row shards sum l2 norms instead of squared norms"),
    M("sst-no-renormalisation", "lowrank_optim/projectors/sampled.py",
      'low, alpha, self.normalize)', "low, alpha, False)",
      SST, "SST's sampled singular vectors are not renormalised"),
    # -- optimizer (checks, state) -------------------------------------------------------------
    M("ignore-mode-still-checks", "lowrank_optim/optim/base.py",
      'if self.nonfinite != "ignore" and not self._grads_finite(grads):',
      "if not self._grads_finite(grads):",
      NONFINITE, 'nonfinite="ignore" still scans (and skips)'),
    M("state-check-skipped", "lowrank_optim/optim/base.py",
      "                self.rule.check_state(self.state[p], group, label)\n",
      "                pass\n",
      ("tests/test_step_inputs.py", "tests/test_checkpoint_safety.py"),
      "a loaded state is not checked before the step"),
    M("closure-without-grad", "lowrank_optim/optim/base.py",
      "            with torch.enable_grad():\n                loss = closure()",
      "            if True:\n                loss = closure()",
      ("tests/test_step_options.py",), "the closure runs under no_grad"),
    M("fsdp2-ranks-not-agreed", "lowrank_optim/distributed/fsdp2.py",
      "    if sharded is None:\n        return flag",
      "    if True:\n        return flag",
      FSDP2[:1], "FSDP2 ranks do not agree on a non-finite shard"),
    M("layout-check-ignores-refresher", "lowrank_optim/optim/base.py",
      "        refresher = type(self.refresher)\n",
      "        refresher = None\n",
      FSDP2[:1], "broadcast_refreshes installed later is never checked under FSDP2"),
    # -- profiler and memory accounting --------------------------------------------------------
    M("profile-layerwise-sums-grads", "lowrank_optim/profile.py",
      "gradients = max(grads, default=0) if layerwise else sum(grads)",
      "gradients = sum(grads)", PROFILE, "layer-wise profile counts every gradient"),
    M("profile-weights-without-buffers", "lowrank_optim/profile.py",
      "for t in [*net.parameters(), *net.buffers()])", "for t in [*net.parameters()])",
      PROFILE, "buffers left out of the weights"),
    M("profile-checkpointing-no-recompute", "lowrank_optim/profile.py",
      "kept = (tokens * h * el * layers + per_layer) if checkpointing",
      "kept = (tokens * h * el * layers) if checkpointing",
      PROFILE, "checkpointing estimate forgets the layer being recomputed"),
    M("profile-fits-without-overhead", "lowrank_optim/profile.py",
      "need = (self.cuda_peak or self.total) + OVERHEAD_BYTES",
      "need = (self.cuda_peak or self.total)",
      PROFILE, "the GPU verdict keeps no headroom"),
    M("memory-meta-bytes-as-elements", "lowrank_optim/memory.py",
      "        return t.numel() * t.element_size()\n", "        return t.numel()\n",
      PROFILE, "meta tensors counted in elements, not bytes (analytic mode)"),
    M("memory-foreign-projectors-as-indices", "lowrank_optim/memory.py",
      'return "projectors" if value.is_floating_point() else "indices"',
      'return "indices" if value.is_floating_point() else "projectors"',
      MEMORY, "galore-torch's float projectors counted as indices"),
    M("memory-shared-bases-as-indices", "lowrank_optim/memory.py",
      '            counts["projectors"] += _held_bytes(t)\n    num_params',
      '            counts["indices"] += _held_bytes(t)\n    num_params',
      MEMORY, "the shared DCT bases counted as indices"),
    # -- APOLLO, Fira, ZeRO-1 (issues 17, 18) -----------------------------------------------
    M("limiter-never-limits", "lowrank_optim/rules/scaling.py",
      "factor = torch.where((previous > 0) & (norm > cap), cap / norm.clamp_min(_TINY), one)",
      "factor = one", APOLLO_FIRA, "the norm-growth limiter never caps the full-size term"),
    M("apollo-ratio-inverted", "lowrank_optim/rules/scaling.py",
      "    return (num.float().norm(dim=axis, keepdim=True)\n"
      "            / den.float().norm(dim=axis, keepdim=True).clamp_min(_TINY))",
      "    return (den.float().norm(dim=axis, keepdim=True)\n"
      "            / num.float().norm(dim=axis, keepdim=True).clamp_min(_TINY))",
      APOLLO_FIRA, "channel ratios ||R||/||R~|| instead of ||R~||/||R||"),
    M("fira-residual-sign", "lowrank_optim/rules/fira.py",
      "residual = projection.grad - projection.back(low)",
      "residual = projection.back(low) - projection.grad",
      APOLLO_FIRA, "Fira adds the residual with the wrong sign"),
    M("random-draw-shared-by-parameters", "lowrank_optim/projectors/random.py",
      'mix(group.get("proj_seed", 0), ordinal)', 'mix(group.get("proj_seed", 0), 0)',
      APOLLO_FIRA, "every parameter of a shape gets the same random projection"),
    M("zero1-partition-smallest-first", "lowrank_optim/distributed/zero.py",
      "key=lambda t: t.numel(), reverse=True)", "key=lambda t: t.numel())",
      ("tests/test_zero1.py",), "the per-rank profile partitions unlike ZeroRedundancyOptimizer"),
]


# -- running --------------------------------------------------------------------------------------
def check_snippets(mutants: list[Mutant], root: Path = ROOT) -> None:
    """Every snippet occurs exactly once in its file, every test path exists; else exit."""
    problems = []
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        problems.append("duplicate mutant names")
    for m in mutants:
        text = (root / m.path).read_text()
        count = text.count(m.old)
        if count != 1:
            problems.append(f"{m.name}: snippet occurs {count} times in {m.path} "
                            f"(the code moved?): {m.old!r}")
        for test in m.tests:
            if not (root / test.split("::")[0]).is_file():
                problems.append(f"{m.name}: no test file {test.split('::')[0]}")
    if problems:
        sys.exit("mutation.py: fix the mutant table first:\n  " + "\n  ".join(problems))


def make_copy() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="lowrank-mutation-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", ".pytest_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, tmp / name)
    return tmp


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1",
               LOWRANK_OPTIM_KERNELS="torch")
    env.pop("TRITON_INTERPRET", None)
    return env


def check_copy_is_imported(copy: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import lowrank_optim; "
                           "print(lowrank_optim.__file__)"], cwd=copy, env=_env(copy),
                          capture_output=True, text=True, check=True)
    where = Path(done.stdout.strip().splitlines()[-1]).resolve()
    if copy.resolve() not in where.parents:
        sys.exit(f"mutation.py: the copy is not what gets imported ({where}); aborting")


def run_tests(copy: Path, tests: tuple[str, ...], timeout: int, maxfail: int = 3,
              deselect: tuple[str, ...] = ()) -> tuple[str, list[str], float]:
    """``(outcome, failed tests, seconds)``; outcome ``passed``, ``failed``, ``error`` or
    ``timeout``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rfE",
           f"--maxfail={maxfail}", "-W", "ignore", *tests]
    for test in deselect:
        cmd += ["--deselect", test]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", [], time.monotonic() - start
    seconds = time.monotonic() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.M)
    if done.returncode == 0:
        return "passed", [], seconds
    if done.returncode == 1:
        return "failed", sorted(set(failed)), seconds
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return "error", sorted(set(failed)) or [" / ".join(tail)], seconds


def run_mutant(copy: Path, m: Mutant, timeout: int, deselect: tuple[str, ...] = ()) -> dict:
    target = copy / m.path
    original = target.read_text()
    assert original.count(m.old) == 1, m.name
    target.write_text(original.replace(m.old, m.new))
    try:
        outcome, failed, seconds = run_tests(copy, m.tests, timeout, deselect=deselect)
    finally:
        target.write_text(original)
    return {"name": m.name, "killed": outcome != "passed", "outcome": outcome,
            "failed": failed, "seconds": round(seconds, 1)}


def machine() -> str:
    """The machine line of the benchmarks (the repository root is not on the path of a script
    run as ``python scripts/mutation.py``)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import machine as named

    return named()


def _short(test: str) -> str:
    return test.replace("tests/", "").replace(".py::", "::")


def write_report(results: dict[str, dict], broken: tuple[str, ...] = ()) -> Path:
    rows = [m for m in MUTANTS if m.name in results]
    killed = [m for m in rows if results[m.name]["killed"]]
    equivalent = [m for m in rows if not results[m.name]["killed"] and m.equivalent]
    survived = [m for m in rows if not results[m.name]["killed"] and not m.equivalent]
    scored = len(rows) - len(equivalent)
    score = 100.0 * len(killed) / scored if scored else 0.0
    lines = [
        "# Mutation testing",
        "",
        "`python scripts/mutation.py` (not in CI): each hand-written mutant below is applied to a "
        "private copy of the repository and its targeted test selection is run there "
        "(`-n 0 --maxfail=3`, torch kernel backend). A mutant is *killed* when a test fails, "
        "errors or times out.",
        "",
        f"Machine: {machine()}. Last update: {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"**Score: {len(killed)} of {scored} non-equivalent mutants killed ({score:.0f}%)**; "
        f"{len(equivalent)} equivalent, {len(survived)} surviving"
        + (": " + ", ".join(f"`{m.name}`" for m in survived) if survived else "") + ".",
        "",
        "Issue 20's table (mutations that no test caught before) is marked with *.",
        "",
        *([f"Deselected in this run because they failed before any mutation: "
           f"{', '.join(f'`{_short(t)}`' for t in broken)}.", ""] if broken else []),
        "| mutant | file | the bug it models | result | killed by (first failures) | s |",
        "|---|---|---|---|---|---|",
    ]
    for m in rows:
        r = results[m.name]
        if r["killed"]:
            result = "killed" if r["outcome"] == "failed" else f"killed ({r['outcome']})"
            by = "<br>".join(f"`{_short(t)}`" for t in r["failed"][:3])
        elif m.equivalent:
            result, by = "equivalent", m.equivalent
        else:
            result, by = "**survived**", "-"
        star = " *" if m.issue_table else ""
        lines.append(f"| `{m.name}`{star} | `{m.path.replace('lowrank_optim/', '')}` | {m.bug} "
                     f"| {result} | {by} | {r['seconds']} |")
    lines += [
        "",
        "Equivalent mutants change no behaviour the library promises (the reason is in the "
        "row). To add a mutant, append a `Mutant(name, file, exact snippet, replacement, tests, "
        "bug)` to `MUTANTS` in `scripts/mutation.py`; the script refuses to run when a snippet "
        "no longer occurs exactly once (the code moved), and runs every selection once on the "
        "unmutated copy first (tests failing there are deselected and named above).",
    ]
    path = RESULTS / "mutation.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only these mutants (repeat, or comma-separate)")
    ap.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per mutant")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the run of every selection on the unmutated copy")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<38} {m.path:<36} {m.bug}")
        return 0
    wanted = {n for item in args.only for n in item.split(",") if n}
    unknown = wanted - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutant(s): {', '.join(sorted(unknown))} (see --list)")
    mutants = [m for m in MUTANTS if not wanted or m.name in wanted]
    check_snippets(mutants)
    copy = make_copy()
    try:
        check_snippets(mutants, copy)
        check_copy_is_imported(copy)
        broken: tuple[str, ...] = ()
        if not args.no_baseline:
            selection = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            outcome, failed, seconds = run_tests(copy, selection, args.timeout * 6,
                                                 maxfail=20)
            print(f"baseline ({len(selection)} selections): {outcome} in {seconds:.0f} s",
                  flush=True)
            if outcome == "failed" and len(failed) < 20:
                # failing without any mutation (e.g. work in progress elsewhere in the tree):
                # left out of every run, and named in the report
                broken = tuple(failed)
                print(f"  deselected, failing before any mutation: {', '.join(failed)}")
            elif outcome != "passed":
                sys.exit(f"mutation.py: the unmutated tests do not pass: {failed}")
        store = RESULTS / "mutation.json"
        results = json.loads(store.read_text()) if store.exists() else {}
        results = {k: v for k, v in results.items() if k in {m.name for m in MUTANTS}}
        for i, m in enumerate(mutants, 1):
            r = run_mutant(copy, m, args.timeout, broken)
            results[m.name] = r
            state = "killed" if r["killed"] else ("equivalent" if m.equivalent else "SURVIVED")
            print(f"[{i}/{len(mutants)}] {m.name}: {state} ({r['outcome']}, {r['seconds']} s) "
                  f"{' '.join(map(_short, r['failed'][:2]))}", flush=True)
            store.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"wrote {write_report(results, broken)}")
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
