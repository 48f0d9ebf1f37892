"""One way to derive independent generator seeds from a run seed and a purpose."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """Hash parts such as (run seed, "step", step) into a 63-bit ``torch.Generator`` seed.

    A hash rather than ``seed + counter``: run seed 1 at step 0 and run seed 0 at step 1 must
    not share a stream, and streams for different purposes ("perm", "hflip", "step", "init",
    "sample") must never coincide. Stable across runs, hosts and Python versions.

    Returns:
        A non-negative int accepted by ``torch.Generator.manual_seed``.
    """
    text = "/".join(str(part) for part in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
