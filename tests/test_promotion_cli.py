"""The promotion loop as an operator runs it: a `chatbot worker` process serving the bundled
model, `chatbot model promote` of a fine-tuned directory, the worker switching without a
restart, `chatbot model rollback` back to the bundled model; every message answered once."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from core.conversation import ConversationKey
from core.keys import WORKER_GROUP, Keys
from core.redis_server import RedisServer
from core.settings import Settings
from tests.conftest import CACHE_DIR
from tests.helpers import outbox, submit, tiny_llama, wait_for
from tests.processes import CHAT_PERSONA, chatbot, chatbot_env

pytestmark = pytest.mark.slow


async def served_models(redis: Any, keys: Keys) -> list[str]:
    models = []
    async for key in redis.scan_iter(match=keys.worker_pattern):
        record = await redis.get(key)
        if record:
            models.append(json.loads(record).get("model", ""))
    return models


def run_command(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = chatbot(args, env, cwd)
    stdout, stderr = proc.communicate(timeout=600)
    return proc.returncode, stdout, stderr


async def test_promote_and_rollback_switch_a_running_worker_process(
    tmp_path: Path, redis: Any, redis_server: RedisServer, namespace: str, model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    from core.training.sft import save_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    candidate = tmp_path / "candidate"
    save_model(tiny_llama(tokenizer, max_positions=1024), tokenizer, candidate)
    data = tmp_path / "held-out.jsonl"
    data.write_text(json.dumps({"dialogue": ["hi", "Hello! How can I help?"]}) + "\n")
    values = {
        "REDIS_URL": redis_server.url,
        "CHATBOT_NAMESPACE": namespace,
        "CHATBOT_CACHE_DIR": str(CACHE_DIR),
        "CHATBOT_MAX_NEW_TOKENS": "12",
        "CHATBOT_DTYPE": "float32",
        **CHAT_PERSONA,
    }
    settings = Settings.from_mapping(values)
    keys = Keys(namespace)
    env = chatbot_env(**values)
    convs = [ConversationKey("test", "W", f"c{i}", "") for i in range(3)]

    async def answered(n: int) -> bool:
        return len(await outbox(redis, settings)) >= n

    async def serving(model: str) -> bool:
        return await served_models(redis, keys) == [model]

    worker = chatbot(["worker"], env, tmp_path)
    try:
        await wait_for(
            lambda: serving("bundled"), timeout_s=180, what="the worker on the bundled model"
        )
        await submit(redis, settings, convs[0], "hello there", "m0")
        await wait_for(lambda: answered(1), timeout_s=120, what="the bundled model's reply")

        # A random-weight model is worse than the bundled one: refused, then forced.
        code, stdout, stderr = run_command(
            ["model", "promote", str(candidate), "--data", str(data)], env, tmp_path
        )
        assert code == 2 and "refused: the candidate is worse" in stderr, stderr
        assert "candidate: perplexity" in stdout
        code, stdout, stderr = run_command(
            ["model", "promote", str(candidate), "--data", str(data), "--force"], env, tmp_path
        )
        assert code == 0 and f"promoted {candidate}" in stdout, stderr
        await wait_for(
            lambda: serving(str(candidate)), timeout_s=120, what="the worker to switch models"
        )
        await submit(redis, settings, convs[1], "hello again", "m1")
        await wait_for(lambda: answered(2), timeout_s=120, what="the promoted model's reply")

        code, stdout, _ = run_command(["model", "list"], env, tmp_path)
        assert code == 0 and f"serving: {candidate}" in stdout and "(forced)" in stdout
        code, stdout, _ = run_command(["model", "rollback"], env, tmp_path)
        assert code == 0 and "workers now serve bundled" in stdout
        await wait_for(lambda: serving("bundled"), timeout_s=120, what="the worker to roll back")
        await submit(redis, settings, convs[2], "one more question", "m2")
        await wait_for(lambda: answered(3), timeout_s=120, what="the reply after the rollback")
    finally:
        worker.send_signal(signal.SIGTERM)
        _, worker_log = worker.communicate(timeout=120)
    assert worker.returncode == 0, worker_log
    replies = await outbox(redis, settings)
    assert sorted(r.reply_to for r in replies) == ["m0", "m1", "m2"]
    assert (await redis.xpending(keys.jobs, WORKER_GROUP))["pending"] == 0
    assert worker_log.count(f"now serving {candidate}") == 1
    assert worker_log.count("now serving the bundled model") == 1
