"""The profiler's bytes against formulas derived by hand, and its activation estimate against
the CPU allocator.

``tests/test_profile.py`` shows that the analytic (meta-device) and measured modes agree; both
count bytes with the same helpers, so that alone cannot catch a miscount.  Here the expected
bytes are derived from the LLaMA architecture and the GaLore paper's arithmetic (a weight
``W`` of ``m x n`` with ``m <= n`` keeps a projector ``P`` of ``m x r`` and Adam moments of
``r x n``: ``mr + 2nr`` elements instead of ``2mn``, Zhao et al. 2024, Sec. 4 / Table 1), for
the 7B model (analytic) and for the tiny one (measured on real tensors), and the activation
estimate's logits term is compared with the peak of the bytes the CPU allocator really holds
during a training step (``torch.profiler`` memory events).
"""

import functools
import math

import pytest
import torch

from lowrank_optim.model_configs import llama_config
from lowrank_optim.profile import DTYPES, activation_bytes, profile

#: LLaMA-7B (Touvron et al. 2023): hidden, MLP, layers, vocab; its published parameter count
LLAMA_7B = dict(h=4096, i=11008, layers=32, vocab=32000)
LLAMA_7B_PARAMS = 6_738_415_616


def llama_tensors(h, i, layers, vocab):
    """``(shape, kind)`` of every parameter of a LLaMA decoder (MHA, untied head)."""
    per_layer = [((h, h), "linear")] * 4 + [((i, h), "linear")] * 2 + [((h, i), "linear")]
    per_layer += [((h,), "norm")] * 2
    return ([((vocab, h), "embedding")] + per_layer * layers + [((h,), "norm")]
            + [((vocab, h), "head")])


def _numel(shape):
    return math.prod(shape)


def lowbit(numel, block=256):
    """8-bit bytes of one moment: a code per element plus an fp32 scale per block."""
    return numel + 4 * math.ceil(numel / block)


def expected_state(name, tensors, rank, el):
    """``(moments, projectors, indices, other)`` bytes, derived by hand.

    ``el``: bytes per element of the weights (and of the moments, kept in the weights' dtype,
    except Adafactor's statistics, always fp32).  Every projected ``nn.Linear`` weight (all of
    them; not the embedding or the output head) of ``a x b`` elements, ``a = min``, ``b = max``
    side, projects its smaller side: rank-``r`` moments of ``r x b``.  Per parameter a step
    counter (fp32), per projected weight the step of its last refresh (int64).
    """
    projected = [s for s, kind in tensors if kind == "linear" and min(s) >= rank]
    plain = [s for s, kind in tensors if kind != "linear" or min(s) < rank]
    other = 4 * len(tensors) + 8 * len(projected)
    if name == "adamw":
        return 2 * el * sum(map(_numel, [*projected, *plain])), 0, 0, 4 * len(tensors)
    low = [(min(s), max(s)) for s in projected]  # (a, b)
    if name == "galore_adafactor":  # factored: a row and a column statistic per matrix
        moments = 4 * (sum(b + rank for _, b in low)
                       + sum(s[0] + s[1] if len(s) == 2 else s[0] for s in plain))
        return moments, el * sum(a * rank for a, _ in low), 0, other
    if name == "galore_adamw8bit":  # embedding keeps 32-bit moments; >= 4096 elements: 8 bit
        moments = sum(2 * lowbit(b * rank) for _, b in low)
        for s, kind in ((s, k) for s, k in tensors if k != "linear"):
            n = _numel(s)
            moments += 2 * el * n if kind == "embedding" or n < 4096 else 2 * lowbit(n)
        return moments, el * sum(a * rank for a, _ in low), 0, other
    moments = 2 * el * (sum(b * rank for _, b in low) + sum(map(_numel, plain)))
    if name == "galore_adamw":
        return moments, el * sum(a * rank for a, _ in low), 0, other
    if name == "fira_adamw":  # GaLore's state + the limiter's fp32 norm per weight
        return moments, el * sum(a * rank for a, _ in low), 0, other + 4 * len(low)
    if name in ("apollo_adamw", "apollo_mini"):  # no matrix: int64 seed, step, shape (2)
        return moments, 0, 32 * len(low), other + 4 * len(low)
    if name == "dct_adamw":  # one shared DCT basis per size; int32 indices + int64 shape
        bases = {a for a, _ in low}
        return moments, el * sum(n * n for n in bases), (4 * rank + 16) * len(low), other
    raise AssertionError(name)


