"""Which model the workers serve: promotions recorded in Redis, rolled back in one step.

`chatbot model promote DIR` pushes a record (the directory, a content hash of its weights,
the evaluation figures, who and when) onto `Keys.models`; its head is the model every
worker serves, over CHATBOT_MODEL. Workers look at the head between batches
(`core.worker`): when it changed they finish the replies in hand, load the new model and go
on, so no job is lost and no process restarts. `rollback` moves the head to
`Keys.models_retired` (atomically, LMOVE), so the one before it is served again, or
CHATBOT_MODEL once none is left.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DataError
from core.keys import Keys
from core.redis_conn import Redis


@dataclass(frozen=True)
class Promotion:
    path: str
    digest: str  # sha256 of the weight files, so that a changed directory is noticed
    metrics: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)  # the serving model's figures
    by: str = ""
    at: float = 0.0
    forced: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Promotion:
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def weights_digest(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise DataError(f"{directory}: no model weights (*.safetensors) in it")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as weights:
            for block in iter(lambda: weights.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def operator() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # no user name in some containers
        return f"?@{socket.gethostname()}"


class ModelRegistry:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def current(self) -> Promotion | None:
        raw = await self.redis.lindex(self.keys.models, 0)
        return Promotion.from_json(raw) if raw else None

    async def promote(self, promotion: Promotion) -> None:
        await self.redis.lpush(self.keys.models, promotion.to_json())

    async def rollback(self) -> Promotion | None:
        """Retire the serving promotion; the one now served (None: CHATBOT_MODEL)."""
        moved = await self.redis.lmove(self.keys.models, self.keys.models_retired, "LEFT", "LEFT")
        if moved is None:
            raise DataError("nothing to roll back: no model was promoted")
        return await self.current()

    async def history(self) -> tuple[list[Promotion], list[Promotion]]:
        """(promotions, serving first; rolled back ones, newest first)."""
        live = await self.redis.lrange(self.keys.models, 0, -1)
        retired = await self.redis.lrange(self.keys.models_retired, 0, -1)
        return [Promotion.from_json(r) for r in live], [Promotion.from_json(r) for r in retired]


def new_promotion(
    directory: Path, metrics: dict[str, Any], baseline: dict[str, Any], forced: bool
) -> Promotion:
    return Promotion(
        path=str(directory.resolve()),
        digest=weights_digest(directory),
        metrics=metrics,
        baseline=baseline,
        by=operator(),
        at=time.time(),
        forced=forced,
    )


# Tolerances of `promote`: how much worse than the serving model a candidate may be.
PERPLEXITY_TOLERANCE = 0.02  # relative
SCORE_TOLERANCE = 0.5  # BLEU and chrF points


def regressions(candidate: dict[str, Any], serving: dict[str, Any]) -> list[str]:
    """Why `candidate` is worse than `serving` beyond the tolerances (empty: it is not)."""
    found = []
    limit = serving["perplexity"] * (1 + PERPLEXITY_TOLERANCE)
    if candidate["perplexity"] > limit:
        found.append(
            f"perplexity {candidate['perplexity']:.3f} > {serving['perplexity']:.3f} "
            f"(+{PERPLEXITY_TOLERANCE:.0%} allowed)"
        )
    for name in ("bleu", "chrf"):
        if candidate[name] < serving[name] - SCORE_TOLERANCE:
            found.append(
                f"{name} {candidate[name]:.2f} < {serving[name]:.2f} (-{SCORE_TOLERANCE} allowed)"
            )
    return found
