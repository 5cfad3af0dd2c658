"""Start-up checks of the Redis server's configuration: warnings, never failures.

The job and outbox streams are the service's state, not a cache: an eviction policy other
than `noeviction` may drop them under memory pressure, and a Redis without persistence
loses them on restart. Managed Redis services often refuse CONFIG GET; then the check says
that it could not look, and the service starts anyway.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ResponseError

from core.redis_conn import TRANSIENT_ERRORS, Redis, is_cluster

log = logging.getLogger(__name__)


async def server_config_findings(redis: Redis) -> list[str]:
    """One line per problem found (or per server that could not be checked)."""
    findings = []
    behind_sentinel = not is_cluster(redis) and bool(
        getattr(redis.connection_pool, "service_name", None)
    )
    for where, config in await _configs(redis):
        if config is None:
            findings.append(
                f"could not check the configuration of Redis at {where}: CONFIG GET is "
                "refused (managed Redis?); make sure maxmemory-policy is noeviction and "
                "persistence (AOF) is on"
            )
            continue
        policy = config.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            findings.append(
                f"Redis at {where} has maxmemory-policy {policy}, not noeviction: under "
                "memory pressure it may evict the job and outbox streams, which are the "
                "service's state (set maxmemory-policy noeviction)"
            )
        if config.get("appendonly", "no") != "yes" and not config.get("save", "").strip():
            findings.append(
                f"Redis at {where} has persistence off (appendonly no, no save points): "
                "a restart of Redis loses every queued message and conversation (set "
                "appendonly yes)"
            )
        if behind_sentinel and config.get("min-replicas-to-write", "0") == "0":
            findings.append(
                f"Redis at {where} (behind Sentinel) has min-replicas-to-write 0: in a "
                "failover the old master keeps taking writes that are then thrown away, so "
                "messages can be lost and replies posted twice (set min-replicas-to-write 1 "
                "with one replica: writes then wait out a failover instead of being lost)"
            )
    return findings


async def log_server_config(redis: Redis) -> None:
    """Log the findings as warnings; Redis unreachable here is left to the caller's retry."""
    try:
        findings = await server_config_findings(redis)
    except TRANSIENT_ERRORS as exc:
        log.warning("could not check the Redis configuration (%s: %s)", type(exc).__name__, exc)
        return
    for line in findings:
        log.warning("%s", line)


async def _configs(redis: Redis) -> list[tuple[str, dict[str, str] | None]]:
    """(server, its settings; None when CONFIG GET is refused) for each primary."""
    names = ("maxmemory-policy", "appendonly", "save", "min-replicas-to-write")
    if is_cluster(redis):
        cluster: Any = redis
        found = []
        for node in cluster.get_primaries():
            found.append((str(node.name), await _config(cluster, names, target_nodes=node)))
        return found
    where = _address(redis)
    return [(where, await _config(redis, names))]


async def _config(redis: Any, names: tuple[str, ...], **route: Any) -> dict[str, str] | None:
    values: dict[str, str] = {}
    try:
        for name in names:
            got = await redis.config_get(name, **route)
            values.update({str(k): str(v) for k, v in dict(got).items()})
    except ResponseError as exc:  # unknown command, NOPERM: a managed Redis
        log.debug("CONFIG GET refused: %s", exc)
        return None
    return values


def _address(redis: Redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    service = getattr(redis.connection_pool, "service_name", None)
    if service:  # behind Sentinel: the master's address changes with failovers
        return f"the master {service}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
