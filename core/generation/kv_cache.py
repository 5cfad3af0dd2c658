"""The batch's KV cache: transformers' DynamicCache with layers that have spare room.

transformers' `DynamicLayer` concatenates each step's keys and values onto the cache, which
copies every layer's whole cache at every decoding step (13 % of a batch-1 step here).
The layers here write into room kept at the end of their buffers instead, and are refilled
whole (`set_kv`) when rows join or leave the batch (core/generation/batcher.py).
"""

from __future__ import annotations

from typing import Any

import torch


def cache_layers(cache: Any) -> list[Any]:
    """The cache's layers, each with `keys` and `values` of [rows, heads, length, dim]."""
    return list(cache.layers)


def new_cache(config: Any) -> Any:
    """transformers' DynamicCache, its plain layers replaced by ones with spare room."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [
        _growing_layer_class()() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def set_kv(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give a layer new contents (rows joined or left the batch)."""
    if hasattr(layer, "replace"):
        layer.replace(keys, values)
    else:
        layer.keys, layer.values = keys, values


_GROWING: Any = None


def _growing_layer_class() -> Any:
    """A DynamicLayer that writes each step's keys and values into spare room at the end
    of its buffers instead of concatenating (a concatenation copies the whole cache of
    every layer at every step: 13 % of a batch-1 step here)."""
    global _GROWING
    if _GROWING is not None:
        return _GROWING
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
        _key_room: torch.Tensor | None = None
        _value_room: torch.Tensor | None = None
        _length = 0

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._length = 0
                self._key_room = self._value_room = None
            added = key_states.shape[-2]
            self._make_room(key_states, self._length + added)
            assert self._key_room is not None and self._value_room is not None
            self._key_room[:, :, self._length : self._length + added] = key_states
            self._value_room[:, :, self._length : self._length + added] = value_states
            self._length += added
            self.keys = self._key_room[:, :, : self._length]
            self.values = self._value_room[:, :, : self._length]
            return self.keys, self.values

        def _make_room(self, like: torch.Tensor, needed: int) -> None:
            room = self._key_room
            if room is not None and room.shape[2] >= needed and room.shape[0] == like.shape[0]:
                return
            capacity = max(needed + 64, needed * 3 // 2)
            shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
            keys, values = like.new_empty(shape), like.new_empty(shape)
            if room is not None and self._length:
                keys[:, :, : self._length] = room[:, :, : self._length]
                assert self._value_room is not None
                values[:, :, : self._length] = self._value_room[:, :, : self._length]
            self._key_room, self._value_room = keys, values

        def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """New contents (rows joined or left, a kept prefix): copied into fresh buffers."""
            if not self.is_initialized:
                self.lazy_initialization(keys, values)
            self._key_room = self._value_room = None
            self._length = 0
            self._make_room(keys, keys.shape[2] + 64)
            assert self._key_room is not None and self._value_room is not None
            self._length = keys.shape[2]
            self._key_room[:, :, : self._length] = keys
            self._value_room[:, :, : self._length] = values
            self.keys = self._key_room[:, :, : self._length]
            self.values = self._value_room[:, :, : self._length]

    _GROWING = GrowingLayer
    return _GROWING
