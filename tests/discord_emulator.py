"""A local Discord for tests: the REST API under /api/v10 and the gateway websocket.

The real discord.py `Client` runs unchanged against it. Point discord.py at the emulator
with two class attributes, and put them back afterwards:

    async with DiscordEmulator(heartbeat_interval_ms=1000) as emulator:
        discord.http.Route.BASE = emulator.api_url  # "http://127.0.0.1:PORT/api/v10"
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(emulator.gateway_url)
        client = discord.Client(intents=intents, guild_ready_timeout=0.1)
        task = asyncio.create_task(client.start(emulator.token))
        ...
        await emulator.send_message("3000", "hello <@1000>", author_id="4001")
        await emulator.wait_for(lambda: emulator.messages_in("3000") == ["hi ann"])
        await client.close()  # before the emulator stops, or it keeps reconnecting
        await task

What discord.py 2.7.1 does, as read in its source (the emulator follows it):

- `Client.login` calls GET /users/@me (401 here -> `LoginFailure`) and
  GET /oauth2/applications/@me; a plain `Client` never asks GET /gateway or /gateway/bot
  (`AutoShardedClient` asks /gateway/bot when shard_count is None). It connects to
  `DiscordWebSocket.DEFAULT_GATEWAY` (a `yarl.URL`, not a str) with the query replaced by
  `?v=10&encoding=json&compress=zlib-stream` (`zstd-stream` where the zstandard package
  or Python 3.14's compression.zstd is importable). On RESUME it connects to READY's
  `resume_gateway_url`, again with that query put on.
- It decompresses BINARY frames (zlib-stream: a frame ends with 00 00 ff ff) and parses
  TEXT frames as plain JSON, so both work. The emulator answers compress=zlib-stream with
  zlib-stream BINARY frames (as Discord does) unless `zlib_stream=False`, and sends TEXT
  frames for any other query (zstd-stream included).
- A REST body is parsed as JSON only when Content-Type is exactly "application/json";
  aiohttp's `web.json_response` says "application/json; charset=utf-8", so the emulator
  sets the header itself. A 429 is retried only when the response has a `Via` header
  (otherwise discord.py takes it for a Cloudflare ban and raises `HTTPException`); it
  sleeps for the body's `retry_after`. Snowflakes arrive as JSON ints in some bodies
  (message_reference.message_id, recipient_id): the emulator accepts both.
- The interaction callback is POSTed with `?with_response=1` and discord.py reads the
  body (`{"interaction": {...}, "resource": {...}}`): a 204 there breaks
  `interaction.response.*`. The emulator answers 204 only without that query.
- RESUMED must carry a dict `d` (discord.py writes into it), and a payload missing a field
  discord.py reads with `data[...]` ends `client.start()` with a KeyError: all payloads
  here are complete per discord/types/*.py.
- Close codes: 4004 (bad token) and 4014 (disallowed intents) are fatal; 4014 becomes
  `discord.errors.PrivilegedIntentsRequired` from `client.start()`/`connect()`, which then
  does NOT close the client itself. Other codes (4000, an abrupt 1006) make it RESUME.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import WSCloseCode, WSMsgType, web

JsonDict = dict[str, Any]
Reply = tuple[int, Any]  # (HTTP status, JSON body; None for an empty 204)

DEFAULT_BOT_ID = "1000"
DEFAULT_GUILD_ID = "2000"
DEFAULT_CHANNEL_ID = "3000"
DEFAULT_SECOND_CHANNEL_ID = "3001"
ANN_ID = "4001"
BOB_ID = "4002"
OTHER_BOT_ID = "4999"

DISCORD_EPOCH_MS = 1_420_070_400_000

# Gateway intents (https://discord.com/developers/docs/events/gateway#gateway-intents)
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_GUILD_MESSAGE_REACTIONS = 1 << 10
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_DIRECT_MESSAGE_REACTIONS = 1 << 13
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT

# Gateway opcodes
OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE_UPDATE = 3
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_GUILD_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

# Channel and message types, message flags
CHANNEL_GUILD_TEXT = 0
CHANNEL_DM = 1
CHANNEL_PUBLIC_THREAD = 11
CHANNEL_PRIVATE_THREAD = 12
THREAD_TYPES = (10, CHANNEL_PUBLIC_THREAD, CHANNEL_PRIVATE_THREAD)
MESSAGE_DEFAULT = 0
MESSAGE_REPLY = 19
MESSAGE_CHAT_INPUT_COMMAND = 20
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7

MAX_CONTENT_LENGTH = 2000
ALL_PERMISSIONS = "2251799813685247"
MEMBER_PERMISSIONS = "1071698660929"
# GATEWAY_MESSAGE_CONTENT_LIMITED: the message content intent may be asked for.
APPLICATION_FLAGS = 1 << 19

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _sid(value: object) -> str:
    """A snowflake as the string Discord sends (bodies from discord.py may hold ints)."""
    return str(value)


def _error(status: int, code: int, message: str, errors: JsonDict | None = None) -> Reply:
    body: JsonDict = {"message": message, "code": code}
    if errors is not None:
        body["errors"] = errors
    return status, body


def _form_error(where: str, code: str, message: str) -> Reply:
    """Discord's 400 "Invalid Form Body" (code 50035) for one field."""
    return _error(
        400, 50035, "Invalid Form Body", {where: {"_errors": [{"code": code, "message": message}]}}
    )


# ---------------------------------------------------------------------------
# Configuration


@dataclass
class UserSpec:
    id: str
    username: str
    bot: bool = False


@dataclass
class GuildSpec:
    """A guild: text channels (id -> name), members (user ids; the bot is added) and
    roles besides @everyone (id -> name; @everyone's id is the guild id)."""

    id: str = DEFAULT_GUILD_ID
    name: str = "G"
    channels: dict[str, str] = field(
        default_factory=lambda: {DEFAULT_CHANNEL_ID: "general", DEFAULT_SECOND_CHANNEL_ID: "random"}
    )
    member_ids: list[str] = field(default_factory=lambda: [ANN_ID, BOB_ID, OTHER_BOT_ID])
    roles: dict[str, str] = field(default_factory=dict)
    owner_id: str = ANN_ID


def default_users() -> list[UserSpec]:
    return [
        UserSpec(ANN_ID, "ann"),
        UserSpec(BOB_ID, "bob"),
        UserSpec(OTHER_BOT_ID, "otherbot", bot=True),
    ]


# ---------------------------------------------------------------------------
# Records


@dataclass
class RestCall:
    """One REST request as the emulator saw and answered it."""

    method: str
    path: str  # after /api/v10, e.g. "/channels/3000/messages"
    query: dict[str, str]
    body: Any  # the JSON body (payload_json of a multipart one), or None
    headers: dict[str, str]
    status: int = 0
    response: Any = None
    at_s: float = field(default_factory=time.monotonic)  # when it arrived

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class _Fault:
    route_prefix: str  # "POST /channels" matches "POST /channels/3000/messages"
    status: int
    remaining: int
    retry_after_s: float = 0.0
    global_: bool = False
    body: JsonDict | None = None


@dataclass
class _Guild:
    id: str
    name: str
    owner_id: str
    roles: list[JsonDict]
    members: dict[str, JsonDict]  # user id -> member object without "user"
    channel_ids: list[str]
    joined_at: str


@dataclass
class _Interaction:
    id: str
    token: str
    channel_id: str
    guild_id: str | None
    user_id: str
    name: str
    type: int = 2  # 2 a slash command, 3 a component (button) click
    acked: bool = False
    original_id: str | None = None
    message_ids: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    request: web.Request
    query: dict[str, str]
    compressor: Any  # zlib compress object for zlib-stream, or None for TEXT frames
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: _Session | None = None
    dropped: bool = False  # closed by the emulator: the session stays resumable


@dataclass(eq=False)
class _Session:
    id: str
    intents: int
    shard: list[int]
    seq: int = 0
    frames: list[JsonDict] = field(default_factory=list)  # every dispatch, for RESUME
    conn: _Connection | None = None
    alive: bool = True
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[[RestCall, dict[str, str]], Awaitable[Reply]]
    auth: bool = True


# ---------------------------------------------------------------------------
# The emulator


