"""REDIS_URL for Sentinel and Cluster, the start-up checks of the server's configuration,
and the whole pipeline (inbound, worker, outbox, adapter) on a real 3-master Redis Cluster
and through a real Sentinel failover, every message answered exactly once."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError

from bot.outbox import OutboxConsumer, PostedParts
from core.conversation import ConversationKey, Reply
from core.errors import SettingsError
from core.generation.transformers_engine import TransformersEngine
from core.health import check_health
from core.inbound import Outcome, submit_user_message
from core.jobs import JobQueue
from core.keys import Keys
from core.knowledge.store import KnowledgeBaseStore
from core.redis_checks import log_server_config, server_config_findings
from core.redis_conn import Redis, connect, stream_read_keys, with_retry
from core.redis_server import free_port
from core.redis_url import Topology, parse_redis_url
from core.settings import Settings
from core.store import ConversationStore
from core.support.feedback import Feedback, read_stats
from core.worker import Worker
from tests.helpers import wait_for
from tests.processes import chatbot, chatbot_env
from tests.redis_topologies import (
    Servers,
    cluster_port,
    cluster_url,
    ping_port,
    start_cluster,
    start_sentinel,
    wait_until,
)

log = logging.getLogger(__name__)

# -- REDIS_URL ---------------------------------------------------------------------------


def test_sentinel_and_cluster_urls_are_parsed() -> None:
    target = parse_redis_url("redis+sentinel://u:p%40ss@10.0.0.1:26379,h2,[::1]:5/mymaster/3")
    assert target.topology is Topology.SENTINEL
    assert target.nodes == (("10.0.0.1", 26379), ("h2", 26379), ("::1", 5))
    assert (target.master, target.db, target.username, target.password) == (
        "mymaster",
        3,
        "u",
        "p@ss",
    )
    assert parse_redis_url("redis+sentinel://s1:1/m").db == 0
    cluster = parse_redis_url("redis+cluster://:secret@n1:7000,n2")
    assert cluster.topology is Topology.CLUSTER
    assert cluster.nodes == (("n1", 7000), ("n2", 6379))
    assert (cluster.username, cluster.password) == (None, "secret")
    assert parse_redis_url("redis://localhost:6379/0").topology is Topology.SINGLE
    assert parse_redis_url("unix:///run/redis.sock").topology is Topology.SINGLE


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "names no master"),
        ("redis+sentinel://s1:26379/", "names no master"),
        ("redis+sentinel://s1:26379/my master", "/MASTER or /MASTER/DB"),
        ("redis+sentinel://s1:26379/m/x", "the database 'x' is not a number"),
        ("redis+sentinel://s1:26379/m/1/2", "/MASTER or /MASTER/DB"),
        ("redis+sentinel://s1:26379,,s2/m", "an empty host"),
        ("redis+sentinel://s1:99999/m", "port 99999"),
        ("redis+sentinel://s1:2x/m", "'s1:2x' is not host:port"),
        ("redis+cluster://n1:7000/2", "a cluster URL has no path"),
        ("redis+cluster://n1:7000?ssl=1", "query parameters are not supported"),
        ("redis+cluster://:hunter2@", "an empty host"),
        ("sentinel://s1/m", "must start with redis://, rediss://, unix://"),
    ],
)
def test_a_malformed_url_is_a_precise_settings_error(url: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("?", r"\?")) as raised:
        Settings.from_mapping({"REDIS_URL": url})
    assert "REDIS_URL=" in str(raised.value)
    assert "hunter2" not in str(raised.value)  # the password is masked


def test_connect_builds_the_client_of_each_topology() -> None:
    from redis.asyncio.cluster import RedisCluster

    sentinel = connect("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/mymaster/2")
    pool = sentinel.connection_pool
    assert getattr(pool, "service_name", None) == "mymaster"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "pw"
    assert isinstance(connect("redis+cluster://127.0.0.1:1"), RedisCluster)
    with pytest.raises(SettingsError):
        connect("redis+cluster://")


# -- start-up checks ------------------------------------------------------------------------


async def test_config_check_is_quiet_on_the_embedded_server(redis_server: Any) -> None:
    client = connect(redis_server.url)
    try:
        assert await server_config_findings(client) == []
    finally:
        await client.aclose()


async def test_config_check_warns_about_eviction_and_no_persistence(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    servers = Servers(tmp_path)
    evicting, no_config = free_port(), free_port()
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    servers.start("evicting", ["--port", str(evicting), *base, "--maxmemory-policy", "allkeys-lru"])
    servers.start("no-config", ["--port", str(no_config), *base, "--rename-command", "CONFIG", ""])
    try:
        for port in (evicting, no_config):
            wait_until(lambda p=port: ping_port(p), 30, f"the server on {port} to start")
        clients = [connect(f"redis://127.0.0.1:{p}/0") for p in (evicting, no_config)]
        findings = await server_config_findings(clients[0])
        assert len(findings) == 2
        assert "maxmemory-policy allkeys-lru, not noeviction" in findings[0]
        assert f"127.0.0.1:{evicting}" in findings[0]
        assert "persistence off (appendonly no, no save points)" in findings[1]
        with caplog.at_level(logging.WARNING, logger="core.redis_checks"):
            await log_server_config(clients[1])  # CONFIG renamed away: said, not fatal
        assert "could not check the configuration of Redis" in caplog.text
        assert "CONFIG GET is refused" in caplog.text
        for client in clients:
            await client.aclose()
    finally:
        servers.stop()


# -- the pipeline on a topology -------------------------------------------------------------


@dataclass
class Traffic:
    """Conversations whose users each send `rounds` messages, one after the other, each
    once the last was answered; what the adapter posted, and when."""

    conversations: list[ConversationKey]
    rounds: int
    posted: list[Reply] = field(default_factory=list)
    posted_at: dict[str, float] = field(default_factory=dict)  # reply_to -> first post
    post_times: list[float] = field(default_factory=list)
    sent_at: dict[str, float] = field(default_factory=dict)  # message id -> submitted
    unanswered: list[str] = field(default_factory=list)

    def message_id(self, conversation: int, round_: int) -> str:
        return f"c{conversation}-m{round_}"

    @property
    def messages(self) -> int:
        return len(self.conversations) * self.rounds

    async def post(self, reply: Reply, parts: PostedParts) -> None:
        """The platform: a reply whose part is recorded already is not posted again."""
        if 0 in parts.done:
            return
        self.posted.append(reply)
        self.post_times.append(time.monotonic())
        self.posted_at.setdefault(reply.reply_to, time.monotonic())
        await parts.record(0, f"posted-{len(self.posted)}")

    async def user(self, index: int, redis: Redis, settings: Settings, timeout_s: float) -> None:
        keys = Keys(settings.namespace)
        store = ConversationStore.from_settings(redis, settings)
        queue = JobQueue(redis, keys)
        conversation = self.conversations[index]
        for round_ in range(self.rounds):
            message_id = self.message_id(index, round_)
            self.sent_at[message_id] = time.monotonic()
            submission = await submit_user_message(
                store,
                queue,
                conversation,
                text=f"question {round_} of user {index}",
                author_id=f"user{index}",
                author_name=f"User {index}",
                message_id=message_id,
                max_chars=settings.max_message_chars,
                give_up_after_s=timeout_s,
            )
            assert submission.outcome is Outcome.QUEUED, submission

            async def answered(mid: str = message_id) -> bool:
                return mid in self.posted_at

            try:
                await wait_for(answered, timeout_s=timeout_s, what=f"the reply to {message_id}")
            except AssertionError:
                self.unanswered.append(message_id)
                return

    def duplicates(self) -> int:
        per_message = Counter(r.reply_to for r in self.posted)
        per_reply = Counter(r.reply_id for r in self.posted)
        twice = [n - 1 for n in [*per_message.values(), *per_reply.values()]]
        return sum(twice)

    def assert_each_answered_once(self) -> None:
        expected = {
            self.message_id(c, r)
            for c in range(len(self.conversations))
            for r in range(self.rounds)
        }
        per_message = Counter(r.reply_to for r in self.posted)
        assert self.unanswered == []
        assert set(per_message) == expected
        assert self.duplicates() == 0, per_message.most_common(3)


class Pipeline:
    """A worker and an adapter's outbox consumer in this process, each with its own client
    (as separate processes would have), and a client for the users' side."""

    def __init__(self, url: str, settings: Settings, engine: TransformersEngine, platform: str):
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.worker_redis, self.adapter_redis, self.users_redis = (connect(url) for _ in "wau")
        self.worker = Worker(self.worker_redis, settings, engine)
        self.platform = platform
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, traffic: Traffic) -> OutboxConsumer:
        consumer = OutboxConsumer(
            self.adapter_redis, self.keys, self.platform, traffic.post, reclaim_idle_s=2
        )
        await consumer.ensure_group()  # before any reply: a new group starts at "$"
        self.tasks = [asyncio.create_task(self.worker.run()), asyncio.create_task(consumer.run())]
        self.consumer = consumer
        return consumer

    async def stop(self) -> None:
        self.worker.stop()
        if self.tasks:
            self.consumer.stop()
            await asyncio.wait_for(asyncio.gather(*self.tasks), 120)
        for client in (self.worker_redis, self.adapter_redis, self.users_redis):
            await client.aclose()


def topology_settings(make_settings: Any, url: str) -> Settings:
    settings: Settings = make_settings(
        REDIS_URL=url,
        CHATBOT_USER_RATE="600/min",
        CHATBOT_RECLAIM_IDLE_S="3",
        CHATBOT_LOCK_TTL_S="3",
    )
    return settings


def conversations_on_every_node(cluster: Any, keys: Keys, wanted: int) -> list[ConversationKey]:
    """`wanted` conversations spread over the cluster's primaries (each node gets some)."""
    found: list[ConversationKey] = []
    nodes: Counter[str] = Counter()
    n = 0
    primaries = len(cluster.get_primaries())
    while len(found) < wanted or len(nodes) < primaries:
        conversation = ConversationKey("slack", "T1", f"C{n}", f"thread-{n}")
        node = cluster.get_node_from_key(keys.history(conversation)).name
        n += 1
        if len(found) >= wanted and node in nodes:
            continue
        found.append(conversation)
        nodes[node] += 1
    return found


async def test_stream_reads_need_no_node_to_find_their_keys(tmp_path: Path) -> None:
    """redis-py asks one node for the keys of every XREADGROUP (COMMAND GETKEYS), the node it
    chose when it last read the topology, and keeps asking it after it died: a primary
    SIGKILLed left consumers failing for minutes. Our client finds those keys itself, and
    for other such commands moves the question to a live node after one failure."""
    cluster = start_cluster(tmp_path / "cluster")
    redis: Any = connect(cluster.url)
    try:
        assert stream_read_keys(
            "XREADGROUP",
            ("GROUP", "streams", "c", "BLOCK", 10, "STREAMS", "{t}a", "{t}b", ">", ">"),
        ) == [
            "{t}a",
            "{t}b",
        ]
        assert stream_read_keys("XADD", ("STREAMS", "*", "k", "v")) == []
        await redis.xgroup_create("{t}jobs", "workers", id="0", mkstream=True)
        await redis.xadd("{t}jobs", {"n": "1"})
        await redis.rpush("{t}list", 3, 1)
        gone = ClusterNode("127.0.0.1", free_port())  # nothing listens there
        redis.commands_parser.node = gone
        read = await redis.xreadgroup("workers", "w1", {"{t}jobs": ">"}, count=1, block=100)
        assert read[0][1][0][1] == {"n": "1"}
        assert await redis.xread({"{t}jobs": "0"}, count=1)
        # SORT … STORE's keys are found by asking a node: the dead one fails once, then a
        # live one answers
        with pytest.raises(RedisConnectionError):
            await redis.sort("{t}list", store="{t}sorted")
        assert redis.commands_parser.node is not gone
        assert await redis.sort("{t}list", store="{t}sorted") == 2
    finally:
        await redis.aclose()
        cluster.servers.stop()


@pytest.mark.slow
async def test_cluster_pipeline_across_slots_and_operator_scans(
    tmp_path: Path,
    make_settings: Any,
    tiny_engine: TransformersEngine,
    embedder: Any,
    namespace: str,
) -> None:
    ports = [cluster_port() for _ in range(3)]
    early = connect(cluster_url(ports))  # a client of a cluster not up yet: it waits
    with pytest.raises(RedisConnectionError, match="Redis Cluster cannot be connected"):
        await early.ping()
    cluster = start_cluster(tmp_path / "cluster", ports=ports)
    try:
        assert await with_retry(
            "waiting for the cluster", early.ping, give_up_at=time.monotonic() + 30
        )
        await early.aclose()
        settings = topology_settings(make_settings, cluster.url)
        keys = Keys(settings.namespace)
        pipeline = Pipeline(cluster.url, settings, tiny_engine, "slack")
        redis: Any = pipeline.users_redis  # a RedisCluster
        try:
            await redis.ping()
            conversations = conversations_on_every_node(redis, keys, 9)
            slots = {redis.keyslot(keys.history(c)) for c in conversations}
            assert len(slots) == len(conversations)  # every conversation in a slot of its own
            traffic = Traffic(conversations, rounds=3)
            await pipeline.start(traffic)
            started = time.monotonic()
            await asyncio.gather(
                *(traffic.user(i, redis, settings, 120) for i in range(len(conversations)))
            )
            elapsed_s = time.monotonic() - started
            traffic.assert_each_answered_once()
            log.warning(
                "cluster: %d messages in %d conversations on %d slots, %.1f s, "
                "%d duplicates, %d unanswered",
                traffic.messages,
                len(conversations),
                len(slots),
                elapsed_s,
                traffic.duplicates(),
                len(traffic.unanswered),
            )

            # A rating: the conversation's slot and the workspace's counters.
            feedback = Feedback(redis, keys, settings.history_ttl_s)
            first = traffic.posted[0]
            assert await feedback.rate(first.reply_id, "user0", helpful=True)
            assert await feedback.rate(first.reply_id, "user0", helpful=False)
            stats = (await read_stats(redis, keys, "slack")).counts
            assert stats["helpful"] == 0 and stats["unhelpful"] == 1
            assert stats["answered"] + stats["declined"] + stats["escalated"] >= traffic.messages

            health = await check_health(redis, keys)
            assert len(health.workers) == 1 and health.jobs_pending == 0

            await operator_commands_across_slots(
                tmp_path, redis, settings, conversations, embedder, namespace, cluster.url
            )
        finally:
            await pipeline.stop()
    finally:
        cluster.servers.stop()


async def operator_commands_across_slots(
    tmp_path: Path,
    redis: Any,
    settings: Settings,
    conversations: list[ConversationKey],
    embedder: Any,
    namespace: str,
    url: str,
) -> None:
    keys = Keys(settings.namespace)
    env = chatbot_env(REDIS_URL=url, CHATBOT_NAMESPACE=namespace)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        process = chatbot(list(args), env, tmp_path)
        out, err = process.communicate(timeout=120)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    health = run("health")
    assert health.returncode == 0, health.stderr
    assert len(json.loads(health.stdout)["workers"]) == 1
    assert "warning:" not in health.stderr  # AOF on, noeviction: nothing to warn about

    # user0 also writes in a conversation of user1 and in a third one of its own, so that
    # forgetting it spans slots on several nodes.
    store = ConversationStore.from_settings(redis, settings)
    queue = JobQueue(redis, keys)
    for conversation, message_id in ((conversations[1], "x1"), (conversations[4], "x2")):
        await submit_user_message(
            store,
            queue,
            conversation,
            text="one more thing",
            author_id="user0",
            author_name="User 0",
            message_id=message_id,
            max_chars=settings.max_message_chars,
        )
    nodes = {redis.get_node_from_key(keys.history(c)).name for c in conversations[:5]}
    assert len(nodes) >= 2
    forget = run("user", "forget", "slack", "user0")
    assert forget.returncode == 0, forget.stderr
    assert not await redis.exists(keys.history(conversations[0]))  # user0's own: deleted
    for conversation in (conversations[1], conversations[4]):
        authors = {m.author_id for m in await store.history(conversation)}
        assert "user0" not in authors and authors  # shared: edited, the others' words kept
    assert not await redis.exists(keys.rate("slack", "user0"))

    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "returns.md").write_text("# Returns\n\nReturns are accepted within 30 days.\n")
    kb_store = KnowledgeBaseStore(redis, keys)
    by_node: dict[str, str] = {}  # a knowledge base on each node
    for name in (f"kb{n}" for n in range(50)):
        by_node.setdefault(redis.get_node_from_key(keys.kb_passages(name)).name, name)
    names = sorted(by_node.values())
    assert len(names) == 3
    for name in names:
        await kb_store.ingest(name, folder, embedder)
    removed = run("kb", "remove", names[1])
    assert removed.returncode == 0, removed.stderr
    assert await kb_store.names() == [names[0], names[2]]
    assert not await redis.exists(keys.kb_passages(names[1]), keys.kb_documents(names[1]))
    assert await redis.exists(keys.kb_passages(names[0])) == 1
    listed = run("conversation", "list")
    assert listed.returncode == 0, listed.stderr
    shown = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert shown == {c.id for c in conversations[1:]}  # every node's, user0's own gone


