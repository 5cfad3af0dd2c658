"""Real Redis topologies on loopback for tests: a 3-master Redis Cluster, and a master with
a replica watched by three sentinels. Each server is a `redis-server` child process with
its data in a temporary directory; `stop()` ends them all."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from core.redis_server import free_port

SENTINEL_MASTER = "mymaster"
SENTINEL_PASSWORD = "sentinel-test-password"


def cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free too: 55535 at most."""
    while True:
        port = random.randint(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def have_redis_cli() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def wait_until(check: object, timeout_s: float, what: str) -> None:
    """Poll `check()` (sync) until true; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last error: {last})")


@dataclass
class Servers:
    """redis-server processes started for one test."""

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    by_name: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        data = self.root / name
        data.mkdir(parents=True, exist_ok=True)
        log = (data / "server.log").open("wb")
        process = subprocess.Popen(
            ["redis-server", *args], cwd=data, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(process)
        self.by_name[name] = process
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _server_args(port: int, data: Path) -> list[str]:
    return [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--daemonize",
        "no",
    ]


@dataclass
class Cluster:
    servers: Servers
    ports: list[int]

    @property
    def url(self) -> str:
        return cluster_url(self.ports)

    def role(self, port: int) -> str:
        return str(_replication(port)["role"])

    def primary_of(self, replica: int) -> int:
        return int(str(_replication(replica)["master_port"]))

    def kill(self, port: int) -> None:
        """SIGKILL a node: its replica takes over once the others deem it failed."""
        process = self.servers.by_name[f"node-{port}"]
        process.kill()
        process.wait()

    def replicas(self) -> list[int]:
        return [p for p in self.ports if self.role(p) == "slave"]

    def failover(self, replica: int) -> None:
        """A manual failover (CLUSTER FAILOVER): the replica takes over its primary's
        slots once it has caught up with it; the primary pauses its clients meanwhile."""
        client = redis.Redis(port=replica, decode_responses=True)
        try:
            client.execute_command("CLUSTER FAILOVER")
        finally:
            client.close()


def cluster_url(ports: list[int]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)


def start_cluster(
    root: Path,
    masters: int = 3,
    timeout_s: float = 60.0,
    ports: list[int] | None = None,
    replicas: int = 0,
) -> Cluster:
    """`masters` cluster primaries with `replicas` replicas each (on `ports`, else free
    ones), joined by `redis-cli --cluster create`, every slot served, replicas in sync."""
    servers = Servers(root)
    ports = ports or [cluster_port() for _ in range(masters * (1 + replicas))]
    try:
        for port in ports:
            data = root / f"node-{port}"
            data.mkdir(parents=True, exist_ok=True)
            servers.start(
                f"node-{port}",
                [
                    *_server_args(port, data),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(data / "nodes.conf"),
                    "--cluster-node-timeout",
                    "5000",
                ],
            )
        for port in ports:
            wait_until(lambda p=port: ping_port(p), timeout_s, f"cluster node {port} to start")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )
        for port in ports:
            wait_until(
                lambda p=port: _cluster_info(p).get("cluster_state") == "ok",
                timeout_s,
                f"cluster_state:ok on {port}",
            )
        cluster = Cluster(servers, ports)
        for port in cluster.replicas():
            wait_until(
                lambda p=port: _replication(p).get("master_link_status") == "up",
                timeout_s,
                f"replica {port} to be in sync",
            )
    except BaseException:
        servers.stop()
        raise
    return cluster


@dataclass
class SentinelSetup:
    servers: Servers
    master_port: int
    replica_ports: list[int]
    sentinel_ports: list[int]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://:{SENTINEL_PASSWORD}@{hosts}/{SENTINEL_MASTER}/0"

    def master_address(self) -> tuple[str, int]:
        client = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        try:
            host, port = client.sentinel_get_master_addr_by_name(SENTINEL_MASTER)
            return str(host), int(port)
        finally:
            client.close()

    def failover(self) -> None:
        client = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        try:
            client.execute_command("SENTINEL", "FAILOVER", SENTINEL_MASTER)
        finally:
            client.close()

    def data_client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=SENTINEL_PASSWORD, decode_responses=True)

    def role(self, port: int) -> str:
        client = self.data_client(port)
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()

    def wait_settled(self, timeout_s: float) -> None:
        """One master with its replica in sync, known to every sentinel."""
        master = self.master_address()

        def settled() -> bool:
            client = self.data_client(master[1])
            try:
                info = client.info("replication")
            finally:
                client.close()
            replicas_wanted = len(self.replica_ports)
            if info["role"] != "master" or int(info["connected_slaves"]) < replicas_wanted:
                return False
            for port in self.sentinel_ports:
                sentinel = redis.Redis(port=port, decode_responses=True)
                try:
                    replicas = sentinel.sentinel_slaves(SENTINEL_MASTER)
                    others = sentinel.sentinel_sentinels(SENTINEL_MASTER)
                    addr = sentinel.sentinel_get_master_addr_by_name(SENTINEL_MASTER)
                finally:
                    sentinel.close()
                if int(addr[1]) != master[1] or len(others) < len(self.sentinel_ports) - 1:
                    return False
                good = [
                    r
                    for r in replicas
                    if "s_down" not in str(r.get("flags", ""))
                    and r.get("master-link-status") == "ok"
                ]
                if len(good) < replicas_wanted:
                    return False
            return True

        wait_until(settled, timeout_s, "the sentinels to know the master and its replica")


def start_sentinel(
    root: Path,
    sentinels: int = 3,
    timeout_s: float = 60.0,
    min_replicas_to_write: int = 1,
    replicas: int = 1,
) -> SentinelSetup:
    """A master (password, AOF, `min-replicas-to-write 1`), its replicas, `sentinels`
    sentinels (quorum 2) that fail over after 2 s of silence."""
    servers = Servers(root)
    master = free_port()
    replica_ports = [free_port() for _ in range(replicas)]
    sentinel_ports = [free_port() for _ in range(sentinels)]
    # A master refuses writes while no replica is in sync: a demoted master then answers
    # NOREPLICAS instead of taking writes the failover would throw away.
    common = [
        "--requirepass",
        SENTINEL_PASSWORD,
        "--masterauth",
        SENTINEL_PASSWORD,
        "--min-replicas-to-write",
        str(min_replicas_to_write),
        "--min-replicas-max-lag",
        "10",
    ]
    try:
        follow = ["--replicaof", "127.0.0.1", str(master)]
        for port, extra in [(master, []), *((r, follow) for r in replica_ports)]:
            data = root / f"data-{port}"
            data.mkdir(parents=True, exist_ok=True)
            servers.start(f"data-{port}", [*_server_args(port, data), *common, *extra])
        for port in sentinel_ports:
            data = root / f"sentinel-{port}"
            data.mkdir(parents=True, exist_ok=True)
            config = data / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {data}\n"
                f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n"
                f"sentinel auth-pass {SENTINEL_MASTER} {SENTINEL_PASSWORD}\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 2000\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
                f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
            )
            servers.start(f"sentinel-{port}", [str(config), "--sentinel"])
        setup = SentinelSetup(servers, master, replica_ports, sentinel_ports)
        setup.wait_settled(timeout_s)
    except BaseException:
        servers.stop()
        raise
    return setup


def ping_port(port: int) -> bool:
    client = redis.Redis(port=port, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _replication(port: int) -> dict[str, object]:
    client = redis.Redis(port=port, decode_responses=True)
    try:
        return dict(client.info("replication"))
    finally:
        client.close()


def _cluster_info(port: int) -> dict[str, str]:
    client = redis.Redis(port=port, decode_responses=True)
    try:
        raw = client.execute_command("CLUSTER INFO")
    finally:
        client.close()
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    return dict(line.split(":", 1) for line in str(raw).split() if ":" in line)
