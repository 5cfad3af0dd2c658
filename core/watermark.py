"""A keyed statistical watermark on the text the local model writes, and its detector.

The scheme is Kirchenbauer et al. 2023 ("A Watermark for Large Language Models", the soft
watermark with a left hash of one token): before each token is picked, a share `GAMMA` of
the vocabulary is declared "green" by a function of the previous token and the secret key,
and `DELTA` is added to the green tokens' logits. Text the model wrote then holds more
green tokens than chance allows; the detector counts them and reports a z-score:

    z = (green - GAMMA * T) / sqrt(T * GAMMA * (1 - GAMMA))

over the T token pairs scored. Without a watermark each token is green with probability
GAMMA whatever the text, so the count of green tokens is binomial; the verdict is
"watermarked" when its exact one-sided tail probability is at most P_THRESHOLD, the
normal tail at z = 4 (about 3 in 100,000). The exact tail matters for replies: at 12 to 40
tokens the normal approximation puts the rate of z >= 4 several times too low (measured
in bench/watermark.py). Repeated pairs are scored once, so that a phrase said ten times is
not ten pieces of evidence.

Green lists come from the key, not from a public constant: a token is green after `prev`
when a 64-bit mix of HMAC-SHA256(key, prev) and the token falls below GAMMA * 2**64. It is
computed on the CPU in integers, so a GPU and a CPU agree, and detection needs only the
tokenizer (no model, no torch). Without the key nobody can tell green from red, so nobody
can detect or forge the mark.

What "not watermarked" means: not detected. Short, low-entropy replies (greedy decoding
of a small model, quoted passages) often carry too little of the mark to reach the
threshold; that never means a person wrote them. Below `MIN_TOKENS` scored pairs the
verdict is "too_short" instead of a guess (see bench/watermark.py for the measured
detection rate by length).
"""

from __future__ import annotations

import hmac
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from core.settings import Settings

# Chosen with bench/watermark.py on the bundled SmolLM2 (greedy, repetition penalty 1.1):
# see the README's "Watermark" section for the table behind these figures.
GAMMA = 0.25  # share of the vocabulary that is green after each token
DELTA = 2.0  # added to the logits of green tokens
Z_THRESHOLD = 4.0  # reported; the verdict uses the exact tail at the same level:
P_THRESHOLD = 0.5 * math.erfc(Z_THRESHOLD / math.sqrt(2.0))  # 3.17e-5
# Scored pairs below which the verdict is "too_short": from 32 the detector finds this
# model's watermark in about half of the replies, and in 96 % from 64 (bench/watermark.py).
MIN_TOKENS = 32
EXACT_MAX_TOKENS = 5000  # above this the normal approximation is exact enough

Verdict = Literal["watermarked", "not_watermarked", "too_short"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_DOMAIN = b"chatbot-watermark-v1:"


@dataclass(frozen=True)
class Score:
    verdict: Verdict
    z_score: float
    tokens_scored: int
    green_tokens: int
    p_value: float  # one-sided: the chance of this many green tokens without the watermark

    def to_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "z_score": round(self.z_score, 3),
            "tokens_scored": self.tokens_scored,
            "green_tokens": self.green_tokens,
            "green_fraction": round(self.green_tokens / self.tokens_scored, 4)
            if self.tokens_scored
            else 0.0,
            "p_value": float(f"{self.p_value:.3g}"),
            "p_threshold": float(f"{P_THRESHOLD:.3g}"),
            "z_threshold": Z_THRESHOLD,
            "min_tokens": MIN_TOKENS,
        }


class Watermark:
    """Green lists for one key; `green_ids` for generation, `score` for detection."""

    def __init__(
        self, key: str, *, gamma: float = GAMMA, delta: float = DELTA, cache_size: int = 512
    ) -> None:
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be between 0 and 1, not {gamma}")
        self._key = key.encode("utf-8")
        self.gamma = gamma
        self.delta = delta
        self._threshold = min(int(gamma * 2**64), _MASK64)
        self._cache_size = cache_size
        # (previous token, vocabulary size) -> green ids; a reply reuses few contexts.
        self._green: OrderedDict[tuple[int, int], npt.NDArray[np.int64]] = OrderedDict()

    def _seed(self, prev: int) -> int:
        digest = hmac.new(self._key, _DOMAIN + prev.to_bytes(8, "big", signed=True), "sha256")
        return int.from_bytes(digest.digest()[:8], "big")

    def is_green(self, prev: int, token: int) -> bool:
        return _mix(self._seed(prev) ^ ((token * _GOLDEN) & _MASK64)) < self._threshold

    def green_ids(self, prev: int, vocab_size: int) -> npt.NDArray[np.int64]:
        """The green token ids after `prev`, for a vocabulary of `vocab_size`."""
        cache_key = (prev, vocab_size)
        found = self._green.get(cache_key)
        if found is not None:
            self._green.move_to_end(cache_key)
            return found
        tokens = np.arange(vocab_size, dtype=np.uint64)
        with np.errstate(over="ignore"):
            mixed = _mix_array(np.uint64(self._seed(prev)) ^ (tokens * np.uint64(_GOLDEN)))
        green = np.flatnonzero(mixed < np.uint64(self._threshold)).astype(np.int64)
        self._green[cache_key] = green
        if len(self._green) > self._cache_size:
            self._green.popitem(last=False)
        return green

    def score(self, spans: Iterable[Sequence[int]]) -> Score:
        """Score token sequences (each scored on its own pairs; repeated pairs once)."""
        seen: set[tuple[int, int]] = set()
        green = 0
        for ids in spans:
            for prev, token in itertools.pairwise(ids):
                if (prev, token) in seen:
                    continue
                seen.add((prev, token))
                green += self.is_green(prev, token)
        scored = len(seen)
        if scored == 0:
            return Score("too_short", 0.0, 0, 0, 1.0)
        expected = self.gamma * scored
        z = (green - expected) / math.sqrt(scored * self.gamma * (1.0 - self.gamma))
        p = binomial_tail(green, scored, self.gamma)
        if scored < MIN_TOKENS:
            verdict: Verdict = "too_short"
        elif p <= P_THRESHOLD:
            verdict = "watermarked"
        else:
            verdict = "not_watermarked"
        return Score(verdict, z, scored, green, p)


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p); the normal tail for long texts."""
    if successes <= 0:
        return 1.0
    if trials > EXACT_MAX_TOKENS:
        z = (successes - p * trials) / math.sqrt(trials * p * (1.0 - p))
        return 0.5 * math.erfc(z / math.sqrt(2.0))
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(trials + 1)
        - math.lgamma(k + 1)
        - math.lgamma(trials - k + 1)
        + k * log_p
        + (trials - k) * log_q
        for k in range(successes, trials + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def watermark_status(settings: Settings) -> str:
    """What `chatbot health` says of the watermark on a worker's replies."""
    if not settings.watermark_key:
        return "off"
    if settings.engine_url:
        return "unavailable: replies come from CHATBOT_ENGINE_URL, which we cannot watermark"
    return "on"


def _mix(x: int) -> int:
    """splitmix64's finaliser: every input bit moves every output bit."""
    x = (x ^ (x >> 30)) * _MIX1 & _MASK64
    x = (x ^ (x >> 27)) * _MIX2 & _MASK64
    return x ^ (x >> 31)


def _mix_array(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
    result: npt.NDArray[np.uint64] = x ^ (x >> np.uint64(31))
    return result