@pytest.mark.slow
async def test_sentinel_failover_in_the_middle_of_traffic(
    tmp_path: Path, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    setup = start_sentinel(tmp_path / "sentinel")
    try:
        settings = topology_settings(make_settings, setup.url)
        pipeline = Pipeline(setup.url, settings, tiny_engine, "slack")
        conversations = [ConversationKey("slack", "T1", f"C{n}", f"t{n}") for n in range(8)]
        traffic = Traffic(conversations, rounds=8)
        try:
            assert await server_config_findings(pipeline.users_redis) == []
            master = setup.data_client(setup.master_port)
            master.config_set("min-replicas-to-write", 0)
            [finding] = await server_config_findings(pipeline.users_redis)
            assert "the master mymaster (behind Sentinel) has min-replicas-to-write 0" in finding
            master.config_set("min-replicas-to-write", 1)
            master.close()
            await pipeline.start(traffic)
            failed_over: dict[str, float] = {}

            async def fail_over_midway() -> None:
                async def a_third_answered() -> bool:
                    return len(traffic.posted) >= traffic.messages // 3

                await wait_for(a_third_answered, timeout_s=180, what="a third of the replies")
                failed_over["at"] = time.monotonic()
                await asyncio.to_thread(setup.failover)
                await asyncio.to_thread(
                    wait_until,
                    lambda: setup.master_address()[1] in setup.replica_ports,
                    60,
                    "the sentinels to promote a replica",
                )
                failed_over["promoted"] = time.monotonic()

            users = [
                traffic.user(i, pipeline.users_redis, settings, 180)
                for i in range(len(conversations))
            ]
            started = time.monotonic()
            await asyncio.gather(fail_over_midway(), *users)
            elapsed_s = time.monotonic() - started
            assert setup.role(setup.master_address()[1]) == "master"
            await asyncio.to_thread(
                wait_until,
                lambda: setup.role(setup.master_port) == "slave",
                60,
                "the old master to follow the new one",
            )
            traffic.assert_each_answered_once()
            at = failed_over["at"]
            sent_after = [mid for mid, sent in traffic.sent_at.items() if sent >= at]
            assert sent_after, "no message was sent after the failover: test void"
            # The longest time without any reply posted, from the failover on.
            times = [at, *(t for t in traffic.post_times if t >= at)]
            outage_s = max(b - a for a, b in itertools.pairwise(times))
            in_flight = [mid for mid, sent in traffic.sent_at.items() if sent < at]
            worst_s = max(traffic.posted_at[mid] - traffic.sent_at[mid] for mid in in_flight)
            log.warning(
                "sentinel: %d messages, 1 failover (replica promoted after %.1f s), longest "
                "time without a reply from the failover on %.1f s, slowest reply to a "
                "message sent before it %.1f s, %d lost, %d duplicates, %.1f s in all",
                traffic.messages,
                failed_over["promoted"] - at,
                outage_s,
                worst_s,
                len(traffic.unanswered),
                traffic.duplicates(),
                elapsed_s,
            )
        finally:
            await pipeline.stop()
    finally:
        setup.servers.stop()


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    [
        "manual failover",
        "primary SIGKILLed",
    ],
)
async def test_cluster_failover_in_the_middle_of_traffic(
    how: str, tmp_path: Path, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    cluster = start_cluster(tmp_path / "cluster", replicas=1)
    try:
        settings = topology_settings(make_settings, cluster.url)
        keys = Keys(settings.namespace)
        pipeline = Pipeline(cluster.url, settings, tiny_engine, "slack")
        redis: Any = pipeline.users_redis
        try:
            await redis.ping()
            conversations = conversations_on_every_node(redis, keys, 9)
            traffic = Traffic(conversations, rounds=6)
            replica = cluster.replicas()[0]
            await pipeline.start(traffic)
            failed_over: dict[str, float] = {}

            async def fail_over_midway() -> None:
                async def a_third_answered() -> bool:
                    return len(traffic.posted) >= traffic.messages // 3

                await wait_for(a_third_answered, timeout_s=180, what="a third of the replies")
                failed_over["at"] = time.monotonic()
                if how == "manual failover":  # graceful: the replica catches up first
                    await asyncio.to_thread(cluster.failover, replica)
                else:  # the others deem it failed after cluster-node-timeout (5 s)
                    await asyncio.to_thread(cluster.kill, cluster.primary_of(replica))
                await asyncio.to_thread(
                    wait_until,
                    lambda: cluster.role(replica) == "master",
                    60,
                    f"replica {replica} to take over its primary's slots",
                )
                failed_over["promoted"] = time.monotonic()

            users = [traffic.user(i, redis, settings, 180) for i in range(len(conversations))]
            started = time.monotonic()
            await asyncio.gather(fail_over_midway(), *users)
            elapsed_s = time.monotonic() - started
            traffic.assert_each_answered_once()
            moved = {redis.get_node_from_key(keys.history(c)).port for c in conversations}
            assert replica in moved  # the client follows the slots to the new primary
            at = failed_over["at"]
            times = [at, *(t for t in traffic.post_times if t >= at)]
            log.warning(
                "cluster, %s: %d messages in %d conversations, 1 failover (replica took "
                "over after %.1f s), longest time without a reply from the failover on "
                "%.1f s, %d lost, %d duplicates, %.1f s in all",
                how,
                traffic.messages,
                len(conversations),
                failed_over["promoted"] - at,
                max(b - a for a, b in itertools.pairwise(times)),
                len(traffic.unanswered),
                traffic.duplicates(),
                elapsed_s,
            )
        finally:
            await pipeline.stop()
    finally:
        cluster.servers.stop()
