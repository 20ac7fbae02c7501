"""Seeds derived from named parts, so every random choice in the data pipeline is reproducible.

A seed is a hash of its parts, not a running generator: a random crop depends only on (seed, image) and a
data order only on (seed, epoch), never on what was drawn before, so adding an image or a dataset leaves
every other choice where it was.
"""

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (their ``str()``); stable across processes, machines and versions."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1
