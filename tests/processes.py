"""Running the real `chatbot` command in subprocesses, for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# A persona of its own makes the bot a chat model (the default support assistant answers only
# from a knowledge base): for tests of the bundled model's generation through the commands.
CHAT_PERSONA = {"CHATBOT_PERSONA": "You are a friendly support chat model. Reply briefly."}


def chatbot_env(**values: str) -> dict[str, str]:
    """The current environment without any CHATBOT_/REDIS_ settings, plus `values`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHATBOT_", "REDIS_", "SLACK_", "DISCORD_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO)
    env.update(values)
    return env


def chatbot(
    args: list[str], env: dict[str, str], cwd: Path, **kwargs: Any
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", *args],
        env=env,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )
