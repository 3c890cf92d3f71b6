"""Independent seeds for independent sources of randomness, all derived from one ``seed``.

Partitioning, client sampling, data order and model initialisation each draw from their
own stream, so changing (say) the sampler never reshuffles the partition.
"""

from __future__ import annotations

import hashlib

STREAMS = ("partition", "sampling", "data", "init")


def derive_seed(seed: int, *names: object) -> int:
    """A 31-bit seed that depends only on ``seed`` and the stream path ``names``."""
    key = ":".join([str(int(seed)), *map(str, names)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF
