from pathlib import Path

import pytest
import redis

from core.errors import RedisServerError
from core.redis_server import RedisServer


def test_embedded_server_keeps_data_across_restarts(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "data")
    server.start()
    try:
        redis.Redis.from_url(server.url).set("k", "v")
        server.stop()
        server.start()
        assert redis.Redis.from_url(server.url).get("k") == b"v"
    finally:
        server.stop()


def test_two_servers_never_share_a_data_directory(tmp_path: Path) -> None:
    first = RedisServer(tmp_path / "data")
    first.start()
    try:
        with pytest.raises(RedisServerError, match="already uses"):
            RedisServer(tmp_path / "data").start()
    finally:
        first.stop()
    second = RedisServer(tmp_path / "data")  # free again once the first has stopped
    second.start()
    second.stop()


def test_a_taken_port_is_reported_with_the_servers_own_words(tmp_path: Path) -> None:
    first = RedisServer(tmp_path / "a")
    first.start()
    try:
        with pytest.raises(RedisServerError, match="exited at start"):
            RedisServer(tmp_path / "b", port=first.port).start()
    finally:
        first.stop()


def test_the_embedded_server_wants_its_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "data")
    server.start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert redis.Redis.from_url(server.url).ping()
        assert ((tmp_path / "data" / "password").stat().st_mode & 0o777) == 0o600
    finally:
        server.stop()
