"""Which singular vectors SST trains: the ICML multinomial over the singular values.

Sampling is a pure function of the singular values and a seed derived from
``(seed, layer, draw)``, so it needs no generator state in the optimizer and a resumed run draws
exactly what the uninterrupted run draws.
"""

from __future__ import annotations

import hashlib

import torch


def sampling_probabilities(singular_values: torch.Tensor) -> torch.Tensor:
    """SST's sampling distribution (ICML version): ``p_i = 0.5 * (1/k + S_i / sum(S))``.

    Mixing the magnitude-proportional law with the uniform one keeps every vector reachable
    (``p_i >= 1 / (2k)``) while favouring the large singular values.  Negative entries count as
    zero; if every value is zero the law is uniform.

    Parameters
    ----------
    singular_values
        The ``k`` singular values ``S`` of one layer (any device and float dtype).

    Returns
    -------
    torch.Tensor
        ``k`` probabilities, float64 on the CPU (sampling there is device-independent).
    """
    s = singular_values.detach().to(device="cpu", dtype=torch.float64).clamp_min(0.0)
    k = s.numel()
    uniform = torch.full_like(s, 1.0 / k)
    total = s.sum()
    if total <= 0:
        return uniform
    return 0.5 * (uniform + s / total)


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (e.g. ``(seed, layer, draw)``).

    The integers are hashed (BLAKE2b), so neighbouring keys give unrelated streams.
    """
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def sample_indices(
    singular_values: torch.Tensor, rank: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``rank`` distinct indices by the multinomial of :func:`sampling_probabilities`.

    Without replacement: each pick is proportional to the probabilities of the indices not yet
    picked (``torch.multinomial``'s successive sampling).

    Returns
    -------
    torch.Tensor
        Sorted ``int64`` indices on the CPU.
    """
    probs = sampling_probabilities(singular_values)
    if not 1 <= rank <= probs.numel():
        raise ValueError(f"Invalid rank={rank!r}: must be in [1, k={probs.numel()}].")
    picks = torch.multinomial(probs, rank, replacement=False, generator=generator)
    return picks.sort().values
