"""LLaMA model configurations of the GaLore paper, plus a tiny one for CPU tests and demos.

Models are always built from a config (never downloaded).  ``transformers`` is imported lazily
so the optimizers themselves only need torch.
"""

from __future__ import annotations

from typing import Any

#: name -> (hidden, intermediate, heads, layers); vocab 32000 unless overridden
LLAMA_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 176, 4, 2),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}
#: vocab of each named config (the tiny one is byte-level)
LLAMA_VOCAB: dict[str, int] = {"tiny": 256}


def llama_config(name: str = "tiny", **overrides: Any):
    """A ``transformers.LlamaConfig`` for one of :data:`LLAMA_SHAPES`."""
    from transformers import LlamaConfig

    if name not in LLAMA_SHAPES:
        raise ValueError(f"Unknown LLaMA config {name!r}; choose one of {sorted(LLAMA_SHAPES)}.")
    hidden, inter, heads, layers = LLAMA_SHAPES[name]
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_key_value_heads=heads, num_hidden_layers=layers,
        vocab_size=LLAMA_VOCAB.get(name, 32000), max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="eager",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_llama(name: str = "tiny", seed: int = 0, **overrides: Any):
    """A freshly initialised ``LlamaForCausalLM`` (deterministic for a given ``seed``)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(name, **overrides))
