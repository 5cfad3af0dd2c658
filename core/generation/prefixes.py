"""Keys and values of prompt prefixes, kept between requests.

Prompts that open the same way (the template's opening and the system turn: the persona,
shared by every conversation of a workspace) can start from that prefix's keys and values,
computed once (`core.generation.batcher`). They are kept here, at most `PREFIX_ENTRIES` of
them in at most `PREFIX_BYTES`, the least recently used dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import torch

# At most this many prefixes, in at most this many bytes (the bundled model's keys and
# values are 45 KiB a token in fp32: a 500-token persona takes 22 MiB); shorter prefixes
# than MIN_PREFIX_TOKENS are not worth keeping.
PREFIX_ENTRIES = 16
PREFIX_BYTES = 256 * 1024 * 1024
MIN_PREFIX_TOKENS = 16

Prefix = tuple[int, ...]
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer [1, heads, prefix, dim]


class KeptPrefixes:
    def __init__(self) -> None:
        self._kept: OrderedDict[Prefix, LayerKV] = OrderedDict()

    def get(self, prefix: Prefix) -> LayerKV | None:
        kept = self._kept.get(prefix)
        if kept is not None:
            self._kept.move_to_end(prefix)
        return kept

    def keep(self, prefix: Prefix, kv: LayerKV) -> None:
        """Keep `kv`, dropping the least recently used past the bounds (never `prefix`)."""
        self._kept[prefix] = kv
        while len(self._kept) > PREFIX_ENTRIES or (
            len(self._kept) > 1 and self.nbytes() > PREFIX_BYTES
        ):
            self._kept.popitem(last=False)

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for kv in self._kept.values() for k, v in kv)

    def __len__(self) -> int:
        return len(self._kept)

    def __iter__(self) -> Iterator[Prefix]:
        """The kept prefixes, least recently used first."""
        return iter(self._kept)
