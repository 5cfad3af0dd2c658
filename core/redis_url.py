"""`REDIS_URL`, parsed: one Redis, a Sentinel-managed master, or a Redis Cluster.

    redis://[user:pass@]host:port/DB      rediss://…      unix:///path/to/socket
    redis+sentinel://[user:pass@]host:port[,host:port…]/MASTER[/DB]
    redis+cluster://[user:pass@]host:port[,host:port…]

The sentinel form lists the sentinels (port 26379 when left out) and names the master they
watch; the user and password are the master's (sentinels are reached without them). The
cluster form lists some of the cluster's nodes (port 6379 when left out); the client finds
the others. Pure parsing, so that settings can validate the URL before anything connects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote

from core.errors import SettingsError

SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_CLUSTER_PORT = 6379
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d+))?$")
_MASTER = re.compile(r"^[A-Za-z0-9_.-]+$")


class Topology(StrEnum):
    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclass(frozen=True)
class RedisTarget:
    topology: Topology
    url: str  # as given (a single Redis connects with it as is)
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster start-up nodes
    master: str = ""  # the sentinels' name of the master
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_redis_url(url: str, name: str = "REDIS_URL") -> RedisTarget:
    """Raises SettingsError naming what is wrong (the password never appears in it)."""
    value = url.strip()
    shown = _masked(value)
    if value.startswith(PLAIN_SCHEMES):
        return RedisTarget(Topology.SINGLE, value)
    if value.startswith(SENTINEL_SCHEME):
        topology, default_port = Topology.SENTINEL, DEFAULT_SENTINEL_PORT
        rest = value[len(SENTINEL_SCHEME) :]
    elif value.startswith(CLUSTER_SCHEME):
        topology, default_port = Topology.CLUSTER, DEFAULT_CLUSTER_PORT
        rest = value[len(CLUSTER_SCHEME) :]
    else:
        raise SettingsError(
            f"{name}={shown!r} must start with redis://, rediss://, unix://, "
            f"{SENTINEL_SCHEME} or {CLUSTER_SCHEME}"
        )
    if "?" in rest or "#" in rest:
        raise SettingsError(f"{name}={shown!r}: query parameters are not supported here")
    authority, _, path = rest.partition("/")
    username, password, hosts = _credentials(authority)
    nodes = tuple(_node(name, shown, host, default_port) for host in hosts.split(","))
    parts = path.split("/") if path else []
    if topology is Topology.CLUSTER:
        if parts not in ([], [""], ["0"]):
            raise SettingsError(
                f"{name}={shown!r}: a cluster URL has no path (Redis Cluster has only "
                "database 0): redis+cluster://host:port[,host:port…]"
            )
        return RedisTarget(topology, value, nodes, username=username, password=password)
    if not parts or not parts[0]:
        raise SettingsError(
            f"{name}={shown!r} names no master: redis+sentinel://host:port[,host:port…]"
            "/MASTER[/DB], MASTER as the sentinels know it (e.g. mymaster)"
        )
    if len(parts) > 2 or not _MASTER.match(parts[0]):
        raise SettingsError(
            f"{name}={shown!r}: after the sentinels comes /MASTER or /MASTER/DB, not /{path}"
        )
    db = 0
    if len(parts) == 2 and parts[1] != "":
        if not parts[1].isdigit():
            raise SettingsError(f"{name}={shown!r}: the database {parts[1]!r} is not a number")
        db = int(parts[1])
    return RedisTarget(topology, value, nodes, parts[0], db, username, password)


def _credentials(authority: str) -> tuple[str | None, str | None, str]:
    userinfo, at, hosts = authority.rpartition("@")
    if not at:
        return None, None, authority
    user, colon, password = userinfo.partition(":")
    if not colon:  # `pass@host`, as some tools write it
        return None, unquote(user) or None, hosts
    return unquote(user) or None, unquote(password) or None, hosts


def _node(name: str, shown: str, host: str, default_port: int) -> tuple[str, int]:
    found = _HOST.match(host)
    if not found:
        why = "an empty host" if not host else f"{host!r} is not host:port"
        raise SettingsError(f"{name}={shown!r}: {why} (hosts are separated by commas)")
    port = int(found.group(2)) if found.group(2) else default_port
    if not 1 <= port <= 65535:
        raise SettingsError(f"{name}={shown!r}: port {port} of {host!r} is out of range")
    return found.group(1).strip("[]"), port


def _masked(url: str) -> str:
    return re.sub(r"(://[^/@]*:)[^@/]*@", r"\1***@", url)