class DiscordEmulator:
    """A fake discord.com on 127.0.0.1: REST under `api_url`, the gateway at `gateway_url`."""

    def __init__(
        self,
        *,
        bot_id: str = DEFAULT_BOT_ID,
        bot_name: str = "support",
        token: str = "test-token",
        application_id: str | None = None,
        users: Sequence[UserSpec] | None = None,
        guilds: Sequence[GuildSpec] | None = None,
        heartbeat_interval_ms: int = 41250,
        refuse_intents: bool = False,
        zlib_stream: bool = True,
        echo_own_messages: bool = True,
        enforce_message_content_intent: bool = True,
    ) -> None:
        """`refuse_intents`: an IDENTIFY asking for a privileged intent (members, presences,
        message content) is closed with 4014. `echo_own_messages`: the bot's own messages
        come back to it as MESSAGE_CREATE/UPDATE/DELETE, as on Discord.
        `enforce_message_content_intent`: without intent 1<<15, guild messages that neither
        mention the bot nor are its own arrive with empty content/embeds/attachments."""
        self.bot_id = bot_id
        self.bot_name = bot_name
        self.token = token
        self.application_id = application_id or bot_id
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.refuse_intents = refuse_intents
        self.zlib_stream = zlib_stream
        self.echo_own_messages = echo_own_messages
        self.enforce_message_content_intent = enforce_message_content_intent

        # -- records (read these in tests) --
        self.requests: list[RestCall] = []
        self.sent: list[JsonDict] = []  # POST /channels/{id}/messages, in order
        self.edits: list[JsonDict] = []
        self.deletions: list[JsonDict] = []
        self.typing: list[str] = []  # channel ids of POST /channels/{id}/typing
        self.reactions: list[tuple[str, str, str]] = []  # (channel id, message id, emoji)
        self.threads: list[JsonDict] = []  # threads created (by the bot or the emulator)
        self.command_syncs: list[tuple[str | None, list[str]]] = []  # (guild id, names)
        self.interaction_responses: list[JsonDict] = []
        self.identifies: list[JsonDict] = []  # the "d" of each IDENTIFY
        self.resumes: list[JsonDict] = []  # the "d" of each accepted RESUME
        self.resume_failures = 0
        self.replayed_count = 0  # dispatches re-sent on RESUME
        self.gateway_queries: list[dict[str, str]] = []  # query of each gateway connection
        self.heartbeat_count = 0
        self.gateway_frames: list[JsonDict] = []  # every frame clients sent, in order
        self.presence_updates: list[JsonDict] = []

        # -- state --
        self.users: dict[str, JsonDict] = {}
        self.guilds: dict[str, _Guild] = {}
        self.channels: dict[str, JsonDict] = {}
        self._messages: dict[str, JsonDict] = {}
        self._nonces: dict[tuple[str, str], str] = {}  # (channel, nonce) -> message id
        self._dm_channels: dict[str, str] = {}  # user id -> DM channel id
        self._commands: dict[str | None, dict[str, JsonDict]] = {}  # guild id -> name -> cmd
        self._interactions: dict[str, _Interaction] = {}  # token -> interaction
        self.sessions: dict[str, _Session] = {}
        self._connections: set[_Connection] = set()
        self._faults: list[_Fault] = []
        self._last_id = 0
        self._gateway_open = asyncio.Event()
        self._gateway_open.set()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._routes = self._build_routes()

        self.add_user(bot_id, bot_name, bot=True)
        for user in users if users is not None else default_users():
            self.add_user(user.id, user.username, bot=user.bot)
        for guild in guilds if guilds is not None else [GuildSpec()]:
            self.add_guild(guild)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._handle_gateway)
        app.router.add_get("/gateway/", self._handle_gateway)
        app.router.add_route("*", "/api/{version:v\\d+}/{path:.*}", self._handle_rest)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._gateway_open.set()
        for conn in list(self._connections):
            conn.dropped = True
            await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"emulator stopped")
        self._connections.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DiscordEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the emulator is not started")
        return self._port

    @property
    def api_url(self) -> str:
        """For `discord.http.Route.BASE`."""
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        """For `DiscordWebSocket.DEFAULT_GATEWAY` (as a yarl.URL); also READY's
        resume_gateway_url and the url of GET /gateway(/bot)."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- setup -------------------------------------------------------------------

    def add_user(self, user_id: str, username: str, *, bot: bool = False) -> JsonDict:
        user: JsonDict = {
            "id": user_id,
            "username": username,
            "discriminator": "0",
            "global_name": None if bot else username.capitalize(),
            "avatar": None,
            "avatar_decoration_data": None,
            "banner": None,
            "accent_color": None,
            "public_flags": 0,
            "flags": 0,
            "bot": bot,
            "primary_guild": None,
            "collectibles": None,
        }
        self.users[user_id] = user
        return user

    def add_guild(self, spec: GuildSpec) -> None:
        """Adds a guild (before the client connects: it arrives in GUILD_CREATE)."""
        everyone = self._role(spec.id, "@everyone", 0, MEMBER_PERMISSIONS)
        roles = [everyone] + [
            self._role(role_id, name, position, MEMBER_PERMISSIONS)
            for position, (role_id, name) in enumerate(spec.roles.items(), start=1)
        ]
        guild = _Guild(spec.id, spec.name, spec.owner_id, roles, {}, [], _now_iso())
        self.guilds[spec.id] = guild
        for user_id in [self.bot_id, *spec.member_ids]:
            self.add_member(spec.id, user_id)
        for position, (channel_id, name) in enumerate(spec.channels.items()):
            self.add_channel(spec.id, channel_id, name, position=position)

    def add_member(self, guild_id: str, user_id: str, *, roles: Sequence[str] = ()) -> None:
        if user_id not in self.users:
            self.add_user(user_id, f"user{user_id}")
        self.guilds[guild_id].members[user_id] = {
            "roles": list(roles),
            "joined_at": _now_iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "avatar": None,
            "banner": None,
            "premium_since": None,
            "communication_disabled_until": None,
        }

    def add_channel(self, guild_id: str, channel_id: str, name: str, *, position: int = 0) -> None:
        self.channels[channel_id] = {
            "id": channel_id,
            "type": CHANNEL_GUILD_TEXT,
            "guild_id": guild_id,
            "name": name,
            "position": position,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "default_auto_archive_duration": 1440,
            "default_thread_rate_limit_per_user": 0,
            "flags": 0,
        }
        self.guilds[guild_id].channel_ids.append(channel_id)

    def dm_channel_id(self, user_id: str) -> str:
        """The DM channel between the bot and `user_id` (created on first use)."""
        if user_id not in self._dm_channels:
            channel_id = self.next_id()
            self._dm_channels[user_id] = channel_id
            self.channels[channel_id] = {
                "id": channel_id,
                "type": CHANNEL_DM,
                "last_message_id": None,
                "flags": 0,
                "recipients": [self.users[user_id]],
            }
        return self._dm_channels[user_id]

    def next_id(self) -> str:
        """A fresh snowflake: time-based (so discord.py's created_at is now), increasing."""
        now = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last_id = max(self._last_id + 1, now)
        return str(self._last_id)

    # -- fault injection -----------------------------------------------------------

    def rate_limit_next(
        self,
        route: str,
        retry_after_s: float = 0.2,
        times: int = 1,
        global_: bool = False,
    ) -> None:
        """The next `times` requests whose "METHOD /path" starts with `route` (e.g.
        "POST /channels/3000/messages", or "POST /channels" for all channels) get a 429
        as Discord sends it: body {"message", "retry_after", "global"}, Retry-After,
        X-RateLimit-* and Via headers. discord.py sleeps retry_after and retries."""
        self._faults.append(_Fault(route, 429, times, retry_after_s=retry_after_s, global_=global_))

    def fail_next(
        self,
        route: str,
        *,
        status: int = 500,
        times: int = 1,
        code: int = 0,
        message: str | None = None,
    ) -> None:
        """The next `times` requests matching `route` (as for rate_limit_next) fail with
        `status` and {"message", "code"}. discord.py retries 500/502/504 after 1 + 2*try s."""
        body = {"message": message or f"{status}: emulated failure", "code": code}
        self._faults.append(_Fault(route, status, times, body=body))

    # -- inspection ------------------------------------------------------------------

    @property
    def identify_count(self) -> int:
        return len(self.identifies)

    @property
    def resume_count(self) -> int:
        return len(self.resumes)

    @property
    def commands(self) -> list[JsonDict]:
        """The registered application commands: global ones, then per guild (these carry
        "guild_id")."""
        ordered = sorted(self._commands.items(), key=lambda item: item[0] or "")
        return [cmd for _, by_name in ordered for cmd in by_name.values()]

    def calls_to(self, route_prefix: str) -> list[RestCall]:
        """REST requests whose "METHOD /path" starts with `route_prefix`."""
        return [call for call in self.requests if call.route.startswith(route_prefix)]

    def message(self, message_id: str) -> JsonDict | None:
        return self._messages.get(message_id)

    def messages_in(self, channel_id: str, *, include_ephemeral: bool = False) -> list[str]:
        """Current content (after edits, without deleted ones) of the bot's messages in
        `channel_id`, oldest first: channel sends and interaction responses alike
        (ephemeral ones only if asked; deferred ones once they have content)."""
        return [
            m["content"]
            for m in self._messages.values()
            if m["channel_id"] == channel_id
            and m["author"]["id"] == self.bot_id
            and not m["flags"] & FLAG_LOADING
            and (include_ephemeral or not m["flags"] & FLAG_EPHEMERAL)
        ]

    def interaction_replies(self, interaction: JsonDict | str) -> list[str]:
        """Current content of the messages that answered `interaction` (the payload from
        send_interaction, or its token): the original response, then the followups."""
        token = interaction if isinstance(interaction, str) else interaction["token"]
        record = self._interactions[token]
        messages = [self._messages.get(mid) for mid in record.message_ids]
        return [m["content"] for m in messages if m is not None and not m["flags"] & FLAG_LOADING]

    @property
    def connected(self) -> bool:
        """A client has identified (or resumed) and its websocket is open."""
        return any(
            s.alive and s.conn is not None and not s.conn.ws.closed for s in self.sessions.values()
        )

    async def wait_for(
        self, predicate: Callable[[], object], timeout_s: float = 10, message: str = ""
    ) -> None:
        """Polls `predicate` until truthy; AssertionError after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            if loop.time() >= deadline:
                what = message or getattr(predicate, "__name__", "predicate")
                seen = [f"{c.route} -> {c.status}" for c in self.requests[-20:]]
                raise AssertionError(
                    f"timed out after {timeout_s}s waiting for {what}; "
                    f"identifies={self.identify_count} resumes={self.resume_count} "
                    f"last REST calls: {seen}"
                )
            await asyncio.sleep(0.01)

    async def wait_ready(self, timeout_s: float = 10) -> None:
        """Until a client is identified and connected (READY and GUILD_CREATEs sent).
        discord.py fires on_ready later, guild_ready_timeout after the last GUILD_CREATE."""
        await self.wait_for(lambda: self.connected, timeout_s, "a client to identify")

    # -- gateway control -----------------------------------------------------------------

    def pause_gateway(self) -> None:
        """New gateway connections wait before HELLO until resume_gateway(): so a test can
        dispatch while the client is away and see it replayed on RESUME."""
        self._gateway_open.clear()

    def resume_gateway(self) -> None:
        self._gateway_open.set()

    @contextmanager
    def gateway_paused(self) -> Iterator[None]:
        self.pause_gateway()
        try:
            yield
        finally:
            self.resume_gateway()

    async def drop_connection(self, code: int | None = 4000) -> None:
        """Closes every gateway connection as a network failure would: with close `code`
        (4000 "unknown error", resumable), or abruptly without a close frame when `code`
        is None (the client sees 1006). Sessions stay resumable; dispatches made before
        the client resumes are buffered and replayed."""
        for conn in list(self._connections):
            conn.dropped = True
            if conn.session is not None and conn.session.conn is conn:
                conn.session.conn = None
            if code is None:
                transport = conn.request.transport
                if transport is not None:
                    transport.abort()
            else:
                await conn.ws.close(code=code, message=b"emulated disconnect")

    async def send_reconnect(self) -> None:
        """Opcode 7 RECONNECT: the client closes and resumes."""
        for session in self._live_sessions():
            if session.conn is not None:
                await self._send(session.conn, {"op": OP_RECONNECT, "d": None})

    async def invalidate_sessions(self, *, resumable: bool = False) -> None:
        """Opcode 9 INVALID_SESSION to every client; unless resumable the sessions end
        and the client identifies anew."""
        for session in self._live_sessions():
            conn = session.conn
            if not resumable:
                session.alive = False
            if conn is not None:
                await self._send(conn, {"op": OP_INVALID_SESSION, "d": resumable})

    # -- dispatching -----------------------------------------------------------------------

    async def dispatch(self, event: str, data: JsonDict, *, intent: int = 0) -> None:
        """Sends a DISPATCH (op 0) to every live session whose intents include `intent`
        (0: to all). Sessions that are disconnected buffer it for RESUME."""
        for session in self._live_sessions():
            if intent and not session.intents & intent:
                continue
            await self._dispatch_to(session, event, data)

    async def send_message(
        self,
        channel_id: str,
        content: str,
        *,
        author_id: str = ANN_ID,
        guild_id: str | None = None,
        mentions: Sequence[str] | None = None,
        mention_everyone: bool = False,
        mention_roles: Sequence[str] | None = None,
        message_reference: Mapping[str, Any] | None = None,
        referenced_message: JsonDict | None = None,
        reply_to: str | None = None,
        embeds: Sequence[JsonDict] = (),
    ) -> JsonDict:
        """A user posts `content` in `channel_id` (a guild channel, thread or DM channel):
        stores the message and dispatches MESSAGE_CREATE. Returns the message object.

        `mentions`/`mention_roles`: user/role ids (default: those written as <@id>/<@&id>
        in `content`).
        `reply_to`: a message id to reply to (fills message_reference, referenced_message
        and, as Discord's default ping does, mentions the replied-to author);
        `message_reference`/`referenced_message` set those fields as given."""
        channel = self.channels.get(channel_id)
        if channel is None:
            raise KeyError(f"unknown channel {channel_id}")
        guild_id = guild_id or channel.get("guild_id")
        mention_ids = list(mentions) if mentions is not None else _mentioned_ids(content)
        reference = dict(message_reference) if message_reference is not None else None
        if reply_to is not None:
            reference = {"message_id": reply_to, "channel_id": channel_id}
            if guild_id is not None:
                reference["guild_id"] = guild_id
            replied = self._messages.get(reply_to)
            if replied is not None and replied["author"]["id"] not in mention_ids:
                mention_ids.append(replied["author"]["id"])
        if reference is not None and referenced_message is None:
            referenced_message = self._messages.get(_sid(reference.get("message_id")))
        message = self._message(
            channel_id=channel_id,
            guild_id=guild_id,
            author_id=author_id,
            content=content,
            mention_ids=mention_ids,
            mention_everyone=mention_everyone,
            mention_roles=(
                list(mention_roles)
                if mention_roles is not None
                else list(dict.fromkeys(_ROLE_MENTION.findall(content)))
            ),
            message_reference=reference,
            referenced_message=referenced_message,
            embeds=list(embeds),
        )
        await self._dispatch_message("MESSAGE_CREATE", message)
        return message

    async def send_dm(self, user_id: str, content: str, **kwargs: Any) -> JsonDict:
        """`user_id` writes to the bot in their DM channel (type 1, no guild_id)."""
        return await self.send_message(
            self.dm_channel_id(user_id), content, author_id=user_id, **kwargs
        )

    async def create_thread(
        self,
        channel_id: str,
        name: str,
        starter_message_id: str | None = None,
        *,
        owner_id: str = ANN_ID,
        private: bool = False,
    ) -> JsonDict:
        """A user starts a thread in `channel_id` (from `starter_message_id`, whose id the
        thread then takes, as on Discord); dispatches THREAD_CREATE. Post in it with
        send_message(thread["id"], ...)."""
        thread = self._new_thread(
            channel_id,
            name,
            thread_id=starter_message_id,
            owner_id=owner_id,
            thread_type=CHANNEL_PRIVATE_THREAD if private else CHANNEL_PUBLIC_THREAD,
        )
        await self.dispatch(
            "THREAD_CREATE", {**thread, "newly_created": True}, intent=INTENT_GUILDS
        )
        return thread

    async def send_interaction(
        self,
        name: str,
        options: Mapping[str, Any] | Sequence[JsonDict] | None = None,
        *,
        user_id: str = ANN_ID,
        channel_id: str = DEFAULT_CHANNEL_ID,
        guild_id: str | None = None,
    ) -> JsonDict:
        """`user_id` runs the slash command `name`: dispatches INTERACTION_CREATE (type 2)
        and returns its payload ("id", "token", ...). `options`: {name: value} (type from
        the value: str 3, int 4, bool 5, float 10) or Discord's option objects. If `name`
        was registered for the guild, data carries its id and guild_id, as on Discord."""
        channel = self.channels[channel_id]
        guild_id = guild_id or channel.get("guild_id")
        user = self.users[user_id]
        command = (self._commands.get(guild_id) or {}).get(name) if guild_id else None
        command = command or self._commands.get(None, {}).get(name)
        data: JsonDict = {
            "id": command["id"] if command else self.next_id(),
            "name": name,
            "type": 1,
            "options": _options(options),
        }
        if command is not None and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        interaction_id, token = self.next_id(), f"itoken-{secrets.token_urlsafe(16)}"
        payload: JsonDict = {
            "id": interaction_id,
            "application_id": self.application_id,
            "type": 2,
            "token": token,
            "version": 1,
            "data": data,
            "channel_id": channel_id,
            "channel": channel,
            "app_permissions": ALL_PERMISSIONS,
            "locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if guild_id is not None:
            member = {**self._member(guild_id, user_id), "user": user}
            member["permissions"] = MEMBER_PERMISSIONS
            payload |= {
                "guild_id": guild_id,
                "guild": {"id": guild_id, "locale": "en-US", "features": []},
                "guild_locale": "en-US",
                "member": member,
                "authorizing_integration_owners": {"0": guild_id},
                "context": 0,
            }
        else:
            payload |= {
                "user": user,
                "authorizing_integration_owners": {"1": user_id},
                "context": 1,
            }
        self._interactions[token] = _Interaction(
            interaction_id, token, channel_id, guild_id, user_id, name
        )
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def click_button(
        self, message_id: str, custom_id: str, *, user_id: str = ANN_ID
    ) -> JsonDict:
        """`user_id` clicks the button `custom_id` on the bot's message `message_id`:
        dispatches INTERACTION_CREATE (type 3, a message component) and returns its
        payload. Answers to it are in interaction_responses (type 6: a deferred update)."""
        message = self._messages[message_id]
        channel_id = message["channel_id"]
        buttons = [
            c.get("custom_id")
            for row in message.get("components") or []
            for c in row.get("components") or []
        ]
        if custom_id not in buttons:
            raise KeyError(f"message {message_id} has no button {custom_id!r}: {buttons}")
        channel = self.channels[channel_id]
        guild_id = channel.get("guild_id")
        user = self.users[user_id]
        interaction_id, token = self.next_id(), f"itoken-{secrets.token_urlsafe(16)}"
        payload: JsonDict = {
            "id": interaction_id,
            "application_id": self.application_id,
            "type": 3,
            "token": token,
            "version": 1,
            "data": {"custom_id": custom_id, "component_type": 2},
            "message": message,
            "channel_id": channel_id,
            "channel": channel,
            "app_permissions": ALL_PERMISSIONS,
            "locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if guild_id is not None:
            member = {**self._member(guild_id, user_id), "user": user}
            member["permissions"] = MEMBER_PERMISSIONS
            payload |= {
                "guild_id": guild_id,
                "guild": {"id": guild_id, "locale": "en-US", "features": []},
                "guild_locale": "en-US",
                "member": member,
                "authorizing_integration_owners": {"0": guild_id},
                "context": 0,
            }
        else:
            payload |= {
                "user": user,
                "authorizing_integration_owners": {"1": user_id},
                "context": 1,
            }
        self._interactions[token] = _Interaction(
            interaction_id, token, channel_id, guild_id, user_id, custom_id, type=3
        )
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def add_user_reaction(
        self, message_id: str, emoji: str, *, user_id: str = ANN_ID
    ) -> JsonDict:
        """`user_id` reacts with the unicode `emoji` to `message_id`: dispatches
        MESSAGE_REACTION_ADD (to sessions with the guild or DM reactions intent) and
        returns its payload."""
        message = self._messages[message_id]
        data: JsonDict = {
            "user_id": user_id,
            "channel_id": message["channel_id"],
            "message_id": message_id,
            "message_author_id": message["author"]["id"],
            "emoji": {"id": None, "name": emoji},
            "burst": False,
            "burst_colors": [],
            "type": 0,
        }
        intent = INTENT_DIRECT_MESSAGE_REACTIONS
        guild_id = message.get("guild_id")
        if guild_id is not None:
            data["guild_id"] = guild_id
            intent = INTENT_GUILD_MESSAGE_REACTIONS
            if user_id in self.guilds[guild_id].members:
                data["member"] = self._member(guild_id, user_id, with_user=True)
        await self.dispatch("MESSAGE_REACTION_ADD", data, intent=intent)
        return data

    # -- gateway internals --------------------------------------------------------------------

    def _live_sessions(self) -> list[_Session]:
        return [s for s in self.sessions.values() if s.alive]

    async def _send(self, conn: _Connection, payload: JsonDict) -> None:
        text = json.dumps(payload)
        async with conn.lock:
            if conn.ws.closed:
                return
            try:
                if conn.compressor is not None:
                    data = conn.compressor.compress(text.encode())
                    data += conn.compressor.flush(zlib.Z_SYNC_FLUSH)
                    await conn.ws.send_bytes(data)
                else:
                    await conn.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                pass  # closing underneath us: the frame stays in the session for RESUME

    async def _dispatch_to(self, session: _Session, event: str, data: JsonDict) -> None:
        async with session.lock:
            session.seq += 1
            frame = {"op": OP_DISPATCH, "t": event, "s": session.seq, "d": data}
            session.frames.append(frame)
            if session.conn is not None:
                await self._send(session.conn, frame)

    async def _dispatch_message(self, event: str, message: JsonDict) -> None:
        intent = INTENT_GUILD_MESSAGES if message.get("guild_id") else INTENT_DIRECT_MESSAGES
        for session in self._live_sessions():
            if session.intents & intent:
                await self._dispatch_to(session, event, self._visible(message, session))

    def _visible(self, message: JsonDict, session: _Session) -> JsonDict:
        """What a session without the message content intent gets of a guild message."""
        if (
            not self.enforce_message_content_intent
            or session.intents & INTENT_MESSAGE_CONTENT
            or "guild_id" not in message
            or message["author"]["id"] == self.bot_id
            or any(user["id"] == self.bot_id for user in message.get("mentions", []))
        ):
            return message
        return {**message, "content": "", "embeds": [], "attachments": [], "components": []}

    async def _handle_gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(timeout=2.0, max_msg_size=0)
        await ws.prepare(request)
        query = dict(request.query)
        self.gateway_queries.append(query)
        compressor = None
        if self.zlib_stream and query.get("compress") == "zlib-stream":
            compressor = zlib.compressobj()
        conn = _Connection(ws, request, query, compressor)
        self._connections.add(conn)
        try:
            await self._gateway_open.wait()
            hello = {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["emulator"]}
            await self._send(conn, {"op": OP_HELLO, "d": hello, "s": None, "t": None})
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_gateway_frame(conn, json.loads(msg.data))
                elif msg.type is WSMsgType.BINARY:
                    await self._on_gateway_frame(conn, json.loads(msg.data.decode()))
        finally:
            self._connections.discard(conn)
            session = conn.session
            if session is not None and session.conn is conn:
                session.conn = None
                # A client closing with 1000/1001 ends its session (Discord's rule).
                if not conn.dropped and ws.close_code in (1000, 1001):
                    session.alive = False
        return ws

    async def _on_gateway_frame(self, conn: _Connection, frame: JsonDict) -> None:
        self.gateway_frames.append(frame)
        op, data = frame.get("op"), frame.get("d")
        if op == OP_HEARTBEAT:
            self.heartbeat_count += 1
            await self._send(conn, {"op": OP_HEARTBEAT_ACK, "d": None})
        elif op == OP_IDENTIFY:
            await self._identify(conn, data or {})
        elif op == OP_RESUME:
            await self._resume(conn, data or {})
        elif op == OP_PRESENCE_UPDATE:
            self.presence_updates.append(data or {})
        elif op == OP_REQUEST_GUILD_MEMBERS:
            await self._request_members(conn, data or {})
        # Other opcodes (4 voice state, ...) are recorded in gateway_frames and ignored.

    async def _identify(self, conn: _Connection, data: JsonDict) -> None:
        if conn.session is not None:
            await conn.ws.close(code=4005, message=b"Already authenticated.")
            return
        self.identifies.append(data)
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = data.get("intents")
        if not isinstance(intents, int):
            await conn.ws.close(code=4013, message=b"Invalid intent(s).")
            return
        if self.refuse_intents and intents & PRIVILEGED_INTENTS:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        shard = data.get("shard") or [0, 1]
        session = _Session(uuid.uuid4().hex, intents, list(shard))
        self.sessions[session.id] = session
        conn.session, session.conn = session, conn
        ready = {
            "v": 10,
            "user": {
                **self.users[self.bot_id],
                "verified": True,
                "mfa_enabled": False,
                "email": None,
            },
            "guilds": [{"id": gid, "unavailable": True} for gid in self.guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "shard": session.shard,
            "application": {"id": self.application_id, "flags": APPLICATION_FLAGS},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
            "auth": {},
            "_trace": ["emulator"],
        }
        await self._dispatch_to(session, "READY", ready)
        if intents & INTENT_GUILDS:
            for guild_id in self.guilds:
                everyone = bool(intents & INTENT_GUILD_MEMBERS)
                guild = self._guild_create(guild_id, all_members=everyone)
                await self._dispatch_to(session, "GUILD_CREATE", guild)

    async def _resume(self, conn: _Connection, data: JsonDict) -> None:
        session = self.sessions.get(str(data.get("session_id")))
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        if session is None or not session.alive:
            self.resume_failures += 1
            await self._send(conn, {"op": OP_INVALID_SESSION, "d": False})
            return
        seq = data.get("seq") or 0
        async with session.lock:
            previous = session.conn
            session.conn, conn.session = conn, session
            if previous is not None and previous is not conn:
                previous.dropped = True
                previous.session = None
                asyncio.get_running_loop().create_task(previous.ws.close(code=4000))
            for frame in session.frames:
                if frame["s"] > seq:
                    self.replayed_count += 1
                    await self._send(conn, frame)
        self.resumes.append(data)
        await self._dispatch_to(session, "RESUMED", {"_trace": ["emulator"]})

    async def _request_members(self, conn: _Connection, data: JsonDict) -> None:
        guild = self.guilds.get(_sid(data.get("guild_id")))
        if guild is None:
            return
        wanted = data.get("user_ids")
        ids = [_sid(u) for u in wanted] if wanted else list(guild.members)
        query = str(data.get("query") or "").lower()
        members = [
            self._member(guild.id, uid, with_user=True)
            for uid in ids
            if uid in guild.members and self.users[uid]["username"].startswith(query)
        ]
        chunk = {
            "guild_id": guild.id,
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [u for u in ids if u not in guild.members],
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        if conn.session is not None:
            await self._dispatch_to(conn.session, "GUILD_MEMBERS_CHUNK", chunk)

    # -- payload builders -------------------------------------------------------------------

    @staticmethod
    def _role(role_id: str, name: str, position: int, permissions: str) -> JsonDict:
        return {
            "id": role_id,
            "name": name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": position,
            "permissions": permissions,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }

    def _member(self, guild_id: str, user_id: str, *, with_user: bool = False) -> JsonDict:
        member = dict(self.guilds[guild_id].members[user_id])
        if with_user:
            member["user"] = self.users[user_id]
        return member

    def _guild_payload(self, guild_id: str) -> JsonDict:
        """A guild object as REST returns it (no channels/members)."""
        guild = self.guilds[guild_id]
        return {
            "id": guild.id,
            "name": guild.name,
            "icon": None,
            "icon_hash": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": guild.owner_id,
            "region": "deprecated",
            "afk_channel_id": None,
            "afk_timeout": 300,
            "widget_enabled": False,
            "widget_channel_id": None,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": guild.roles,
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "nsfw_level": 0,
            "application_id": None,
            "system_channel_id": guild.channel_ids[0] if guild.channel_ids else None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "max_presences": None,
            "max_members": 500000,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "max_video_channel_users": 25,
            "max_stage_video_channel_users": 50,
            "incidents_data": None,
        }

    def _guild_create(self, guild_id: str, *, all_members: bool) -> JsonDict:
        """The full guild of GUILD_CREATE: channels, active threads and members: all of
        them with the GUILD_MEMBERS intent (member_count == len(members), so discord.py
        needs no chunking), else only the bot, as Discord does."""
        guild = self.guilds[guild_id]
        channels = [
            {k: v for k, v in self.channels[cid].items() if k != "guild_id"}
            for cid in guild.channel_ids
        ]
        threads = [
            c
            for c in self.channels.values()
            if c.get("guild_id") == guild_id
            and c["type"] in THREAD_TYPES
            and not c["thread_metadata"]["archived"]
        ]
        member_ids = list(guild.members) if all_members else [self.bot_id]
        members = [self._member(guild_id, uid, with_user=True) for uid in member_ids]
        return {
            **self._guild_payload(guild_id),
            "joined_at": guild.joined_at,
            "large": False,
            "unavailable": False,
            "member_count": len(guild.members),
            "members": members,
            "channels": channels,
            "threads": threads,
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "embedded_activities": [],
        }

    def _new_thread(
        self,
        parent_id: str,
        name: str,
        *,
        thread_id: str | None,
        owner_id: str,
        thread_type: int,
        auto_archive_duration: int = 1440,
    ) -> JsonDict:
        parent = self.channels[parent_id]
        guild_id = parent["guild_id"]
        thread_id = thread_id or self.next_id()
        now = _now_iso()
        thread: JsonDict = {
            "id": thread_id,
            "type": thread_type,
            "guild_id": guild_id,
            "parent_id": parent_id,
            "owner_id": owner_id,
            "name": name,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "message_count": 0,
            "member_count": 1,
            "total_message_sent": 0,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": auto_archive_duration,
                "archive_timestamp": now,
                "locked": False,
                "create_timestamp": now,
            },
        }
        if thread_type == CHANNEL_PRIVATE_THREAD:
            thread["thread_metadata"]["invitable"] = True
        if owner_id == self.bot_id:
            thread["member"] = {
                "id": thread_id,
                "user_id": self.bot_id,
                "join_timestamp": now,
                "flags": 0,
            }
        self.channels[thread_id] = thread
        self.threads.append(thread)
        return thread

    def _message(
        self,
        *,
        channel_id: str,
        guild_id: str | None,
        author_id: str,
        content: str,
        mention_ids: Sequence[str] | None = None,
        mention_everyone: bool = False,
        mention_roles: Sequence[str] = (),
        message_reference: Mapping[str, Any] | None = None,
        referenced_message: JsonDict | None = None,
        embeds: Sequence[JsonDict] = (),
        attachments: Sequence[JsonDict] = (),
        components: Sequence[JsonDict] = (),
        flags: int = 0,
        message_type: int | None = None,
        extra: JsonDict | None = None,
    ) -> JsonDict:
        """Builds and stores a complete message object."""
        mention_ids = _mentioned_ids(content) if mention_ids is None else mention_ids
        mentions = []
        for uid in dict.fromkeys(mention_ids):
            if uid not in self.users:
                continue
            mentioned = dict(self.users[uid])
            if guild_id is not None and uid in self.guilds[guild_id].members:
                mentioned["member"] = self._member(guild_id, uid)
            mentions.append(mentioned)
        message_id = self.next_id()
        if message_type is None:
            message_type = MESSAGE_REPLY if message_reference else MESSAGE_DEFAULT
        message: JsonDict = {
            "id": message_id,
            "channel_id": channel_id,
            "author": self.users[author_id],
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": mention_everyone,
            "mentions": mentions,
            "mention_roles": list(mention_roles),
            "mention_channels": [],
            "attachments": list(attachments),
            "embeds": list(embeds),
            "reactions": [],
            "pinned": False,
            "type": message_type,
            "flags": flags,
            "components": list(components),
            "sticker_items": [],
        }
        if guild_id is not None:
            message["guild_id"] = guild_id
            if author_id in self.guilds[guild_id].members:
                message["member"] = self._member(guild_id, author_id)
        if message_reference is not None:
            reference: JsonDict = {"type": 0}
            for key, value in message_reference.items():
                if key in ("channel_id", "message_id", "guild_id"):
                    reference[key] = _sid(value)
            message["message_reference"] = reference
            message["referenced_message"] = referenced_message
        if extra:
            message.update(extra)
        self._messages[message_id] = message
        channel = self.channels.get(channel_id)
        if channel is not None:
            channel["last_message_id"] = message_id
            if channel["type"] in THREAD_TYPES:
                channel["message_count"] += 1
                channel["total_message_sent"] += 1
        return message

    # -- REST -------------------------------------------------------------------------------

    def _build_routes(self) -> list[_Route]:
        table: list[tuple[str, str, Callable[[RestCall, dict[str, str]], Awaitable[Reply]]]] = [
            ("GET", r"/gateway", self._get_gateway),
            ("GET", r"/gateway/bot", self._get_gateway_bot),
            ("GET", r"/users/@me", self._get_me),
            ("GET", r"/users/(?P<user_id>\d+)", self._get_user),
            ("POST", r"/users/@me/channels", self._create_dm),
            ("GET", r"/oauth2/applications/@me", self._get_application),
            ("GET", r"/applications/@me", self._get_application),
            ("GET", r"/channels/(?P<channel_id>\d+)", self._get_channel),
            ("GET", r"/channels/(?P<channel_id>\d+)/messages", self._get_messages),
            ("POST", r"/channels/(?P<channel_id>\d+)/messages", self._post_message),
            ("GET", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)", self._get_msg),
            ("PATCH", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)", self._edit),
            ("DELETE", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)", self._delete),
            ("POST", r"/channels/(?P<channel_id>\d+)/typing", self._post_typing),
            (
                "POST",
                r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)/threads",
                self._thread_from_message,
            ),
            ("POST", r"/channels/(?P<channel_id>\d+)/threads", self._thread_without_message),
            ("PUT", r"/channels/(?P<channel_id>\d+)/thread-members/@me", self._no_content),
            (
                "PUT",
                r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)"
                r"/reactions/(?P<emoji>[^/]+)/@me",
                self._add_reaction,
            ),
            (
                "DELETE",
                r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)"
                r"/reactions/(?P<emoji>[^/]+)/@me",
                self._remove_reaction,
            ),
            ("GET", r"/guilds/(?P<guild_id>\d+)", self._get_guild),
            ("GET", r"/guilds/(?P<guild_id>\d+)/channels", self._get_guild_channels),
            ("GET", r"/guilds/(?P<guild_id>\d+)/members/(?P<user_id>\d+)", self._get_member),
        ]
        commands = r"/applications/(?P<app_id>\d+)(?:/guilds/(?P<guild_id>\d+))?/commands"
        table += [
            ("GET", commands, self._get_commands),
            ("PUT", commands, self._put_commands),
            ("POST", commands, self._post_command),
        ]
        routes = [_Route(m, re.compile(p + "/?"), h) for m, p, h in table]
        webhook = r"/webhooks/(?P<app_id>\d+)/(?P<token>[^/]+)"
        message = webhook + r"/messages/(?P<message_id>@original|\d+)"
        routes += [
            _Route(
                "POST",
                re.compile(r"/interactions/(?P<interaction_id>\d+)/(?P<token>[^/]+)/callback"),
                self._interaction_callback,
                auth=False,
            ),
            _Route("POST", re.compile(webhook), self._post_followup, auth=False),
            _Route("GET", re.compile(message), self._get_webhook_message, auth=False),
            _Route("PATCH", re.compile(message), self._edit_webhook_message, auth=False),
            _Route("DELETE", re.compile(message), self._delete_webhook_message, auth=False),
        ]
        return routes

    async def _handle_rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body, files = await _read_body(request)
        call = RestCall(request.method, path, dict(request.query), body, dict(request.headers))
        if files:
            call.body = {**(body or {}), "_files": files}
        self.requests.append(call)
        status, payload, headers = await self._answer(call)
        call.status, call.response = status, payload
        if payload is None:
            return web.Response(status=status, headers=headers)
        headers = {**headers, "Content-Type": "application/json"}  # exactly this
        return web.Response(status=status, body=json.dumps(payload).encode(), headers=headers)

    async def _answer(self, call: RestCall) -> tuple[int, Any, dict[str, str]]:
        matches = [(r, r.pattern.fullmatch(call.path)) for r in self._routes]
        matching = [(r, m) for r, m in matches if m is not None]
        found = next(((r, m) for r, m in matching if r.method == call.method), None)
        if found is None:
            if matching:
                return 405, {"message": "405: Method Not Allowed", "code": 0}, {}
            return 404, {"message": "404: Not Found", "code": 0}, {}
        route, match = found
        if route.auth and call.headers.get("Authorization") != f"Bot {self.token}":
            return 401, {"message": "401: Unauthorized", "code": 0}, {}
        fault = self._take_fault(call)
        if fault is not None:
            return fault
        params = {k: v for k, v in match.groupdict().items() if v is not None}
        status, payload = await route.handler(call, params)
        return status, payload, {}

    def _take_fault(self, call: RestCall) -> tuple[int, Any, dict[str, str]] | None:
        fault = next((f for f in self._faults if call.route.startswith(f.route_prefix)), None)
        if fault is None:
            return None
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._faults.remove(fault)
        if fault.status != 429:
            return fault.status, fault.body, {}
        retry_after = fault.retry_after_s
        body = {"message": "You are being rate limited.", "retry_after": retry_after}
        body["global"] = fault.global_
        headers = {
            "Retry-After": str(max(1, int(retry_after + 0.999))),
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Bucket": "emulated-bucket",
            "X-RateLimit-Scope": "global" if fault.global_ else "user",
            # discord.py treats a 429 without Via as a Cloudflare ban and does not retry.
            "Via": "1.1 google",
        }
        if fault.global_:
            headers["X-RateLimit-Global"] = "true"
        return 429, body, headers

    # -- REST handlers -----------------------------------------------------------------------

    async def _no_content(self, call: RestCall, p: dict[str, str]) -> Reply:
        return 204, None

    async def _get_gateway(self, call: RestCall, p: dict[str, str]) -> Reply:
        return 200, {"url": self.gateway_url}

    async def _get_gateway_bot(self, call: RestCall, p: dict[str, str]) -> Reply:
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return 200, {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}

    async def _get_me(self, call: RestCall, p: dict[str, str]) -> Reply:
        me = {**self.users[self.bot_id], "verified": True, "mfa_enabled": False, "email": None}
        return 200, {**me, "locale": "en-US"}

    async def _get_user(self, call: RestCall, p: dict[str, str]) -> Reply:
        user = self.users.get(p["user_id"])
        return (200, user) if user else _error(404, 10013, "Unknown User")

    async def _get_application(self, call: RestCall, p: dict[str, str]) -> Reply:
        owner = self.guilds[next(iter(self.guilds))].owner_id if self.guilds else ANN_ID
        return 200, {
            "id": self.application_id,
            "name": self.bot_name,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "bot": self.users[self.bot_id],
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "flags": 0 if self.refuse_intents else APPLICATION_FLAGS,
            "owner": self.users.get(owner) or self.users[self.bot_id],
            "team": None,
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "tags": [],
        }

    async def _create_dm(self, call: RestCall, p: dict[str, str]) -> Reply:
        recipient = _sid((call.body or {}).get("recipient_id"))
        if recipient not in self.users:
            return _form_error("recipient_id", "NUMBER_TYPE_COERCE", "Value is not snowflake.")
        return 200, self.channels[self.dm_channel_id(recipient)]

    async def _get_channel(self, call: RestCall, p: dict[str, str]) -> Reply:
        channel = self.channels.get(p["channel_id"])
        return (200, channel) if channel else _error(404, 10003, "Unknown Channel")

    async def _get_messages(self, call: RestCall, p: dict[str, str]) -> Reply:
        if p["channel_id"] not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        limit = int(call.query.get("limit", 50))
        found = sorted(
            (m for m in self._messages.values() if m["channel_id"] == p["channel_id"]),
            key=lambda m: int(m["id"]),
        )
        if "before" in call.query:
            found = [m for m in found if int(m["id"]) < int(call.query["before"])][-limit:]
        elif "after" in call.query:
            found = [m for m in found if int(m["id"]) > int(call.query["after"])][:limit]
        elif "around" in call.query:
            around = int(call.query["around"])
            index = next((i for i, m in enumerate(found) if int(m["id"]) >= around), len(found))
            start = max(0, index - limit // 2)
            found = found[start : start + limit]
        else:
            found = found[-limit:]
        return 200, list(reversed(found))  # newest first, as Discord answers

    def _find_message(self, p: dict[str, str]) -> JsonDict | None:
        message = self._messages.get(p["message_id"])
        if message is None or message["channel_id"] != p["channel_id"]:
            return None
        return message

    async def _get_msg(self, call: RestCall, p: dict[str, str]) -> Reply:
        message = self._find_message(p)
        return (200, message) if message else _error(404, 10008, "Unknown Message")

    def _check_content(self, body: JsonDict, files: Sequence[JsonDict]) -> Reply | None:
        content = body.get("content") or ""
        if len(content) > MAX_CONTENT_LENGTH:
            return _form_error(
                "content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length."
            )
        has_other = any(body.get(k) for k in ("embeds", "components", "sticker_ids", "poll"))
        if not content and not has_other and not files:
            return _error(400, 50006, "Cannot send an empty message")
        return None

    async def _post_message(self, call: RestCall, p: dict[str, str]) -> Reply:
        channel_id = p["channel_id"]
        channel = self.channels.get(channel_id)
        if channel is None:
            return _error(404, 10003, "Unknown Channel")
        body: JsonDict = dict(call.body or {})
        files: list[JsonDict] = body.pop("_files", [])
        problem = self._check_content(body, files)
        if problem is not None:
            return problem
        reference = body.get("message_reference")
        referenced = None
        if reference:
            referenced = self._messages.get(_sid(reference.get("message_id")))
            if referenced is None and reference.get("fail_if_not_exists", True):
                return _form_error(
                    "message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message"
                )
            reference = {"channel_id": channel_id, **reference}
        nonce = body.get("nonce")
        if body.get("enforce_nonce") and nonce is not None:
            # As Discord does: the same nonce again (within minutes) returns the message
            # already created instead of a second one.
            earlier = self._nonces.get((channel_id, str(nonce)))
            if earlier is not None and earlier in self._messages:
                return 200, self._messages[earlier]
        content = body.get("content") or ""
        attachments = [
            {**f, "id": self.next_id(), "url": f"https://cdn.invalid/{f['filename']}"}
            for f in files
        ]
        for attachment in attachments:
            attachment["proxy_url"] = attachment["url"]
        message = self._message(
            channel_id=channel_id,
            guild_id=channel.get("guild_id"),
            author_id=self.bot_id,
            content=content,
            message_reference=reference if referenced is not None else None,
            referenced_message=referenced,
            embeds=body.get("embeds") or [],
            attachments=attachments,
            components=body.get("components") or [],
            flags=int(body.get("flags") or 0),
            extra={"nonce": body["nonce"]} if body.get("nonce") is not None else None,
        )
        if nonce is not None:
            self._nonces[(channel_id, str(nonce))] = message["id"]
        self.sent.append(
            {
                "id": message["id"],
                "channel_id": channel_id,
                "content": content,
                "message_reference": body.get("message_reference"),
                "allowed_mentions": body.get("allowed_mentions"),
                "embeds": body.get("embeds") or [],
                "files": [f["filename"] for f in files],
                "payload": body,
            }
        )
        if self.echo_own_messages:
            await self._dispatch_message("MESSAGE_CREATE", message)
        return 200, message

    async def _edit(self, call: RestCall, p: dict[str, str]) -> Reply:
        message = self._find_message(p)
        if message is None:
            return _error(404, 10008, "Unknown Message")
        if message["author"]["id"] != self.bot_id:
            return _error(403, 50005, "Cannot edit a message authored by another user")
        body: JsonDict = dict(call.body or {})
        body.pop("_files", None)
        message = await self._apply_edit(message, body)
        self.edits.append(
            {
                "channel_id": p["channel_id"],
                "message_id": message["id"],
                "content": message["content"],
                "payload": body,
            }
        )
        return 200, message

    async def _apply_edit(self, message: JsonDict, body: JsonDict) -> JsonDict:
        for key in ("content", "embeds", "components"):
            if body.get(key) is not None:
                message[key] = body[key]
        if body.get("content") is not None:
            mentioned = _mentioned_ids(message["content"])
            message["mentions"] = [self.users[u] for u in mentioned if u in self.users]
        if body.get("flags") is not None:
            message["flags"] = int(body["flags"])
        message["flags"] &= ~FLAG_LOADING
        message["edited_timestamp"] = _now_iso()
        if self.echo_own_messages and not message["flags"] & FLAG_EPHEMERAL:
            await self._dispatch_message("MESSAGE_UPDATE", message)
        return message

    async def _delete(self, call: RestCall, p: dict[str, str]) -> Reply:
        message = self._find_message(p)
        if message is None:
            return _error(404, 10008, "Unknown Message")
        await self._remove_message(message)
        self.deletions.append({"channel_id": p["channel_id"], "message_id": message["id"]})
        return 204, None

    async def _remove_message(self, message: JsonDict) -> None:
        del self._messages[message["id"]]
        if self.echo_own_messages and not message["flags"] & FLAG_EPHEMERAL:
            deleted = {"id": message["id"], "channel_id": message["channel_id"]}
            intent = INTENT_DIRECT_MESSAGES
            if "guild_id" in message:
                deleted["guild_id"] = message["guild_id"]
                intent = INTENT_GUILD_MESSAGES
            await self.dispatch("MESSAGE_DELETE", deleted, intent=intent)

    async def _post_typing(self, call: RestCall, p: dict[str, str]) -> Reply:
        if p["channel_id"] not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        self.typing.append(p["channel_id"])
        return 204, None

    async def _thread_from_message(self, call: RestCall, p: dict[str, str]) -> Reply:
        channel = self.channels.get(p["channel_id"])
        if channel is None or channel["type"] != CHANNEL_GUILD_TEXT:
            return _error(404, 10003, "Unknown Channel")
        if self._find_message(p) is None:
            return _error(404, 10008, "Unknown Message")
        if p["message_id"] in self.channels:
            return _error(400, 160004, "A thread has already been created for this message")
        return await self._bot_thread(call, p, p["message_id"], CHANNEL_PUBLIC_THREAD)

    async def _thread_without_message(self, call: RestCall, p: dict[str, str]) -> Reply:
        channel = self.channels.get(p["channel_id"])
        if channel is None or channel["type"] != CHANNEL_GUILD_TEXT:
            return _error(404, 10003, "Unknown Channel")
        thread_type = int((call.body or {}).get("type") or CHANNEL_PRIVATE_THREAD)
        return await self._bot_thread(call, p, None, thread_type)

    async def _bot_thread(
        self, call: RestCall, p: dict[str, str], thread_id: str | None, thread_type: int
    ) -> Reply:
        body = call.body or {}
        name = str(body.get("name") or "")
        if not name:
            return _form_error("name", "BASE_TYPE_REQUIRED", "This field is required")
        thread = self._new_thread(
            p["channel_id"],
            name,
            thread_id=thread_id,
            owner_id=self.bot_id,
            thread_type=thread_type,
            auto_archive_duration=int(body.get("auto_archive_duration") or 1440),
        )
        await self.dispatch(
            "THREAD_CREATE", {**thread, "newly_created": True}, intent=INTENT_GUILDS
        )
        return 201, thread

    async def _add_reaction(self, call: RestCall, p: dict[str, str]) -> Reply:
        if self._find_message(p) is None:
            return _error(404, 10008, "Unknown Message")
        self.reactions.append((p["channel_id"], p["message_id"], unquote(p["emoji"])))
        return 204, None

    async def _remove_reaction(self, call: RestCall, p: dict[str, str]) -> Reply:
        key = (p["channel_id"], p["message_id"], unquote(p["emoji"]))
        if key in self.reactions:
            self.reactions.remove(key)
        return 204, None

    async def _get_guild(self, call: RestCall, p: dict[str, str]) -> Reply:
        if p["guild_id"] not in self.guilds:
            return _error(404, 10004, "Unknown Guild")
        guild = self._guild_payload(p["guild_id"])
        count = len(self.guilds[p["guild_id"]].members)
        if call.query.get("with_counts") in ("true", "1", "True"):
            guild |= {"approximate_member_count": count, "approximate_presence_count": count}
        return 200, guild

    async def _get_guild_channels(self, call: RestCall, p: dict[str, str]) -> Reply:
        if p["guild_id"] not in self.guilds:
            return _error(404, 10004, "Unknown Guild")
        return 200, [self.channels[cid] for cid in self.guilds[p["guild_id"]].channel_ids]

    async def _get_member(self, call: RestCall, p: dict[str, str]) -> Reply:
        guild = self.guilds.get(p["guild_id"])
        if guild is None:
            return _error(404, 10004, "Unknown Guild")
        if p["user_id"] not in guild.members:
            return _error(404, 10007, "Unknown Member")
        return 200, self._member(guild.id, p["user_id"], with_user=True)

    # application commands

    def _command(self, data: JsonDict, guild_id: str | None) -> JsonDict:
        scope = self._commands.setdefault(guild_id, {})
        existing = scope.get(data["name"])
        command: JsonDict = {
            "type": 1,
            "description": "",
            "options": [],
            "default_member_permissions": None,
            "dm_permission": True,
            "nsfw": False,
            "contexts": None,
            "integration_types": [0],
            **data,
            "id": existing["id"] if existing else self.next_id(),
            "application_id": self.application_id,
            "version": self.next_id(),
        }
        if guild_id is not None:
            command["guild_id"] = guild_id
        scope[command["name"]] = command
        return command

    async def _get_commands(self, call: RestCall, p: dict[str, str]) -> Reply:
        return 200, list(self._commands.get(p.get("guild_id"), {}).values())

    async def _put_commands(self, call: RestCall, p: dict[str, str]) -> Reply:
        if p["app_id"] != self.application_id:
            return _error(403, 50001, "Missing Access")
        guild_id = p.get("guild_id")
        body = call.body if isinstance(call.body, list) else []
        result = [self._command(d, guild_id) for d in body]
        self._commands[guild_id] = {c["name"]: c for c in result}
        self.command_syncs.append((guild_id, [c["name"] for c in result]))
        return 200, result

    async def _post_command(self, call: RestCall, p: dict[str, str]) -> Reply:
        if p["app_id"] != self.application_id:
            return _error(403, 50001, "Missing Access")
        guild_id = p.get("guild_id")
        existed = (call.body or {}).get("name") in self._commands.get(guild_id, {})
        command = self._command(dict(call.body or {}), guild_id)
        return (200 if existed else 201), command

    # interactions

    def _interaction_message(
        self, record: _Interaction, data: JsonDict, *, original: bool, loading: bool = False
    ) -> JsonDict:
        flags = int(data.get("flags") or 0) | (FLAG_LOADING if loading else 0)
        extra: JsonDict = {"webhook_id": self.application_id, "application_id": self.application_id}
        if original:
            extra["interaction_metadata"] = {
                "id": record.id,
                "type": 2,
                "name": record.name,
                "command_type": 1,
                "user": self.users[record.user_id],
                "authorizing_integration_owners": (
                    {"0": record.guild_id} if record.guild_id else {"1": record.user_id}
                ),
            }
        message = self._message(
            channel_id=record.channel_id,
            guild_id=record.guild_id,
            author_id=self.bot_id,
            content=str(data.get("content") or ""),
            embeds=data.get("embeds") or [],
            components=data.get("components") or [],
            flags=flags,
            message_type=MESSAGE_CHAT_INPUT_COMMAND if original else MESSAGE_DEFAULT,
            extra=extra,
        )
        record.message_ids.append(message["id"])
        if original:
            record.original_id = message["id"]
        return message

    async def _interaction_callback(self, call: RestCall, p: dict[str, str]) -> Reply:
        record = self._interactions.get(p["token"])
        if record is None or record.id != p["interaction_id"]:
            return _error(404, 10062, "Unknown interaction")
        if record.acked:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        body = call.body or {}
        callback_type = int(body.get("type") or 0)
        data = dict(body.get("data") or {})
        record.acked = True
        self.interaction_responses.append(
            {
                "kind": "callback",
                "interaction_id": record.id,
                "token": record.token,
                "type": callback_type,
                "content": data.get("content"),
                "data": data,
            }
        )
        message = None
        if callback_type in (4, 5):
            message = self._interaction_message(
                record, data, original=True, loading=callback_type == 5
            )
            if self.echo_own_messages and not message["flags"] & FLAG_EPHEMERAL:
                await self._dispatch_message("MESSAGE_CREATE", message)
        if call.query.get("with_response") not in ("1", "true", "True"):
            return 204, None
        flags = int(data.get("flags") or 0)
        interaction: JsonDict = {
            "id": record.id,
            "type": record.type,
            "response_message_loading": callback_type == 5,
            "response_message_ephemeral": bool(flags & FLAG_EPHEMERAL),
        }
        result: JsonDict = {"interaction": interaction}
        if message is not None:
            interaction["response_message_id"] = message["id"]
            result["resource"] = {"type": callback_type, "message": message}
        return 200, result

    def _webhook_record(self, p: dict[str, str]) -> _Interaction | None:
        record = self._interactions.get(p["token"])
        if record is None or p["app_id"] != self.application_id or not record.acked:
            return None
        return record

    async def _post_followup(self, call: RestCall, p: dict[str, str]) -> Reply:
        record = self._webhook_record(p)
        if record is None:
            return _error(404, 10015, "Unknown Webhook")
        body: JsonDict = dict(call.body or {})
        files = body.pop("_files", [])
        problem = self._check_content(body, files)
        if problem is not None:
            return problem
        original = self._messages.get(record.original_id or "")
        if original is not None and original["flags"] & FLAG_LOADING:
            # The first followup after a defer fills in the "thinking" message.
            keep = original["flags"] & FLAG_EPHEMERAL
            message = await self._apply_edit(original, {**body, "flags": keep})
        else:
            message = self._interaction_message(record, body, original=False)
            if self.echo_own_messages and not message["flags"] & FLAG_EPHEMERAL:
                await self._dispatch_message("MESSAGE_CREATE", message)
        self.interaction_responses.append(
            {
                "kind": "followup",
                "token": record.token,
                "message_id": message["id"],
                "content": message["content"],
                "payload": body,
            }
        )
        if call.query.get("wait") in ("1", "true", "True"):
            return 200, message
        return 204, None

    def _webhook_message(self, record: _Interaction, p: dict[str, str]) -> JsonDict | None:
        message_id = record.original_id if p["message_id"] == "@original" else p["message_id"]
        if message_id not in record.message_ids:
            return None
        return self._messages.get(message_id or "")

    async def _get_webhook_message(self, call: RestCall, p: dict[str, str]) -> Reply:
        record = self._webhook_record(p)
        message = self._webhook_message(record, p) if record else None
        return (200, message) if message else _error(404, 10008, "Unknown Message")

    async def _edit_webhook_message(self, call: RestCall, p: dict[str, str]) -> Reply:
        record = self._webhook_record(p)
        message = self._webhook_message(record, p) if record else None
        if record is None or message is None:
            return _error(404, 10008, "Unknown Message")
        body: JsonDict = dict(call.body or {})
        body.pop("_files", None)
        message = await self._apply_edit(message, body)
        self.interaction_responses.append(
            {
                "kind": "edit",
                "token": record.token,
                "message_id": message["id"],
                "content": message["content"],
                "payload": body,
            }
        )
        return 200, message

    async def _delete_webhook_message(self, call: RestCall, p: dict[str, str]) -> Reply:
        record = self._webhook_record(p)
        message = self._webhook_message(record, p) if record else None
        if record is None or message is None:
            return _error(404, 10008, "Unknown Message")
        await self._remove_message(message)
        self.interaction_responses.append(
            {"kind": "delete", "token": record.token, "message_id": message["id"]}
        )
        return 204, None


# ---------------------------------------------------------------------------
# Helpers


def _mentioned_ids(content: str) -> list[str]:
    return list(dict.fromkeys(_USER_MENTION.findall(content)))


def _options(options: Mapping[str, Any] | Sequence[JsonDict] | None) -> list[JsonDict]:
    if options is None:
        return []
    if not isinstance(options, Mapping):
        return [dict(o) for o in options]
    result = []
    for name, value in options.items():
        if isinstance(value, bool):
            option_type = 5
        elif isinstance(value, int):
            option_type = 4
        elif isinstance(value, float):
            option_type = 10
        else:
            option_type = 3
        result.append({"name": name, "type": option_type, "value": value})
    return result


_file_counter = itertools.count()


async def _read_body(request: web.Request) -> tuple[Any, list[JsonDict]]:
    """The JSON body (or a multipart body's payload_json) and the uploaded files."""
    if not request.can_read_body:
        return None, []
    if request.content_type == "application/json":
        return await request.json(), []
    if request.content_type == "multipart/form-data":
        form = await request.post()
        payload: Any = None
        files: list[JsonDict] = []
        for name, value in form.items():
            if name == "payload_json" and isinstance(value, str):
                payload = json.loads(value)
            elif isinstance(value, web.FileField):
                data = value.file.read()
                files.append(
                    {
                        "filename": value.filename or f"file{next(_file_counter)}",
                        "size": len(data),
                        "content_type": value.content_type,
                    }
                )
        return payload, files
    text = await request.text()
    return (text or None), []
