"""Per-sample seeds: distinct, recorded, and stable across re-runs.

The reference reuses one seed for every duplicate (identical outputs) and ignores seed 0. Here a
sample's seed is derived from (base seed, input key, sample index) by hashing, so every sample of
every input differs, a re-run of the same input gets the same seeds, and any base seed works.
"""

from __future__ import annotations

import hashlib


def sample_seed(base_seed: int, input_key: str, sample_index: int, purpose: str = "start") -> int:
    """A 63-bit seed for one sample; `purpose` separates independent streams (start, noise)."""
    text = f"pulse:{int(base_seed)}:{purpose}:{sample_index}:{input_key}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)
