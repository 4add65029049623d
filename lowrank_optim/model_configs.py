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
#: prefixes a config name may carry, as the recipe's config files are named (``llama_7b.yaml``)
NAME_PREFIXES = ("llama_", "llama-", "llama")


def model_name(name: str) -> str | None:
    """The :data:`LLAMA_SHAPES` key that ``name`` spells, or ``None``.

    Case does not matter and a ``llama_`` / ``llama-`` prefix is optional, so ``"7b"``,
    ``"7B"``, ``"llama_7b"`` (the recipe's ``recipes/configs/llama_7b.yaml``), ``"llama-7b"``
    and ``"LLaMA-7B"`` all give ``"7b"``.

    Parameters
    ----------
    name
        A size name, with or without the prefix.

    Returns
    -------
    str or None
        The canonical name, or ``None`` when ``name`` is not a string or names no config.
    """
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    for prefix in NAME_PREFIXES:
        if key.startswith(prefix) and key[len(prefix):] in LLAMA_SHAPES:
            return key[len(prefix):]
    return key if key in LLAMA_SHAPES else None


def model_names_help() -> str:
    """The accepted names in one line, for messages and ``--help``."""
    return (f"{', '.join(LLAMA_SHAPES)} (any case, llama_ / llama- prefix optional: 7b, "
            "llama_7b, llama-7b, LLaMA-7B)")


def llama_config(name: str = "tiny", **overrides: Any):
    """A ``transformers.LlamaConfig`` for one of :data:`LLAMA_SHAPES` (any spelling that
    :func:`model_name` accepts, e.g. ``"llama_7b"``)."""
    from transformers import LlamaConfig

    key = model_name(name)
    if key is None:
        raise ValueError(f"Unknown LLaMA config {name!r}; choose one of {model_names_help()}.")
    name = key
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
