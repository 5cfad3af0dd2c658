import logging
from pathlib import Path

import pytest

from core.errors import SettingsError
from core.settings import DEFAULT_PERSONA, Settings, read_dotenv


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_mapping({})
    assert settings.redis_url is None
    assert settings.model == ""
    assert settings.device == "auto"
    assert settings.persona == DEFAULT_PERSONA
    assert settings.slack_api_url == "https://slack.com/api/"
    assert settings.discord_api_url == "https://discord.com/api/v10"
    assert settings.discord_gateway_url == "wss://gateway.discord.gg/"
    assert not settings.slack_configured and not settings.discord_configured
    assert settings.batch_wait_ms == 0  # continuous batching takes late arrivals anyway


def test_values_are_parsed() -> None:
    settings = Settings.from_mapping(
        {
            "REDIS_URL": "redis://h:6380/2",
            "CHATBOT_DEVICE": "cuda:1",
            "CHATBOT_MAX_BATCH_SIZE": "4",
            "CHATBOT_RECLAIM_IDLE_S": "2.5",
            "CHATBOT_BATCH_WAIT_MS": "30",
            "CHATBOT_LOG_LEVEL": "debug",
            "DISCORD_TOKEN": "abc",
        }
    )
    assert settings.redis_url == "redis://h:6380/2"
    assert settings.device == "cuda:1"
    assert settings.max_batch_size == 4
    assert settings.reclaim_idle_s == 2.5
    assert settings.batch_wait_ms == 30
    assert settings.log_level == "DEBUG"
    assert settings.discord_configured


def test_unknown_chatbot_variable_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(
        SettingsError, match=r"CHATBOT_MAX_NEW_TOKEN \(did you mean CHATBOT_MAX_NEW_TOKENS\?\)"
    ):
        Settings.from_mapping({"CHATBOT_MAX_NEW_TOKEN": "10"})


def test_other_variables_are_ignored() -> None:
    assert Settings.from_mapping({"HOME": "/root", "PATH": "/bin"}).model == ""


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CHATBOT_MAX_NEW_TOKENS", "many", "not a whole number"),
        ("CHATBOT_MAX_NEW_TOKENS", "0", "greater than 0"),
        ("CHATBOT_DEVICE", "tpu", "auto, cpu, cuda or cuda:N"),
        ("CHATBOT_DTYPE", "int8", "not one of"),
        ("REDIS_URL", "localhost:6379", "must start with redis://"),
        ("DISCORD_GATEWAY_URL", "http://x", "ws://"),
        ("CHATBOT_NAMESPACE", "a b", "letters, digits"),
        ("CHATBOT_PERSONA", "   ", "empty"),
        ("CHATBOT_USER_RATE", "lots", "must look like 20/min"),
        ("CHATBOT_USER_RATE", "0/min", "must look like 20/min"),
        ("CHATBOT_BATCH_WAIT_MS", "-5", "must be 0 or more"),
        ("CHATBOT_BATCH_WAIT_MS", "soon", "not a whole number"),
    ],
)
def test_wrong_values_are_clear_errors(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as caught:
        Settings.from_mapping({name: value})
    if name != "CHATBOT_PERSONA":
        assert name in str(caught.value)


def test_reply_budget_must_fit_the_context() -> None:
    with pytest.raises(SettingsError, match="must be smaller than CHATBOT_CONTEXT_TOKENS"):
        Settings.from_mapping({"CHATBOT_MAX_NEW_TOKENS": "600", "CHATBOT_CONTEXT_TOKENS": "512"})


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# comment\n"
        "export CHATBOT_MAX_NEW_TOKENS=42\n"
        'CHATBOT_PERSONA="You help.\\nBe brief."\n'
        "CHATBOT_DEVICE=cpu  # trailing comment\n"
        "CHATBOT_MAX_BATCH_SIZE='3'\n"
    )
    settings = Settings.from_env({"CHATBOT_MAX_BATCH_SIZE": "5"}, dotenv)
    assert settings.max_new_tokens == 42
    assert settings.persona == "You help.\nBe brief."
    assert settings.device == "cpu"
    assert settings.max_batch_size == 5


def test_dotenv_typo_is_reported_too(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("CHATBOT_DEVISE=cpu\n")
    with pytest.raises(SettingsError, match="CHATBOT_DEVICE"):
        Settings.from_env({}, dotenv)


def test_dotenv_garbage_line_names_the_line(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("CHATBOT_DEVICE=cpu\nthis is not a setting\n")
    with pytest.raises(SettingsError, match=r"\.env:2"):
        read_dotenv(dotenv)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("20/min", (20, 60.0)), ("5 / s", (5, 1.0)), ("100/hour", (100, 3600.0))],
)
def test_user_rate_is_a_count_per_period(value: str, expected: tuple[int, float]) -> None:
    assert Settings.from_mapping({"CHATBOT_USER_RATE": value}).user_rate == expected


@pytest.mark.parametrize(("flag", "library_level"), [("off", logging.INFO), ("on", logging.NOTSET)])
def test_platform_request_bodies_are_logged_only_when_asked(flag: str, library_level: int) -> None:
    from bot.cli import PLATFORM_LOGGERS, _setup_logging

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    libraries = [logging.getLogger(name) for name in PLATFORM_LOGGERS]
    try:
        for library in libraries:
            library.setLevel(logging.NOTSET)
        settings = Settings.from_mapping(
            {"CHATBOT_LOG_LEVEL": "DEBUG", "CHATBOT_LOG_PLATFORM_BODIES": flag}
        )
        _setup_logging(settings, quiet_console=False)
        assert [library.level for library in libraries] == [library_level] * len(libraries)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for library in libraries:
            library.setLevel(logging.NOTSET)
