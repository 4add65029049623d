"""Every Triton kernel compiled for real GPU targets, without a GPU (issue 14).

The heavy test (marked ``aot``: its own pytest run, ``pytest -m aot``, see scripts/test.sh)
compiles every program the launchers launch, for every autotune config, for each target of
:data:`lowrank_optim.kernels.aot.TARGETS` the installed Triton supports, and checks the
shared-memory budget (a config over the limit must be pruned by the kernel's autotune
pruning for that target); spills are reported in ``benchmarks/results/kernels_aot.md``.  The
light tests (main run) check the recording that makes the compiled signatures the launched
ones, and the pruning.
"""

from __future__ import annotations

import collections

import pytest
import torch

triton = pytest.importorskip("triton")

from lowrank_optim.kernels import aot, triton_common  # noqa: E402


def _groups() -> dict[tuple[str, str], list[aot.Variant]]:
    """Programs by (kernel, dtype of the first pointer): one test per group and target."""
    if triton_common.INTERPRET:
        return {}
    groups: dict[tuple[str, str], list[aot.Variant]] = collections.defaultdict(list)
    for v in aot.launches():
        first = next(t for _, t in v.signature if t.startswith("*"))[1:]
        groups[(v.kernel, first)].append(v)
    return dict(groups)


GROUPS = _groups()
#: ``$LOWRANK_AOT_TARGETS`` restricts them (the extra run against another Triton version)
TARGETS = aot.wanted_targets() if GROUPS else []
CASES = [(t, k, d, len(vs)) for t in TARGETS for (k, d), vs in GROUPS.items()]


@pytest.mark.aot
@pytest.mark.parametrize("target,kernel,dtype,count", CASES,
                         ids=[f"{t}-{k}-{d}-{n}programs" for t, k, d, n in CASES])
def test_every_program_compiles_within_budget(target, kernel, dtype, count):
    results = [aot.compile_variant(v, target) for v in GROUPS[(kernel, dtype)]]
    assert len(results) == count
    errors = [(aot._label(r.variant), r.error) for r in results if r.error]
    assert errors == [], errors
    limit = aot.TARGETS[target][1]
    over = [(aot._label(r.variant), r.shared) for r in results if not r.ok]
    assert over == [], f"over {limit} B of shared memory and not pruned: {over}"
    # every launch keeps at least one config on this target
    by_launch = collections.defaultdict(list)
    for r in results:
        key = tuple((k, v) for k, v in r.variant.constexprs if not k.startswith("BLOCK"))
        by_launch[(r.variant.signature, key)].append(r)
    assert all(any(not r.pruned for r in rs) for rs in by_launch.values())


def test_aot_cases_cover_every_launched_kernel_and_target():
    """The cases are not empty (a broken recording would silently compile nothing)."""
    if triton_common.INTERPRET:
        pytest.skip("under the interpreter the kernels carry its single config")
    kernels = {k for k, _ in GROUPS}
    assert kernels >= {"_gemm_kernel", "_column_norms_kernel", "_gather_columns_kernel",
                       "_adam_kernel", "_update_kernel", "_quantize_kernel",
                       "_dequantize_kernel", "_adam_8bit_kernel"}
    assert {"sm_80", "sm_86", "sm_89", "sm_90"} <= set(aot.supported_targets())
    # every dtype the dispatch accepts reaches the GEMM
    assert {d for k, d in GROUPS if k == "_gemm_kernel"} == {"fp32", "bf16", "fp16"}


def test_recording_captures_launches_without_running_them():
    if triton_common.INTERPRET:
        pytest.skip("interpreter configs")
    from lowrank_optim.kernels import triton_gemm

    grad, basis = torch.zeros(24, 16, dtype=torch.bfloat16), torch.zeros(4, 16,
                                                                          dtype=torch.bfloat16)
    with triton_common.recording() as launches:
        triton_gemm.project(grad, basis, "right")  # CPU tensors: running would need a GPU
    assert len(launches) == 1
    (variant, *_), configs = aot.variants_of(launches[0]), launches[0].kernel.configs
    assert len(aot.variants_of(launches[0])) == len(configs)
    signature = dict(variant.signature)
    assert signature["a_ptr"] == "*bf16" and signature["M"] == "i32"
    assert signature["BLOCK_M"] == "constexpr" and dict(variant.constexprs)["UPDATE"] is False
    assert not triton_common._recorder  # recording ended


def test_shared_memory_pruning_keeps_what_fits(monkeypatch):
    if triton_common.INTERPRET:
        pytest.skip("interpreter configs")
    configs = triton_common.configs(
        gpu=[dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_stages=2)],
        interpreted=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))
    args = {"a_ptr": torch.zeros(1), "b_ptr": torch.zeros(1, dtype=torch.bfloat16)}
    big, small = (triton_common.tile_shared_bytes(c, args) for c in configs)
    assert big == (128 * 64 + 64 * 128) * 4 * 3 and small == (64 * 32 + 32 * 64) * 4 * 2
    prune = triton_common.prune_shared(triton_common.tile_shared_bytes)
    assert prune.estimate is triton_common.tile_shared_bytes
    assert prune(configs, args) == configs  # not a GPU: nothing to prune against
    for limit, kept in [(big, configs), (99 * 1024, [configs[1]]), (small - 1, [configs[1]])]:
        monkeypatch.setattr(triton_common, "device_shared_limit", lambda t, v=limit: v)
        assert prune(configs, args) == kept, limit  # none fits: the smallest is kept
