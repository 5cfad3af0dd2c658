"""One settings object, read once at the entry point from the environment and `.env`.

Every `CHATBOT_*` variable must be known: a typo is an error at start-up, never a silent
default. Values are validated here so that a process fails before it loads a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import SettingsError
from core.redis_url import parse_redis_url

# Kept short and concrete: the bundled 135M model echoes long lists of prohibitions back at
# the customer ("as an AI I don't have personal data…"). Facts come from the knowledge base.
DEFAULT_PERSONA = (
    "You are a friendly customer-service assistant. Answer the customer's question in two "
    "or three short, polite sentences. If you are not sure of the answer, say so and offer "
    "to connect them with a human agent."
)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def _whole_number(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        bound = "greater than 0" if minimum == 1 else f"{minimum} or more"
        raise SettingsError(f"{name}={raw!r} must be {bound}")
    return value


def _positive_int(name: str, raw: str) -> int:
    return _whole_number(name, raw, 1)


def _non_negative_int(name: str, raw: str) -> int:
    return _whole_number(name, raw, 0)


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise SettingsError(f"{name}={raw!r} must be greater than 0")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip()
        if value.upper() in choices:
            return value.upper()
        if value.lower() in choices:
            return value.lower()
        raise SettingsError(f"{name}={raw!r} is not one of: {', '.join(choices)}")

    return parse


def _device(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if not DEVICE_PATTERN.match(value):
        raise SettingsError(f"{name}={raw!r} must be auto, cpu, cuda or cuda:N")
    return value


def _redis_url(name: str, raw: str) -> str:
    return parse_redis_url(raw, name).url  # one Redis, Sentinel or Cluster (core.redis_url)


def _http_url(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.match(r"^https?://", value):
        raise SettingsError(f"{name}={raw!r} must start with http:// or https://")
    return value


def _optional_http_url(name: str, raw: str) -> str | None:
    return _http_url(name, raw) if raw.strip() else None


def _ws_url(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.match(r"^wss?://", value):
        raise SettingsError(f"{name}={raw!r} must start with ws:// or wss://")
    return value


def _namespace(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", value):
        raise SettingsError(f"{name}={raw!r} may hold only letters, digits, '_', '.', '-'")
    return value


def _unit_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise SettingsError(f"{name}={raw!r} must be between 0 and 1")
    return value


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|min|minute|h|hour)\s*$", re.IGNORECASE)
_PERIOD_S = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def _rate(name: str, raw: str) -> tuple[int, float]:
    match = _RATE.match(raw)
    if not match or int(match.group(1)) < 1:
        raise SettingsError(f"{name} must look like 20/min (also /s, /h), not {raw!r}")
    return int(match.group(1)), float(_PERIOD_S[match.group(2).lower()])


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
        raise SettingsError(f"{name} must be on or off, not {raw!r}")
    return value in ("on", "true", "1", "yes")


def _text(name: str, raw: str) -> str:
    return raw


def _secret(name: str, raw: str) -> str | None:
    return raw.strip() or None


MIN_WATERMARK_KEY_CHARS = 16


def _watermark_key(name: str, raw: str) -> str | None:
    key = raw.strip()
    if key and len(key) < MIN_WATERMARK_KEY_CHARS:
        raise SettingsError(
            f"{name} is {len(key)} characters; use a random secret of at least "
            f"{MIN_WATERMARK_KEY_CHARS} (for example the output of `openssl rand -hex 32`)"
        )
    return key or None


def _port(name: str, raw: str) -> int | None:
    value = raw.strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise SettingsError(f"{name}={raw!r} must be a port number from 1 to 65535")
    return int(value)


def _env(name: str, parse: Callable[[str, str], Any] = _text, **kwargs: Any) -> Any:
    """A dataclass field read from environment variable `name`, converted by `parse`."""
    metadata = {"env": name, "parse": parse}
    return field(metadata=metadata, **kwargs)


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = _env("REDIS_URL", _redis_url, default=None)
    model: str = _env("CHATBOT_MODEL", default="")
    device: str = _env("CHATBOT_DEVICE", _device, default="auto")
    dtype: str = _env("CHATBOT_DTYPE", _choice(DTYPES), default="auto")
    persona: str = _env("CHATBOT_PERSONA", default=DEFAULT_PERSONA)
    max_new_tokens: int = _env("CHATBOT_MAX_NEW_TOKENS", _positive_int, default=160)
    context_tokens: int = _env("CHATBOT_CONTEXT_TOKENS", _positive_int, default=2048)
    history_max_messages: int = _env("CHATBOT_HISTORY_MAX_MESSAGES", _positive_int, default=50)
    history_ttl_s: int = _env("CHATBOT_HISTORY_TTL_S", _positive_int, default=30 * 24 * 3600)
    max_message_chars: int = _env("CHATBOT_MAX_MESSAGE_CHARS", _positive_int, default=4000)
    max_batch_size: int = _env("CHATBOT_MAX_BATCH_SIZE", _positive_int, default=16)
    batch_wait_ms: int = _env("CHATBOT_BATCH_WAIT_MS", _non_negative_int, default=0)
    # An OpenAI-compatible server to generate with, instead of a model of the worker's own.
    engine_url: str | None = _env("CHATBOT_ENGINE_URL", _optional_http_url, default=None)
    engine_model: str = _env("CHATBOT_ENGINE_MODEL", default="")
    engine_api_key: str | None = _env("CHATBOT_ENGINE_API_KEY", _secret, default=None)
    # Locally generated text carries a statistical watermark keyed by this secret.
    watermark_key: str | None = _env("CHATBOT_WATERMARK_KEY", _watermark_key, default=None)
    # Replies appear as they are generated ("on") or when complete ("off").
    streaming: bool = _env("CHATBOT_STREAMING", _flag, default=True)
    max_deliveries: int = _env("CHATBOT_MAX_DELIVERIES", _positive_int, default=3)
    reclaim_idle_s: float = _env("CHATBOT_RECLAIM_IDLE_S", _positive_float, default=30.0)
    lock_ttl_s: float = _env("CHATBOT_LOCK_TTL_S", _positive_float, default=20.0)
    reply_timeout_s: float = _env("CHATBOT_REPLY_TIMEOUT_S", _positive_float, default=300.0)
    # Messages one user may send (count, per seconds); past it they are told, not queued.
    user_rate: tuple[int, float] = _env("CHATBOT_USER_RATE", _rate, default=(20, 60.0))
    # Back-pressure: past this many jobs waiting, new messages get "we're very busy".
    max_queued_jobs: int = _env("CHATBOT_MAX_QUEUED_JOBS", _positive_int, default=10_000)
    namespace: str = _env("CHATBOT_NAMESPACE", _namespace, default="chatbot")
    data_dir: Path = _env("CHATBOT_DATA_DIR", lambda n, r: Path(r), default=Path(".chatbot"))
    cache_dir: Path = _env(
        "CHATBOT_CACHE_DIR",
        lambda n, r: Path(r),
        default_factory=lambda: Path.home() / ".cache" / "chatbot",
    )
    log_level: str = _env("CHATBOT_LOG_LEVEL", _choice(LOG_LEVELS), default="INFO")
    # "json": one object per line, with the conversation and job ids where known.
    log_format: str = _env("CHATBOT_LOG_FORMAT", _choice(LOG_FORMATS), default="text")
    # /metrics, /healthz and /readyz on this port (core/probes.py); unset: none.
    metrics_port: int | None = _env("CHATBOT_METRICS_PORT", _port, default=None)
    # At DEBUG, slack_sdk and discord.py log request and response bodies (customers'
    # messages, tokens in URLs): only when asked for, on top of CHATBOT_LOG_LEVEL=DEBUG.
    log_platform_bodies: bool = _env("CHATBOT_LOG_PLATFORM_BODIES", _flag, default=False)
    slack_bot_token: str | None = _env("SLACK_BOT_TOKEN", _secret, default=None)
    slack_signing_secret: str | None = _env("SLACK_SIGNING_SECRET", _secret, default=None)
    slack_app_token: str | None = _env("SLACK_APP_TOKEN", _secret, default=None)
    slack_api_url: str = _env("SLACK_API_URL", _http_url, default="https://slack.com/api/")
    discord_token: str | None = _env("DISCORD_TOKEN", _secret, default=None)
    discord_api_url: str = _env("DISCORD_API_URL", _http_url, default="https://discord.com/api/v10")
    discord_gateway_url: str = _env(
        "DISCORD_GATEWAY_URL", _ws_url, default="wss://gateway.discord.gg/"
    )
    # Customer service: the knowledge base, when to decline, who takes over. Workspaces can
    # override kb, persona and support contacts (`chatbot workspace set`).
    kb: str = _env("CHATBOT_KB", _namespace, default="default")
    # Measured with bench/evaluate_kb.py on examples/ (balanced accuracy, see README).
    kb_min_score: float = _env("CHATBOT_KB_MIN_SCORE", _unit_float, default=0.3)
    support_channel: str = _env("CHATBOT_SUPPORT_CHANNEL", default="")
    support_mention: str = _env("CHATBOT_SUPPORT_MENTION", default="")
    # "open": every Slack workspace and Discord guild that adds the bot is served; "listed":
    # only those given settings with `chatbot workspace set` (Discord DMs: workspace "dm").
    workspaces: str = _env("CHATBOT_WORKSPACES", _choice(("open", "listed")), default="open")

    def __post_init__(self) -> None:
        if self.max_new_tokens >= self.context_tokens:
            raise SettingsError(
                f"CHATBOT_MAX_NEW_TOKENS ({self.max_new_tokens}) must be smaller than "
                f"CHATBOT_CONTEXT_TOKENS ({self.context_tokens})"
            )
        if not self.persona.strip():
            raise SettingsError("CHATBOT_PERSONA is empty: unset it to use the default persona")

    @property
    def slack_configured(self) -> bool:
        return bool(self.slack_bot_token and (self.slack_signing_secret or self.slack_app_token))

    @property
    def discord_configured(self) -> bool:
        return bool(self.discord_token)

    @classmethod
    def env_names(cls) -> dict[str, dataclasses.Field[Any]]:
        return {f.metadata["env"]: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")
    ) -> Settings:
        """Settings from `.env` (if present) overlaid by the process environment."""
        values: dict[str, str] = {}
        if dotenv is not None and dotenv.is_file():
            values.update(read_dotenv(dotenv))
        values.update(os.environ if environ is None else environ)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Settings:
        known = cls.env_names()
        values = with_secret_files(values, known)
        unknown = sorted(k for k in values if k.startswith("CHATBOT_") and k not in known)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, list(known), n=1)
                hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
            raise SettingsError(
                "unknown setting(s): "
                + ", ".join(hints)
                + ". Known CHATBOT_* settings: "
                + ", ".join(sorted(k for k in known if k.startswith("CHATBOT_")))
            )
        kwargs: dict[str, Any] = {}
        for env_name, f in known.items():
            if env_name in values:
                kwargs[f.name] = f.metadata["parse"](env_name, values[env_name])
        return cls(**kwargs)


SECRET_FILE_SUFFIX = "_FILE"


def with_secret_files(values: Mapping[str, str], known: Mapping[str, object]) -> dict[str, str]:
    """`values` with each NAME_FILE of a setting NAME replaced by NAME = the file's content
    (a trailing newline dropped): Docker and Kubernetes secrets and systemd credentials
    arrive as files. Other `*_FILE` variables (SSL_CERT_FILE, …) are left alone; a
    `CHATBOT_*_FILE` naming no setting stays, to be refused as unknown like any typo."""
    resolved = dict(values)
    for variable, path in values.items():
        name = variable.removesuffix(SECRET_FILE_SUFFIX)
        if name == variable or name not in known:
            continue
        if name in values:
            raise SettingsError(f"both {name} and {variable} are set: keep one")
        try:
            resolved[name] = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise SettingsError(f"{variable}={path}: cannot read it ({why})") from None
        del resolved[variable]
    return resolved


_DOTENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, optional quotes, `#` comments."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _DOTENV_LINE.match(line)
        if not match:
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {line.strip()!r}")
        key, raw = match.groups()
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
            raw = raw[1:-1]
            if match.group(2).startswith('"'):
                raw = raw.replace("\\n", "\n").replace('\\"', '"')
        else:
            raw = re.sub(r"\s+#.*$", "", raw)
        values[key] = raw
    return values