def _observed(p):
    return p.moments, p.projectors, p.indices, p.other_state


@functools.cache
def profile_7b(name, layerwise=False, rank=1024):
    """The analytic bf16 profile of LLaMA-7B (seq 256), computed once per run."""
    return profile("7b", name, rank=rank, precision="bf16", layerwise=layerwise)


# -- 7B, analytic ----------------------------------------------------------------------------
def test_7b_parameters_weights_and_gradients():
    tensors = llama_tensors(**LLAMA_7B)
    assert sum(_numel(s) for s, _ in tensors) == LLAMA_7B_PARAMS
    p = profile_7b("adamw")
    assert p.num_params == LLAMA_7B_PARAMS
    assert p.gradients == 2 * LLAMA_7B_PARAMS
    # + the rotary embedding's two fp32 buffers of head_dim / 2 = 64 frequencies
    assert p.weights == 2 * LLAMA_7B_PARAMS + 2 * 64 * 4
    layerwise = profile_7b("galore_adamw", layerwise=True)
    assert layerwise.gradients == 2 * 32000 * 4096  # one gradient live: the largest


@pytest.mark.parametrize("name, rank", [
    ("adamw", 1024), ("galore_adamw", 1024), ("dct_adamw", 1024), ("galore_adamw8bit", 1024),
    ("galore_adafactor", 1024), ("fira_adamw", 1024), ("apollo_adamw", 256),
    ("apollo_mini", 1)])
def test_7b_state_bytes_equal_the_hand_derived_formula(name, rank):
    p = profile_7b(name, rank=rank)
    want = expected_state(name, llama_tensors(**LLAMA_7B), rank, el=2)
    assert _observed(p) == want


def test_7b_galore_numbers_of_the_paper_arithmetic():
    """The figures behind the GaLore paper's 7B memory claims, in bytes (bf16, r = 1024): the
    224 projected matrices keep 1.88 GB of projectors; AdamW's 26.95 GB of moments become
    7.53 GB (the 262M embedding and head parameters keep full moments)."""
    adamw, galore = profile_7b("adamw"), profile_7b("galore_adamw")
    assert adamw.moments == 4 * LLAMA_7B_PARAMS == 26_953_662_464
    assert galore.projectors == 32 * 7 * 4096 * 1024 * 2 == 1_879_048_192
    per_layer = 2 * 1024 * (4 * 4096 + 3 * 11008)  # r x max side, two moments
    full = 2 * 32000 * 4096 + 65 * 4096  # embedding, head, 65 norm weights
    assert galore.moments == 2 * (32 * per_layer + 2 * full) == 7_525_646_336
    dct = profile_7b("dct_adamw")
    assert dct.indices == 224 * (1024 * 4 + 2 * 8) and dct.projectors == 4096 * 4096 * 2
    assert dct.moments == galore.moments


# -- tiny, measured on real tensors ------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "dct_adamw", "galore_adafactor",
                                  "fira_adamw", "apollo_adamw"])
