"""Deterministic derivation of independent random streams from a user seed.

Every random choice in :mod:`msam.data` (train subset, validation carve, label noise, batch
order, augmentation) gets its own :class:`torch.Generator`, seeded from the user's ``seed``
plus a tag naming the purpose and any counters (epoch, batch index).  Deriving the seed by
hashing keeps the streams independent of one another and makes each one a pure function of its
inputs: a run resumed at epoch ``e``, batch ``b`` re-creates exactly the generator the original
run used there, without replaying the earlier draws.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "make_generator"]


def derive_seed(seed: int, *tags: object) -> int:
    """Return a 63-bit seed that is a stable hash of ``seed`` and ``tags``.

    ``tags`` may be ints or strings; the result does not depend on the Python hash seed, the
    platform or the process, so it is reproducible across runs and machines.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    payload = repr((int(seed),) + tuple(tags)).encode("utf-8")
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded with :func:`derive_seed` of the arguments."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, *tags))
    return gen
