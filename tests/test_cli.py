"""The `chatbot` command end to end: real processes, real Redis, the bundled SmolLM2."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from core.redis_server import RedisServer
from tests.processes import CHAT_PERSONA, chatbot, chatbot_env

pytestmark = pytest.mark.slow


def test_run_answers_piped_questions_with_the_bundled_model(
    tmp_path: Path, model_dir: Path
) -> None:
    env = chatbot_env(
        CHATBOT_DATA_DIR=str(tmp_path / "data"), CHATBOT_MAX_NEW_TOKENS="48", **CHAT_PERSONA
    )
    proc = chatbot(["run"], env, tmp_path, stdin=subprocess.PIPE)
    out, err = proc.communicate(
        "Hello! How do I reset my password?\n\n   \n"
        "Thank you. Can I change my e-mail address too?\n",
        timeout=300,
    )
    assert proc.returncode == 0, err
    assert len(out.strip()) > 20, out
    assert "Traceback" not in out + err
    assert "no answer came in time" not in out
    redis_dir = tmp_path / "data" / "redis"
    assert any(redis_dir.rglob("*.aof*")), "the embedded Redis keeps an append-only file"
    assert not (tmp_path / "data" / "redis.url").exists()  # cleaned up at exit
    log = (tmp_path / "data" / "chatbot.log").read_text()
    # One generation per question; blank lines ignored.
    assert len(re.findall(r"generated \S+: \d+ tokens", log)) == 2
    assert "stopped after publishing 2 replies" in log


def test_worker_and_chat_talk_through_redis(
    tmp_path: Path, redis_server: RedisServer, namespace: str, model_dir: Path
) -> None:
    env = chatbot_env(
        REDIS_URL=redis_server.url,
        CHATBOT_NAMESPACE=namespace,
        CHATBOT_MAX_NEW_TOKENS="48",
        **CHAT_PERSONA,
    )
    worker = chatbot(["worker"], env, tmp_path)
    try:
        chat = chatbot(["chat", "--conversation", "e2e"], env, tmp_path, stdin=subprocess.PIPE)
        out, err = chat.communicate("What are your opening hours?\n", timeout=300)
        assert chat.returncode == 0, err
        assert out.strip() and "Sorry, no answer came in time" not in out
        health = chatbot(["health"], env, tmp_path)
        report, _ = health.communicate(timeout=60)
        assert health.returncode == 0
        assert json.loads(report)["workers"][0]["replies_published"] == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        _, worker_err = worker.communicate(timeout=60)
    assert worker.returncode == 0, worker_err
    assert "stopped after publishing 1 replies" in worker_err
    health = chatbot(["health"], env, tmp_path)
    _, problem = health.communicate(timeout=60)
    assert health.returncode == 1 and "no live worker" in problem


def test_health_reports_an_unreachable_redis(tmp_path: Path) -> None:
    env = chatbot_env(REDIS_URL="redis://127.0.0.1:1/0")
    proc = chatbot(["health"], env, tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Redis at redis://127.0.0.1:1/0 is unreachable" in err


def test_run_stops_cleanly_on_sigterm(tmp_path: Path, model_dir: Path) -> None:
    env = chatbot_env(CHATBOT_DATA_DIR=str(tmp_path / "data"))
    proc = chatbot(["run"], env, tmp_path, stdin=subprocess.PIPE)
    url_file = tmp_path / "data" / "redis.url"
    deadline = time.monotonic() + 60
    while not url_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    port = int(url_file.read_text().strip().rsplit(":", 1)[1].split("/")[0])
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    check = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
    assert "PONG" not in check.stdout, "the embedded redis-server was left running"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHATBOT_MODEL": "/nonexistent/model"}, "no such model directory"),
        ({"CHATBOT_MODEL": "missing.gguf"}, "no such GGUF file"),
        ({"CHATBOT_MAX_NEW_TOKEN": "5"}, "did you mean CHATBOT_MAX_NEW_TOKENS"),
        ({"CHATBOT_DEVICE": "cuda:7"}, "CHATBOT_DEVICE=cuda:7"),
    ],
)
def test_worker_refuses_bad_settings_with_a_precise_message(
    tmp_path: Path, redis_server: RedisServer, env: dict[str, str], message: str
) -> None:
    proc = chatbot(["worker"], chatbot_env(REDIS_URL=redis_server.url, **env), tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert message in err
    assert "Traceback" not in err


def test_a_model_that_fails_to_load_stops_the_worker(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    env = chatbot_env(REDIS_URL=redis_server.url, CHATBOT_MODEL=str(broken))
    proc = chatbot(["worker"], env, tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"could not load model {broken}" in err


def test_discord_without_a_token_says_what_to_set(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    proc = chatbot(["discord"], chatbot_env(REDIS_URL=redis_server.url), tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "DISCORD_TOKEN is not set" in err


def test_discord_invite_url_carries_the_application_and_permissions(tmp_path: Path) -> None:
    env = chatbot_env(DISCORD_TOKEN="MTIzNDU2Nzg5MDEyMzQ1Njc4.Gabcde.secretpart")
    proc = chatbot(["discord", "--invite-url"], env, tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == (
        "https://discord.com/oauth2/authorize?client_id=123456789012345678"
        "&scope=bot+applications.commands&permissions=274877975552"
    )


def test_slack_without_credentials_says_what_to_set(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    proc = chatbot(["slack"], chatbot_env(REDIS_URL=redis_server.url), tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "SLACK_BOT_TOKEN is not set" in err


def test_chat_without_redis_explains_what_to_do(tmp_path: Path) -> None:
    proc = chatbot(["chat"], chatbot_env(CHATBOT_DATA_DIR=str(tmp_path)), tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "REDIS_URL is not set" in err


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "kb"


def test_run_with_the_example_knowledge_base_answers_with_sources(
    tmp_path: Path, model_dir: Path
) -> None:
    """What `make run` shows a newcomer: grounded answers with the bundled model."""
    env = chatbot_env(CHATBOT_DATA_DIR=str(tmp_path / "data"))
    proc = chatbot(["run", "--ingest", str(EXAMPLES)], env, tmp_path, stdin=subprocess.PIPE)
    out, err = proc.communicate(
        "How much does standard shipping cost?\nWho won the 2022 FIFA World Cup?\n", timeout=300
    )
    assert proc.returncode == 0, err
    assert "10 added" in err  # the ingestion summary
    assert "$5.95" in out and ("Source:" in out or "Sources:" in out)
    assert "rather not guess" in out and "talk to a person" in out


def test_operator_commands(tmp_path: Path, redis_server: RedisServer, namespace: str) -> None:
    env = chatbot_env(REDIS_URL=redis_server.url, CHATBOT_NAMESPACE=namespace)

    def run(*args: str) -> tuple[int, str, str]:
        proc = chatbot(list(args), env, tmp_path)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err

    code, out, err = run("kb", "ingest", str(EXAMPLES), "--kb", "acme")
    assert code == 0, err
    assert "10 added" in out
    code, out, _ = run("kb", "list")
    assert "acme: 10 documents" in out and "shipping.md" in out
    code, out, _ = run("kb", "search", "how much is shipping", "--kb", "acme")
    assert out.startswith("answers:") and "Shipping" in out and "would answer:\n" in out
    assert "  > " in out and "$5.95" in out.split("would answer:", 1)[1]
    code, out, _ = run("kb", "search", "do you have a discount for pensioners?", "--kb", "acme")
    assert out.startswith("declines:") and "unknown words: pensioner" in out
    code, _, err = run("workspace", "set", "slack", "T1", "--kb", "acme", "--channels", "C1, C2")
    assert code == 0, err
    code, out, _ = run("workspace", "show", "slack", "T1")
    assert "kb (workspace): 'acme'" in out and "channels (workspace): 'C1,C2'" in out
    code, _, err = run("workspace", "set", "slack", "T1", "--kb", "bad name!")
    assert code == 2 and "not valid" in err
    code, out, _ = run("stats", "--json")
    assert json.loads(out)["replies"] == 0
    code, _, err = run("conversation", "export", "slack:T1:C1:")
    assert code == 1 and "no stored messages" in err
    # Bad input: a clear message and exit status 2, never a traceback.
    code, _, err = run("conversation", "export", "not-an-id")
    assert code == 2 and "is not a conversation id" in err and "Traceback" not in err
    code, _, err = run("handoff", "release", "a:b")
    assert code == 2 and "is not a conversation id" in err and "Traceback" not in err
    code, _, err = run("conversation", "import", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "cannot import" in err and "Traceback" not in err
    code, out, _ = run("kb", "remove", "acme")
    assert code == 0 and "removed" in out
    code, _, err = run("kb", "ingest", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
