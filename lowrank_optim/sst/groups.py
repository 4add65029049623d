"""Converted model -> param groups for :class:`lowrank_optim.SSTAdamW`."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from lowrank_optim.groups import plain_groups
from lowrank_optim.sst.convert import spectral_modules
from lowrank_optim.validation import check_int_at_least

logger = logging.getLogger("lowrank_optim")


def sst_param_groups(
    model: nn.Module, rank: int | None = None, *, embedding_bits: int | None = None,
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """Param groups for SST: ``(U, S, V)`` triples of every :class:`SpectralLinear`, then the rest.

    Parameters
    ----------
    model
        A model converted with :func:`lowrank_optim.sst.convert`.
    rank
        Singular-vector pairs trained per iteration; ``None`` uses the rank each layer was
        converted with (layers with different ranks get one group per rank).
    embedding_bits
        ``32``: ``nn.Embedding`` weights get their own group with ``bits=32`` (see
        :func:`lowrank_optim.groups.plain_groups`); ``None`` (default) keeps them with the rest.
    **group_kwargs
        Extra keys for the SST group(s) only (e.g. ``iteration_length``, a different ``lr``).

    Returns
    -------
    list of dict
        SST groups carry ``rank`` and list their parameters as consecutive ``U, S, V`` triples
        (``param_names`` name them); a last group without ``rank`` holds every other trainable
        parameter (embeddings, norms, the output head, biases), trained by plain AdamW.
    """
    layers = spectral_modules(model)
    if not layers:
        raise ValueError(
            "The model has no SpectralLinear layer: call "
            "lowrank_optim.sst.convert(model, rank=..., target_modules=...) first."
        )
    by_rank: dict[int, dict[str, Any]] = {}
    chosen: set[int] = set()
    for name, layer in layers:
        r = rank if rank is not None else layer.rank
        if r is None:
            raise ValueError(
                f"{name}: no rank given and the layer was converted without one; pass rank=... "
                "to sst_param_groups (or to convert)."
            )
        check_int_at_least("rank", r, 1)
        triple = (layer.U, layer.S, layer.V)
        if not all(p.requires_grad for p in triple):
            continue
        group = by_rank.setdefault(r, {"params": [], "param_names": [], "rank": r,
                                       **group_kwargs})
        group["params"].extend(triple)
        group["param_names"].extend(f"{name}.{p}" for p in ("U", "S", "V"))
        chosen.update(id(p) for p in triple)
    rest = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in chosen:
            rest.append((name, p))
            chosen.add(id(p))
    groups = list(by_rank.values())
    if not groups:
        raise ValueError("Every SpectralLinear layer of the model is frozen; nothing to train.")
    groups += plain_groups(model, rest, embedding_bits)
    logger.info("lowrank_optim.sst: %d SpectralLinear layers (ranks %s); %d other tensors",
                sum(len(g["params"]) // 3 for g in by_rank.values()), sorted(by_rank), len(rest))
    return groups
