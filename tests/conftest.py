"""Shared fixtures: one real redis-server per session, settings, engines."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.generation.model_files import prepare_model
from core.generation.transformers_engine import TransformersEngine
from core.keys import Keys
from core.redis_conn import connect
from core.redis_server import RedisServer
from core.settings import Settings

CACHE_DIR = Path.home() / ".cache" / "chatbot"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill and restart it."""
    server = RedisServer(tmp_path / "own-redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


TEST_PERSONA = "You are a test chat model. Reply briefly."


@pytest.fixture
def make_settings(redis_server: RedisServer, namespace: str, tmp_path: Path) -> Any:
    def make(**overrides: str | None) -> Settings:
        """Test settings; an override of None unsets a variable (CHATBOT_PERSONA=None: the
        default support assistant, which answers only from the knowledge base)."""
        values: dict[str, str | None] = {
            "REDIS_URL": redis_server.url,
            "CHATBOT_NAMESPACE": namespace,
            "CHATBOT_DATA_DIR": str(tmp_path / "data"),
            "CHATBOT_CACHE_DIR": str(CACHE_DIR),
            "CHATBOT_MAX_NEW_TOKENS": "8",
            "CHATBOT_CONTEXT_TOKENS": "512",
            "CHATBOT_BATCH_WAIT_MS": "1",
            # A persona of its own makes the bot a chat model (see AnswerPolicy): most tests
            # exercise the generation path with the tiny model.
            "CHATBOT_PERSONA": TEST_PERSONA,
            # Most adapter tests check what is posted once a reply is complete; the
            # streaming tests (tests/test_streaming*.py) turn it on.
            "CHATBOT_STREAMING": "off",
        }
        values.update(overrides)
        return Settings.from_mapping({k: v for k, v in values.items() if v is not None})

    return make


@pytest.fixture
def settings(make_settings: Any) -> Settings:
    result: Settings = make_settings()
    return result


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_server.url)  # the product's client (`core.redis_batching`)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The bundled SmolLM2, converted once (about 20 s on a fresh machine) and cached."""
    _source, location = prepare_model("", CACHE_DIR, print)
    return Path(location)


@pytest.fixture(scope="session")
def tiny_engine(model_dir: Path) -> TransformersEngine:
    """The tiny random-weight Llama (`tiny_llama`) behind the real engine."""
    from transformers import AutoTokenizer

    from tests.helpers import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = tiny_llama(tokenizer).eval()
    return TransformersEngine(model, tokenizer, context_tokens=512, max_batch_size=8)


@pytest.fixture(scope="session")
def bundled_engine(model_dir: Path) -> TransformersEngine:
    from core.generation.transformers_engine import load_engine

    settings = Settings.from_mapping(
        {"CHATBOT_CACHE_DIR": str(CACHE_DIR), "CHATBOT_MAX_NEW_TOKENS": "48"}
    )
    return load_engine(settings, print)


@pytest.fixture(scope="session")
def embedder() -> Any:
    """The bundled all-MiniLM-L6-v2 embedding model (loads in a few seconds)."""
    from core.knowledge.embeddings import load_embedder

    return load_embedder()