def test_measured_tiny_state_bytes_equal_the_hand_derived_formula(name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = profile("tiny", name, rank=8, mode="measured", device="cpu", precision="fp32",
                    seq_len=16, steps=1)
    finally:
        torch.set_num_threads(threads)
    want = expected_state(name, llama_tensors(h=64, i=176, layers=2, vocab=256), 8, el=4)
    assert _observed(p) == want


# -- activations ---------------------------------------------------------------------------------
def test_activation_estimate_of_7b_by_hand():
    """Per layer and token, in bf16: two norm inputs, q, k, v and the attention output (6h),
    the MLP's gate, up and their product (3i); logits: bf16 logits, their fp32 upcast and its
    gradient (2 + 4 + 4 bytes per vocabulary entry).  Checkpointing keeps each layer's input
    plus one layer's full set."""
    cfg = llama_config("7b")
    tokens = 256
    layer = tokens * (6 * 4096 + 3 * 11008) * 2
    logits = tokens * 32000 * (2 + 4 + 4)
    assert logits == 81_920_000
    assert activation_bytes(cfg, 256, 1, "bf16", False) == 32 * layer + logits
    assert activation_bytes(cfg, 128, 2, "bf16", True) == (tokens * 4096 * 2 * 32 + layer
                                                          + logits)
    assert profile_7b("adamw").activations == 32 * layer + logits


def _allocator_peak(model, ids):
    """Peak of the bytes the CPU allocator holds during forward + backward, above the start
    (``torch.profiler`` memory events, in time order)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_logits_activations_match_the_allocator_peak(tmp_path, precision):
    """How the peak grows with the vocabulary (everything else fixed) is the logits' share:
    the measured profile's activation estimate plus the gradients it counts must grow the same
    way, in bf16 (logits, their fp32 upcast, the fp32 gradient: 10 bytes per token and
    vocabulary entry) and in fp32 (no upcast: 8).  On a GPU the same comparison would read
    ``torch.cuda.max_memory_allocated``; the CPU allocator reports its events to the
    profiler."""
    from lowrank_optim.model_configs import build_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seq, batch = 64, 2
    ids = torch.randint(0, 1024, (batch, seq), generator=torch.Generator().manual_seed(0))
    peaks, estimates = {}, {}
    try:
        for vocab in (1024, 5120):
            model = build_llama("tiny", seed=0, vocab_size=vocab).to(DTYPES[precision])
            peaks[vocab] = _allocator_peak(model, ids)
            path = tmp_path / str(vocab)
            llama_config("tiny", vocab_size=vocab).save_pretrained(path)
            p = profile(str(path / "config.json"), "adamw", precision=precision, seq_len=seq,
                        batch_size=batch, mode="measured", device="cpu", steps=1)
            estimates[vocab] = p.activations + p.gradients
    finally:
        torch.set_num_threads(threads)
    measured = peaks[5120] - peaks[1024]
    estimated = estimates[5120] - estimates[1024]
    assert measured > 0 and estimated == pytest.approx(measured, rel=0.1), (measured, estimated)


# -- the GPU verdict -----------------------------------------------------------------------------
def test_fits_keeps_one_gib_free():
    """A card fits when the total plus the documented 1 GiB of headroom (CUDA context,
    allocator fragmentation) is at most its memory: 23 GiB of tensors fit a 24 GB card, one
    byte more does not; headroom is what is left after both."""
    from lowrank_optim.profile import MemoryProfile

    gib = 2**30

    def verdict(total):
        p = MemoryProfile(model="m", optimizer="o", mode="analytic", num_params=1,
                          weights=total, gradients=0, moments=0, projectors=0, indices=0,
                          other_state=0, activations=0)
        return {name: (ok, room) for name, ok, room in p.fits()}

    def card(result, size):  # the first card of that size
        return next(v for name, v in result.items() if name.startswith(f"{size} GB"))

    assert card(verdict(23 * gib), 24) == (True, 0.0)
    ok, room = card(verdict(23 * gib + 1), 24)
    assert ok is False and room == pytest.approx(-1 / gib)
    assert card(verdict(10 * gib), 16) == (True, 5.0)


# -- memory accounting of optimizers that declare no categories ---------------------------------
def test_foreign_optimizer_state_is_classified_by_key_names():
    """An optimizer this library did not build is classified by the usual key names: ``exp_*``
    moments, floating ``proj*`` projectors, integer ``proj*`` indices, the rest other; the
    tensors of galore-torch's projector objects count as projectors."""
    import galore_torch

    from lowrank_optim.memory import state_bytes

    class Foreign(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            return None

    w = torch.nn.Parameter(torch.zeros(4, 4))
    opt = Foreign([w])
    opt.state[w] = {"exp_avg": torch.zeros(4, 4), "proj_basis": torch.zeros(4, 2),
                    "proj_idx": torch.zeros(2, dtype=torch.int32), "step": torch.zeros(())}
    sb = state_bytes(opt)
    assert (sb.moments, sb.projectors, sb.indices, sb.other) == (4 * 16, 4 * 8, 4 * 2, 4)

    v = torch.nn.Parameter(torch.randn(16, 8))
    galore = galore_torch.GaLoreAdamW([{"params": [v], "rank": 2, "update_proj_gap": 10,
                                        "scale": 1.0, "proj_type": "std"}])
    v.grad = torch.randn(16, 8)
    galore.step()
    sb = state_bytes(galore)
    # right projection of a tall weight: moments 16 x 2 each; the 2 x 8 basis is a view of
    # the SVD's 8 x 8 Vh, whose whole storage it keeps alive (and is counted)
    assert (sb.moments, sb.projectors, sb.indices) == (2 * 4 * 16 * 2, 4 * 8 * 8, 0)
