"""The watermark: keyed green lists, generation on every local path, detection, the CLI.

Generation uses the tiny random-weight model (real tokenizer, the engine's real padded and
continuous-batching paths); detection scores decoded text re-tokenised, as a user's
screenshot would be.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.conversation import ConversationKey, Role
from core.errors import SettingsError
from core.generation.engine import GenerationRequest
from core.generation.transformers_engine import TransformersEngine
from core.policy import Generate, generated_spans
from core.redis_server import RedisServer
from core.settings import Settings
from core.support.workspaces import Workspaces
from core.watermark import GAMMA, MIN_TOKENS, Watermark
from core.worker import Worker
from tests.conftest import CACHE_DIR
from tests.helpers import make_store, outbox, submit
from tests.processes import chatbot, chatbot_env

KEY = "test-watermark-key-0001"
OTHER_KEY = "test-watermark-key-0002"
C = ConversationKey("test", "w1", "c1", "")
TURNS = [
    {"role": "system", "content": "You are a test chat model. Reply briefly."},
    {"role": "user", "content": "How do I change the address on my account?"},
]


def marked_engine(tiny_engine: TransformersEngine, key: str = KEY) -> TransformersEngine:
    """The tiny model behind an engine of its own with the watermark on (same weights)."""
    return TransformersEngine(
        tiny_engine.model,
        tiny_engine.tokenizer,
        context_tokens=512,
        max_batch_size=8,
        watermark=Watermark(key),
    )


def ids_of(engine: TransformersEngine, text: str) -> list[int]:
    ids: list[int] = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def requests(count: int, max_new_tokens: int = 64) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"r{i}",
            [TURNS[0], {"role": "user", "content": f"Question number {i}: where is order {i}?"}],
            max_new_tokens,
        )
        for i in range(count)
    ]


# -- the scheme -------------------------------------------------------------------------


def test_green_lists_are_keyed_and_hold_gamma_of_the_vocabulary() -> None:
    mark, other = Watermark(KEY), Watermark(OTHER_KEY)
    green = mark.green_ids(42, 49152)
    assert abs(len(green) / 49152 - GAMMA) < 0.01
    assert set(green.tolist()) != set(other.green_ids(42, 49152).tolist())
    assert set(green.tolist()) != set(mark.green_ids(43, 49152).tolist())
    sample = random.Random(0).sample(range(49152), 500)
    assert all(mark.is_green(42, t) == (t in set(green.tolist())) for t in sample)


def test_z_score_of_known_cases() -> None:
    mark = Watermark(KEY)
    rng = random.Random(1)
    # A chain where every next token is green: z = (1-g)T / sqrt(T g (1-g)).
    chain = [rng.randrange(49152)]
    while len(chain) < 65:
        chain.append(int(mark.green_ids(chain[-1], 49152)[rng.randrange(1000)]))
    score = mark.score([chain])
    expected = (64 - GAMMA * 64) / math.sqrt(64 * GAMMA * (1 - GAMMA))
    assert score.tokens_scored == 64 and score.green_tokens == 64
    assert score.z_score == pytest.approx(expected)
    assert score.verdict == "watermarked"
    # Repeating the text adds no evidence: repeated pairs are scored once (the one new pair
    # is where the copy joins the original).
    assert mark.score([chain + chain[1:]]).tokens_scored == 65
    # Random token sequences stay near z = 0.
    zs = [mark.score([[rng.randrange(49152) for _ in range(100)]]).z_score for _ in range(200)]
    assert abs(sum(zs) / len(zs)) < 0.3 and max(zs) < 4.0
    assert score.p_value == pytest.approx(GAMMA**64)
    assert mark.score([chain[:MIN_TOKENS]]).verdict == "too_short"
    assert mark.score([]).verdict == "too_short"


def test_the_verdict_uses_the_exact_tail_not_the_normal_one() -> None:
    """21 green of 40 is z = 4.02, but the binomial tail is 1.7e-4: five times the rate a
    z >= 4 promises. The verdict must not flag it; 25 of 40 it must."""
    mark = Watermark(KEY)
    rng = random.Random(2)

    def chain(greens: int, length: int) -> list[int]:
        ids = [rng.randrange(49152)]
        for step in range(length):
            green = set(mark.green_ids(ids[-1], 49152).tolist())
            while True:
                token = rng.randrange(49152)
                if (token in green) == (step < greens):
                    break
            ids.append(token)
        return ids

    borderline = mark.score([chain(21, 40)])
    assert borderline.tokens_scored == 40 and borderline.green_tokens == 21
    assert borderline.z_score >= 4.0 and borderline.p_value > 1e-4
    assert borderline.verdict == "not_watermarked"
    clear = mark.score([chain(25, 40)])
    assert clear.p_value < 3.2e-5 and clear.verdict == "watermarked"


# -- generation on every path -------------------------------------------------------------


async def test_watermarked_replies_detect_and_others_do_not(
    tiny_engine: TransformersEngine,
) -> None:
    marked = marked_engine(tiny_engine)
    with_key = await marked.generate(requests(4))  # continuous batching, 4 rows at once
    without_key = await tiny_engine.generate(requests(4))
    mark, other = Watermark(KEY), Watermark(OTHER_KEY)
    for generation in with_key:
        ids = ids_of(marked, generation.text)
        assert generation.new_tokens >= 32
        assert mark.score([ids]).verdict == "watermarked", generation.text
        assert other.score([ids]).verdict != "watermarked"
    for generation in without_key:
        ids = ids_of(marked, generation.text)
        assert mark.score([ids]).z_score < 4.0
    assert {g.text for g in with_key}.isdisjoint({g.text for g in without_key})
    marked.close()


async def test_the_padded_path_and_the_streaming_path_are_watermarked(
    tiny_engine: TransformersEngine,
) -> None:
    marked = marked_engine(tiny_engine)
    mark = Watermark(KEY)
    padded = await marked.generate_padded(requests(3))
    for generation in padded:
        assert mark.score([ids_of(marked, generation.text)]).verdict == "watermarked"
    seen: list[str] = []
    streamed = await marked.stream(requests(1)[0], seen.append)
    assert seen and seen[-1] == streamed.text
    assert mark.score([ids_of(marked, streamed.text)]).verdict == "watermarked"
    # Greedy with the same bias: the same reply whichever path produced it.
    [continuous] = await marked.generate(requests(1))
    assert continuous.text == streamed.text
    marked.close()


def test_generated_spans_cover_only_the_model_words() -> None:
    plan = Generate("persona", 64, offer_handoff=True)
    draft = plan.draft("  I can help with that. Let me look.", "stop")
    [[start, end]] = draft.meta["generated"]
    assert draft.text[start:end] == "I can help with that. Let me look."
    assert draft.text[end:].strip()  # the handoff offer is ours, not the model's
    cut = Generate("persona", 64).draft("We ship to forty countries and", "length", "We ship to")
    assert cut.text == "We ship to…"
    assert [cut.text[s:e] for s, e in cut.meta["generated"]] == ["We ship to"]
    assert generated_spans("A fixed reply.", "something else") == []


# -- the worker records spans; the CLI scores them ----------------------------------------


async def test_a_stored_reply_is_scored_on_its_generated_spans_only(
    redis: Any,
    make_settings: Any,
    tiny_engine: TransformersEngine,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    settings: Settings = make_settings(
        CHATBOT_WATERMARK_KEY=KEY, CHATBOT_MAX_NEW_TOKENS="64", CHATBOT_STREAMING="on"
    )
    await Workspaces(redis, settings_keys(settings), settings).set(
        "test", "w1", {"disclosure": "Answered by an AI assistant"}
    )
    marked = marked_engine(tiny_engine)
    worker = Worker(redis, settings, marked)
    await worker.queue.ensure_group()
    await submit(redis, settings, C, "This is useless!!! Where is my parcel?", "m1")
    assert await worker.step() == 1
    [reply] = await outbox(redis, settings)
    # The frustration offer and the disclosure are ours: outside the generated span.
    assert reply.text.endswith("_Answered by an AI assistant_")
    [[start, end]] = reply.meta["generated"]
    generated = reply.text[start:end]
    assert generated and len(generated) < len(reply.text)
    history = await make_store(redis, settings).history(C)
    assert history[-1].role is Role.ASSISTANT and "AI assistant" not in history[-1].text

    env = detect_env(settings, redis_server)
    result = detect(["--reply", reply.reply_id], env, tmp_path)
    alone = Watermark(KEY).score([ids_of(marked, generated)])
    whole = Watermark(KEY).score([ids_of(marked, reply.text)])
    assert result["verdict"] == "watermarked"
    assert result["tokens_scored"] == alone.tokens_scored != whole.tokens_scored
    assert result["generated_spans"] == 1
    # The same text under another key is not ours.
    other = detect(
        ["--reply", reply.reply_id], {**env, "CHATBOT_WATERMARK_KEY": OTHER_KEY}, tmp_path
    )
    assert other["verdict"] != "watermarked"
    # And the text itself, pasted as a screenshot's reader would.
    assert detect([generated], env, tmp_path)["verdict"] == "watermarked"
    marked.close()


def test_detect_rejects_bad_input_clearly(tmp_path: Path) -> None:
    env = chatbot_env(CHATBOT_WATERMARK_KEY=KEY, CHATBOT_CACHE_DIR=str(CACHE_DIR))
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 300_000)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    cases = [
        (["detect"], "", "nothing to score: standard input is empty"),
        (["detect", "   "], None, "nothing to score: the text is empty"),
        (["detect", "--file", str(binary)], None, "is binary data"),
        (["detect", "--file", str(latin1)], None, "is not UTF-8 text"),
        (["detect", "--file", str(huge)], None, "detection scores at most 1,000,000"),
        (["detect", "--file", str(tmp_path / "missing.txt")], None, "cannot read"),
        (["detect", "--reply", "not-an-id"], None, "no stored reply"),
    ]
    for args, stdin, message in cases:
        proc = chatbot(["watermark", *args], env, tmp_path, stdin=subprocess.PIPE)
        out, err = proc.communicate(stdin or "", timeout=120)
        assert proc.returncode == 2, (args, out, err)
        assert message in err and "Traceback" not in err, (args, err)
        assert out == ""
    no_key = chatbot(["watermark", "detect", "hello"], chatbot_env(), tmp_path)
    _, err = no_key.communicate(timeout=60)
    assert no_key.returncode == 2 and "CHATBOT_WATERMARK_KEY is not set" in err


def test_short_text_is_too_short_never_a_guess(tmp_path: Path) -> None:
    env = chatbot_env(CHATBOT_WATERMARK_KEY=KEY, CHATBOT_CACHE_DIR=str(CACHE_DIR))
    result = detect(["Thanks, that worked!"], env, tmp_path)
    assert result["verdict"] == "too_short" and result["tokens_scored"] < MIN_TOKENS


def test_a_short_key_is_a_configuration_error() -> None:
    with pytest.raises(SettingsError, match="at least 16"):
        Settings.from_mapping({"CHATBOT_WATERMARK_KEY": "short"})


# -- helpers --------------------------------------------------------------------------------


def settings_keys(settings: Settings) -> Any:
    from core.keys import Keys

    return Keys(settings.namespace)


def detect_env(settings: Settings, redis_server: RedisServer) -> dict[str, str]:
    return chatbot_env(
        REDIS_URL=redis_server.url,
        CHATBOT_NAMESPACE=settings.namespace,
        CHATBOT_WATERMARK_KEY=KEY,
        CHATBOT_CACHE_DIR=str(CACHE_DIR),
    )


def detect(args: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    proc = chatbot(["watermark", "detect", *args], env, cwd)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    assert {"verdict", "z_score", "tokens_scored"} <= set(result)
    return result
