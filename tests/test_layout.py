"""The adapters and the operator commands run where torch and transformers are not installed:
an adapter replica is a small process in a small container.

Each check runs in a fresh interpreter whose import system refuses torch and transformers,
as a machine without them would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from core.redis_server import RedisServer, free_port
from tests.processes import REPO, chatbot_env

WITHOUT_TORCH = textwrap.dedent(
    """
    import importlib.abc
    import sys

    HEAVY = {"torch", "transformers", "accelerate", "gguf", "safetensors"}

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HEAVY:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NotInstalled())

    def check_light():
        loaded = sorted(HEAVY & {m.partition(".")[0] for m in sys.modules})
        assert not loaded, f"loaded {loaded}"
    """
)

ADAPTER_MODULES = [
    "bot.cli",
    "bot.serve",
    "bot.admin",
    "bot.slack",
    "bot.discord",
    "bot.console",
    "bot.outbox",
    "core.inbound",
    "core.health",
]


def run_without_torch(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = WITHOUT_TORCH + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize("module", ADAPTER_MODULES)
def test_adapter_modules_import_without_torch(module: str) -> None:
    done = run_without_torch(f"import {module}\ncheck_light()\n", chatbot_env())
    assert done.returncode == 0, done.stderr


def test_the_worker_is_what_needs_torch() -> None:
    """The blocker works: the worker's engine cannot load without torch."""
    code = "import core.generation.transformers_engine\n"
    done = run_without_torch(code, chatbot_env())
    assert done.returncode != 0
    assert "blocked by the test" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["health"],
        ["workspace", "list"],
        ["workspace", "set", "slack", "T1", "--kb", "help"],
        ["stats", "--json"],
        ["conversation", "list"],
        ["kb", "list"],
        ["user", "forget", "slack", "U1"],
    ],
)
def test_operator_commands_run_without_torch(
    args: list[str], redis_server: RedisServer, namespace: str
) -> None:
    env = chatbot_env(REDIS_URL=redis_server.url, CHATBOT_NAMESPACE=namespace)
    code = f"""
        from bot.cli import main
        status = main({args!r})
        check_light()
        sys.exit(status)
    """
    done = run_without_torch(code, env)
    # `health` reports no live worker (exit 1): it ran; anything else must succeed.
    assert done.returncode == (1 if args == ["health"] else 0), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("command", "env_values", "expected"),
    [
        (
            "slack",
            {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": "s3cret"},
            "cannot reach Slack",
        ),
        ("discord", {"DISCORD_TOKEN": "MTIzNDU2Nzg5.x.y"}, "cannot reach Discord"),
    ],
)
def test_adapters_start_without_torch(
    command: str,
    env_values: dict[str, str],
    expected: str,
    redis_server: RedisServer,
    namespace: str,
) -> None:
    """The real adapter command, as far as the platform: nothing listens at its API URL,
    so it stops with a configuration error after building the adapter."""
    closed = f"http://127.0.0.1:{free_port()}"
    env = chatbot_env(
        REDIS_URL=redis_server.url,
        CHATBOT_NAMESPACE=namespace,
        SLACK_API_URL=f"{closed}/api/",
        DISCORD_API_URL=f"{closed}/api/v10",
        DISCORD_GATEWAY_URL=f"ws://127.0.0.1:{free_port()}/",
        **env_values,
    )
    code = f"""
        from bot.cli import main
        status = main([{command!r}])
        check_light()
        sys.exit(status)
    """
    done = run_without_torch(code, env)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
