"""A worker following `chatbot model promote`: which model it should serve, and loading it.

The worker asks `due` between batches (at most every MODEL_CHECK_S); when the promoted
model (`core.training.registry`, else CHATBOT_MODEL) differs from the one it serves, it
finishes the replies in hand, then `load`s the new one and swaps. A model that fails to
load is logged once and skipped until another is promoted; the old one keeps serving.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from core.generation.engine import Engine
from core.keys import Keys
from core.redis_conn import Redis
from core.settings import Settings
from core.training.registry import ModelRegistry

log = logging.getLogger(__name__)

MODEL_CHECK_S = 5.0  # how often a worker looks for a newly promoted model


class EngineLoader(Protocol):
    """How a worker swaps its model for a promoted one."""

    async def load(self, model: str) -> Engine:
        """An engine for `model` (CHATBOT_MODEL syntax); raises ModelLoadError."""
        ...

    def retire(self, engine: Engine) -> None:
        """Free the engine that was replaced."""
        ...


class PromotedModels:
    def __init__(
        self, redis: Redis, settings: Settings, loader: EngineLoader | None, model: str
    ) -> None:
        self.registry = ModelRegistry(redis, Keys(settings.namespace))
        self.settings = settings
        self.loader = loader
        self.model = model  # the one the worker serves now
        self._next_check_s = 0.0
        self._unloadable: str | None = None

    async def due(self, *, now: bool = False) -> str | None:
        """The model to switch to, if the promoted one changed (None: keep serving)."""
        if self.loader is None or (not now and time.monotonic() < self._next_check_s):
            return None
        self._next_check_s = time.monotonic() + MODEL_CHECK_S
        promoted = await self.registry.current()
        wanted = promoted.path if promoted else self.settings.model
        if wanted in (self.model, self._unloadable):
            return None
        return wanted

    async def load(self, wanted: str) -> Engine | None:
        """The engine for `wanted`, now the model served; None if it failed to load."""
        assert self.loader is not None
        try:
            engine = await self.loader.load(wanted)
        except Exception:
            log.exception(
                "could not load the promoted model %s; serving %s still", wanted, self.model
            )
            self._unloadable = wanted
            return None
        self.model, self._unloadable = wanted, None
        return engine

    def retire(self, engine: Engine) -> None:
        assert self.loader is not None
        self.loader.retire(engine)
