"""A local Slack for tests: a fake Web API and Socket Mode server, plus Events API helpers.

In the style of bolt-python's own scenario tests (a local HTTP server standing in for
slack.com), but on aiohttp and asyncio so that the real `slack_sdk.AsyncWebClient`, bolt's
`AsyncApp` and the aiohttp Socket Mode client run unchanged against it:

    async with SlackEmulator() as slack:
        client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
        app = AsyncApp(client=client, signing_secret="secret")
        handler = AsyncSocketModeHandler(app, slack.app_token)  # uses app.client
        await handler.connect_async()
        await slack.wait_socket_connected()
        envelope_id = await slack.socket_send_event(app_mention("<@UBOT> hi"))
        await slack.wait_for(lambda: envelope_id in slack.socket_acks)
        await handler.close_async()  # before the emulator stops, or it keeps reconnecting

What the real clients send, as read in slack_sdk 3.47 (the emulator accepts all of it):
the token travels in `Authorization: Bearer ...`; chat.postMessage, chat.update and
assistant.threads.* send a JSON body; auth.test, chat.delete, reactions.* and
apps.connections.open send their arguments as URL query parameters of a POST;
users.info and conversations.info are GETs with query parameters.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

JsonDict = dict[str, Any]
Handler = Callable[[JsonDict], JsonDict]

DEFAULT_TEAM_ID = "T0001"
DEFAULT_BOT_USER_ID = "UBOT"
DEFAULT_BOT_ID = "BBOT"
DEFAULT_APP_ID = "A0001"
BOT_SCOPES = "app_mentions:read,channels:history,chat:write,groups:history,im:history,users:read"

# One counter for every ts the emulator and the builders hand out, so that message
# timestamps are unique and increase in creation order, as Slack's do.
_ts_counter = itertools.count(100)
_event_counter = itertools.count(1)


def next_ts() -> str:
    """A fresh Slack message timestamp ("1700000000.000100", "1700000000.000101", ...)."""
    n = next(_ts_counter)
    return f"{1_700_000_000 + n // 1_000_000}.{n % 1_000_000:06d}"


def _next_event_id() -> str:
    return f"Ev{next(_event_counter):08d}"


# ---------------------------------------------------------------------------
# Events API helpers (module level: they need no emulator)


def sign_request(
    signing_secret: str,
    body: bytes,
    timestamp: int | None = None,
    *,
    content_type: str = "application/json",
) -> dict[str, str]:
    """Headers Slack sends with a signed request: X-Slack-Signature (v0=HMAC-SHA256 of
    "v0:{timestamp}:{body}"), X-Slack-Request-Timestamp and Content-Type."""
    ts = int(time.time()) if timestamp is None else timestamp
    base = f"v0:{ts}:".encode() + body
    digest = hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()
    return {
        "Content-Type": content_type,
        "X-Slack-Signature": f"v0={digest}",
        "X-Slack-Request-Timestamp": str(ts),
    }


def event_callback(
    event: JsonDict,
    *,
    team_id: str = DEFAULT_TEAM_ID,
    event_id: str | None = None,
    api_app_id: str = DEFAULT_APP_ID,
    bot_user_id: str = DEFAULT_BOT_USER_ID,
) -> JsonDict:
    """Wraps an inner event as the Events API `event_callback` payload Slack delivers."""
    return {
        "token": "verification-token",
        "team_id": team_id,
        "context_team_id": team_id,
        "context_enterprise_id": None,
        "api_app_id": api_app_id,
        "event": event,
        "type": "event_callback",
        "event_id": event_id or _next_event_id(),
        "event_time": int(time.time()),
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": team_id,
                "user_id": bot_user_id,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": f"4-{uuid.uuid4().hex}",
    }


def app_mention(
    text: str,
    *,
    user: str = "U1",
    channel: str = "C1",
    ts: str | None = None,
    thread_ts: str | None = None,
    team: str = DEFAULT_TEAM_ID,
) -> JsonDict:
    """An `app_mention` event. `text` is verbatim: write the mention ("<@UBOT> hi") yourself."""
    ts = ts or next_ts()
    event: JsonDict = {
        "client_msg_id": str(uuid.uuid4()),
        "type": "app_mention",
        "text": text,
        "user": user,
        "ts": ts,
        "team": team,
        "channel": channel,
        "event_ts": ts,
    }
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
    return event


def message(
    text: str,
    *,
    user: str = "U1",
    channel: str = "C1",
    channel_type: str = "channel",
    ts: str | None = None,
    thread_ts: str | None = None,
    subtype: str | None = None,
    bot_id: str | None = None,
    team: str = DEFAULT_TEAM_ID,
    **extra: Any,
) -> JsonDict:
    """A `message` event (channel_type "channel", "group", "im" or "mpim"). Messages from
    people carry a client_msg_id; pass bot_id for one posted by a bot. `extra` keys are
    added as they are (e.g. edited=..., hidden=True)."""
    ts = ts or next_ts()
    event: JsonDict = {"type": "message"}
    if subtype is not None:
        event["subtype"] = subtype
    if bot_id is None and subtype is None:
        event["client_msg_id"] = str(uuid.uuid4())
    event.update(
        {
            "text": text,
            "user": user,
            "ts": ts,
            "team": team,
            "channel": channel,
            "event_ts": ts,
            "channel_type": channel_type,
        }
    )
    if bot_id is not None:
        event["bot_id"] = bot_id
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
    event.update(extra)
    return event


def slash_command(
    command: str,
    text: str = "",
    *,
    user: str = "U1",
    channel: str = "C1",
    team_id: str = DEFAULT_TEAM_ID,
    api_app_id: str = DEFAULT_APP_ID,
    response_url: str = "https://hooks.slack.com/commands/T0001/1/emulated",
    trigger_id: str | None = None,
) -> dict[str, str]:
    """The form fields of a slash command invocation (all strings, as Slack posts them)."""
    return {
        "token": "verification-token",
        "team_id": team_id,
        "team_domain": "emulated",
        "channel_id": channel,
        "channel_name": "general" if channel.startswith("C") else "directmessage",
        "user_id": user,
        "user_name": f"user-{user.lower()}",
        "command": command,
        "text": text,
        "api_app_id": api_app_id,
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": trigger_id or f"trigger.{uuid.uuid4().hex}",
    }


async def post_event(
    url: str,
    signing_secret: str,
    payload: JsonDict,
    *,
    retry_num: int | None = None,
    retry_reason: str = "http_timeout",
    timestamp: int | None = None,
    signature: str | None = None,
) -> tuple[int, str]:
    """POSTs an Events API payload to a bolt endpoint as Slack does: JSON, signed with
    `signing_secret` (or with the given, e.g. forged, `signature`), and with
    X-Slack-Retry-Num / X-Slack-Retry-Reason when `retry_num` is set.
    Returns (HTTP status, response body)."""
    body = json.dumps(payload).encode()
    headers = sign_request(signing_secret, body, timestamp)
    if signature is not None:
        headers["X-Slack-Signature"] = signature
    if retry_num is not None:
        headers["X-Slack-Retry-Num"] = str(retry_num)
        headers["X-Slack-Retry-Reason"] = retry_reason
    return await _post(url, body, headers)


async def post_slash_command(
    url: str,
    signing_secret: str,
    form: Mapping[str, str],
    *,
    timestamp: int | None = None,
    signature: str | None = None,
) -> tuple[int, str]:
    """POSTs a slash command form (see `slash_command`) to a bolt endpoint, signed.
    Returns (HTTP status, response body)."""
    body = urlencode(dict(form)).encode()
    headers = sign_request(
        signing_secret, body, timestamp, content_type="application/x-www-form-urlencoded"
    )
    if signature is not None:
        headers["X-Slack-Signature"] = signature
    return await _post(url, body, headers)


PERMALINK_BASE = "https://emulated.slack.com/archives"


def block_action(
    action_id: str,
    value: str,
    *,
    user: str = "U1",
    channel: str = "C1",
    message_ts: str = "",
    thread_ts: str | None = None,
    team_id: str = DEFAULT_TEAM_ID,
    api_app_id: str = DEFAULT_APP_ID,
) -> JsonDict:
    """The payload of a button click (`block_actions`) on a bot message."""
    message: JsonDict = {"type": "message", "ts": message_ts or next_ts(), "text": ""}
    if thread_ts:
        message["thread_ts"] = thread_ts
    return {
        "type": "block_actions",
        "team": {"id": team_id, "domain": "emulated"},
        "user": {"id": user, "username": f"user-{user.lower()}", "team_id": team_id},
        "api_app_id": api_app_id,
        "token": "verification-token",
        "container": {"type": "message", "message_ts": message["ts"], "channel_id": channel},
        "trigger_id": f"trigger.{uuid.uuid4().hex}",
        "channel": {"id": channel, "name": "general"},
        "message": message,
        "response_url": "https://hooks.slack.com/actions/T0001/1/emulated",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "actions",
                "value": value,
                "action_ts": next_ts(),
            }
        ],
    }


async def post_interaction(url: str, signing_secret: str, payload: JsonDict) -> tuple[int, str]:
    """POSTs an interactivity payload as Slack does: form-encoded `payload=<json>`, signed."""
    body = urlencode({"payload": json.dumps(payload)}).encode()
    headers = sign_request(
        signing_secret, body, None, content_type="application/x-www-form-urlencoded"
    )
    return await _post(url, body, headers)


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    headers = {"User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)", **headers}
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status, await response.text()


# ---------------------------------------------------------------------------
# The emulator


@dataclass
class ApiCall:
    """One Web API request as the emulator saw it and answered it."""

    method: str
    params: JsonDict  # query parameters merged with the form or JSON body
    headers: dict[str, str]
    status: int = 200
    response: JsonDict = field(default_factory=dict)
    at_s: float = field(default_factory=time.monotonic)  # when it arrived

    @property
    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth.removeprefix("Bearer ").strip()
        token = self.params.get("token")
        return token if isinstance(token, str) else None


@dataclass
class _Fault:
    status: int
    retry_after_s: int
    error: str
    remaining: int


@dataclass
class _Message:
    channel: str
    ts: str
    text: str
    thread_ts: str | None
    blocks: Any
    deleted: bool = False
    streaming: bool = False  # opened by chat.startStream and not yet stopped or expired


class SlackEmulator:
    """A fake slack.com on 127.0.0.1: Web API under `api_url`, Socket Mode at /socket."""

    def __init__(
        self,
        *,
        team_id: str = DEFAULT_TEAM_ID,
        bot_user_id: str = DEFAULT_BOT_USER_ID,
        bot_id: str = DEFAULT_BOT_ID,
        bot_token: str = "xoxb-test",
        app_token: str = "xapp-test",
        api_app_id: str = DEFAULT_APP_ID,
    ) -> None:
        self.team_id = team_id
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.bot_token = bot_token
        self.app_token = app_token
        self.api_app_id = api_app_id

        self.calls: list[ApiCall] = []
        self.posted: list[JsonDict] = []
        self.updates: list[JsonDict] = []
        self.users: dict[str, JsonDict] = {}
        self.socket_acks: list[str] = []
        self.socket_received: list[JsonDict] = []
        self.socket_connection_count = 0
        self.response_url_posts: list[tuple[str, JsonDict]] = []
        self.usergroups: dict[str, list[str]] = {}  # usergroup id -> user ids
        self.channel_members: dict[str, list[str]] = {}

        self._messages: list[_Message] = []
        self._faults: dict[str, _Fault] = {}
        self._handlers: dict[str, Handler] = {
            "auth.test": self._auth_test,
            "apps.connections.open": self._apps_connections_open,
            "chat.postMessage": self._chat_post_message,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "chat.update": self._chat_update,
            "chat.getPermalink": self._chat_get_permalink,
            "chat.delete": self._chat_delete,
            "chat.startStream": self._chat_start_stream,
            "chat.appendStream": self._chat_append_stream,
            "chat.stopStream": self._chat_stop_stream,
            "users.info": self._users_info,
            "usergroups.users.list": self._usergroups_users_list,
            "conversations.members": self._conversations_members,
            "conversations.info": self._conversations_info,
            "assistant.threads.setStatus": _ok,
            "assistant.threads.setTitle": _ok,
            "assistant.threads.setSuggestedPrompts": _ok,
            "reactions.add": _ok,
            "reactions.remove": _ok,
        }
        self._sockets: set[web.WebSocketResponse] = set()
        self._response_url_counter = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle_api)
        app.router.add_get("/socket", self._handle_socket)
        app.router.add_post("/commands/{hook}", self._handle_response_url)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"emulator stopped")
        self._sockets.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SlackEmulator:
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
        """The Web API base, for AsyncWebClient(base_url=...)."""
        return f"http://127.0.0.1:{self.port}/api/"

    @property
    def socket_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket"

    def new_response_url(self) -> str:
        """A response_url served by the emulator; what is posted to it lands in
        `response_url_posts` as (url, json body)."""
        return f"http://127.0.0.1:{self.port}/commands/{next(self._response_url_counter)}"

    # -- configuration -----------------------------------------------------------

    def fail_next(
        self,
        method: str,
        *,
        status: int = 429,
        retry_after_s: int = 1,
        error: str = "ratelimited",
        times: int = 1,
    ) -> None:
        """The next `times` calls of `method` fail: with HTTP `status` and body
        {"ok": false, "error": error}; a 429 also carries Retry-After: retry_after_s
        (slack_sdk's rate-limit handler sleeps that plus up to one second);
        status=200 gives Slack's ordinary API error."""
        self._faults[method] = _Fault(status, retry_after_s, error, times)

    def register(self, method: str, handler: Handler) -> None:
        """Answers `method` with handler(params) (a JSON dict; "ok" defaults to true)."""
        self._handlers[method] = handler

    def add_user(
        self,
        user_id: str,
        *,
        real_name: str | None = None,
        display_name: str | None = None,
        is_bot: bool = False,
    ) -> None:
        """Overrides the profile users.info derives from the id ("User <id>")."""
        self.users[user_id] = self._user(user_id, real_name, display_name, is_bot)

    # -- inspection -------------------------------------------------------------

    def without_streaming(self) -> None:
        """Answer the streaming methods as a workspace without them does: unknown_method."""
        for method in ("chat.startStream", "chat.appendStream", "chat.stopStream"):
            self._handlers.pop(method, None)

    def expire_streams(self) -> int:
        """What Slack does to a stream after about 5 minutes: it is no longer streaming
        (appendStream and stopStream answer message_not_in_streaming_state)."""
        expired = [m for m in self._messages if m.streaming]
        for m in expired:
            m.streaming = False
        return len(expired)

    def message(self, channel: str, ts: str) -> _Message | None:
        return self._find({"channel": channel, "ts": ts})

    def calls_to(self, method: str) -> list[ApiCall]:
        return [call for call in self.calls if call.method == method]

    def messages_in(self, channel: str, thread_ts: str | None = None) -> list[str]:
        """Current text (after chat.update, without deleted ones) of the messages posted
        in `channel`, oldest first; only those in the thread `thread_ts` if given."""
        return [
            m.text
            for m in self._messages
            if m.channel == channel
            and not m.deleted
            and (thread_ts is None or m.thread_ts == thread_ts)
        ]

    async def wait_for(
        self, predicate: Callable[[], bool], timeout_s: float = 10, message: str = ""
    ) -> None:
        """Polls `predicate` until true; AssertionError after `timeout_s`."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate():
            if asyncio.get_running_loop().time() >= deadline:
                what = message or getattr(predicate, "__name__", "predicate")
                seen = [f"{c.method}({c.status})" for c in self.calls]
                raise AssertionError(
                    f"timed out after {timeout_s}s waiting for {what}; "
                    f"API calls so far: {seen}; socket acks: {self.socket_acks}"
                )
            await asyncio.sleep(0.01)

    # -- Socket Mode ------------------------------------------------------------

    @property
    def socket_connected(self) -> bool:
        return any(not ws.closed for ws in self._sockets)

    async def wait_socket_connected(self, timeout_s: float = 10) -> None:
        await self.wait_for(
            lambda: self.socket_connected, timeout_s, "a Socket Mode client to connect"
        )

    async def wait_socket_ack(self, envelope_id: str, timeout_s: float = 10) -> None:
        await self.wait_for(
            lambda: envelope_id in self.socket_acks, timeout_s, f"the ack of {envelope_id}"
        )

    def socket_response(self, envelope_id: str) -> JsonDict | None:
        """The payload the client sent with its ack of `envelope_id` (None if bare)."""
        for received in self.socket_received:
            if received.get("envelope_id") == envelope_id:
                payload = received.get("payload")
                return payload if isinstance(payload, dict) else None
        return None

    async def socket_send_event(
        self,
        event_payload: JsonDict,
        *,
        envelope_id: str | None = None,
        retry_attempt: int = 0,
        retry_reason: str = "",
    ) -> str:
        """Sends an `events_api` envelope to the connected client(s); returns its id.
        `event_payload` is an event_callback payload; a bare inner event (e.g. from
        `app_mention(...)`) is wrapped with this emulator's team and bot user."""
        if event_payload.get("type") != "event_callback":
            event_payload = event_callback(
                event_payload,
                team_id=self.team_id,
                api_app_id=self.api_app_id,
                bot_user_id=self.bot_user_id,
            )
        envelope_id = envelope_id or str(uuid.uuid4())
        await self.socket_send(
            {
                "envelope_id": envelope_id,
                "payload": event_payload,
                "type": "events_api",
                "accepts_response_payload": False,
                "retry_attempt": retry_attempt,
                "retry_reason": retry_reason,
            }
        )
        return envelope_id

    async def socket_send_slash_command(
        self, form: Mapping[str, str], *, envelope_id: str | None = None
    ) -> str:
        """Sends a `slash_commands` envelope (see `slash_command`); returns its id."""
        envelope_id = envelope_id or str(uuid.uuid4())
        await self.socket_send(
            {
                "envelope_id": envelope_id,
                "payload": dict(form),
                "type": "slash_commands",
                "accepts_response_payload": True,
            }
        )
        return envelope_id

    async def socket_send_disconnect(self, reason: str = "refresh_requested") -> None:
        """Slack's "disconnect" message: the SDK client opens a new connection."""
        await self.socket_send(
            {"type": "disconnect", "reason": reason, "debug_info": {"host": "applink-emulator"}}
        )

    async def socket_send(self, message: JsonDict) -> None:
        """Sends any JSON message to every connected Socket Mode client."""
        sockets = [ws for ws in self._sockets if not ws.closed]
        if not sockets:
            raise RuntimeError("no Socket Mode client is connected to the emulator")
        for ws in sockets:
            await ws.send_str(json.dumps(message))

    # -- HTTP handlers ------------------------------------------------------------

    async def _handle_api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        call = ApiCall(method, await _read_params(request), dict(request.headers))
        self.calls.append(call)
        status, body, headers = self._answer(call)
        call.status, call.response = status, body
        return web.json_response(body, status=status, headers=headers)

    def _answer(self, call: ApiCall) -> tuple[int, JsonDict, dict[str, str]]:
        handler = self._handlers.get(call.method)
        if handler is None:
            return 200, {"ok": False, "error": "unknown_method", "req_method": call.method}, {}
        error = self._token_error(call)
        if error is not None:
            return 200, {"ok": False, "error": error}, {}
        fault = self._faults.get(call.method)
        if fault is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                del self._faults[call.method]
            headers = {}
            if fault.status == 429:
                headers["Retry-After"] = str(fault.retry_after_s)
            return fault.status, {"ok": False, "error": fault.error}, headers
        body = {"ok": True, **handler(call.params)}
        headers = {"X-OAuth-Scopes": BOT_SCOPES} if call.method == "auth.test" else {}
        return 200, body, headers

    def _token_error(self, call: ApiCall) -> str | None:
        token = call.token
        if not token:
            return "not_authed"
        wanted = self.app_token if call.method == "apps.connections.open" else self.bot_token
        if token == wanted:
            return None
        if token in (self.app_token, self.bot_token):
            return "not_allowed_token_type"
        return "invalid_auth"

    async def _handle_socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(timeout=2.0)
        await ws.prepare(request)
        self._sockets.add(ws)
        self.socket_connection_count += 1
        await ws.send_str(
            json.dumps(
                {
                    "type": "hello",
                    "num_connections": len(self._sockets),
                    "debug_info": {
                        "host": "applink-emulator",
                        "build_number": 1,
                        "approximate_connection_time": 18060,
                    },
                    "connection_info": {"app_id": self.api_app_id},
                }
            )
        )
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                received = json.loads(msg.data)
                self.socket_received.append(received)
                if isinstance(received.get("envelope_id"), str):
                    self.socket_acks.append(received["envelope_id"])
        finally:
            self._sockets.discard(ws)
        return ws

    async def _handle_response_url(self, request: web.Request) -> web.Response:
        self.response_url_posts.append((str(request.url), await request.json()))
        return web.Response(text="ok", content_type="text/plain")

    # -- Web API methods ------------------------------------------------------------

    def _auth_test(self, params: JsonDict) -> JsonDict:
        return {
            "url": "https://emulated.slack.com/",
            "team": "Emulated Team",
            "user": "bot",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _apps_connections_open(self, params: JsonDict) -> JsonDict:
        return {"url": self.socket_url}

    def _bot_message(self, text: str, ts: str, blocks: Any, thread_ts: str | None) -> JsonDict:
        msg: JsonDict = {
            "type": "message",
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": self.api_app_id,
            "team": self.team_id,
            "text": text,
            "ts": ts,
        }
        if blocks:
            msg["blocks"] = blocks
        if thread_ts:
            msg["thread_ts"] = thread_ts
        return msg

    def _chat_post_message(self, params: JsonDict) -> JsonDict:
        channel = params.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        text, blocks = str(params.get("text") or ""), _json_field(params.get("blocks"))
        if not text and not blocks and not params.get("attachments"):
            return {"ok": False, "error": "no_text"}
        ts = next_ts()
        thread_ts = params.get("thread_ts") or None
        self._messages.append(_Message(channel, ts, text, thread_ts, blocks))
        posted = {**params, "channel": channel, "text": text, "thread_ts": thread_ts}
        self.posted.append({**posted, "blocks": blocks, "ts": ts})
        return {
            "channel": channel,
            "ts": ts,
            "message": self._bot_message(text, ts, blocks, thread_ts),
        }

    def _chat_post_ephemeral(self, params: JsonDict) -> JsonDict:
        return {"message_ts": next_ts()}

    def _find(self, params: JsonDict) -> _Message | None:
        for m in self._messages:
            if m.channel == params.get("channel") and m.ts == params.get("ts") and not m.deleted:
                return m
        return None

    def _chat_update(self, params: JsonDict) -> JsonDict:
        found = self._find(params)
        if found is None:
            return {"ok": False, "error": "message_not_found"}
        if "text" in params:
            found.text = str(params["text"])
        if "blocks" in params:
            found.blocks = _json_field(params["blocks"])
        self.updates.append(dict(params))
        return {
            "channel": found.channel,
            "ts": found.ts,
            "text": found.text,
            "message": self._bot_message(found.text, found.ts, found.blocks, found.thread_ts),
        }

    def _chat_start_stream(self, params: JsonDict) -> JsonDict:
        channel, thread_ts = params.get("channel"), params.get("thread_ts")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not thread_ts:
            return {"ok": False, "error": "invalid_arguments"}
        if str(channel).startswith("C") and not (
            params.get("recipient_team_id") and params.get("recipient_user_id")
        ):  # "Required when streaming to channels"
            return {"ok": False, "error": "invalid_arguments"}
        ts = next_ts()
        text = str(params.get("markdown_text") or "")
        self._messages.append(_Message(channel, ts, text, thread_ts, None, streaming=True))
        self.posted.append({**params, "text": text, "thread_ts": thread_ts, "ts": ts})
        return {"channel": channel, "ts": ts}

    def _streaming(self, params: JsonDict) -> _Message | JsonDict:
        """The streaming message `params` name, with their text appended; else the error."""
        found = self._find(params)
        if found is None:
            return {"ok": False, "error": "message_not_found"}
        if not found.streaming:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        found.text += str(params.get("markdown_text") or "")
        return found

    def _chat_append_stream(self, params: JsonDict) -> JsonDict:
        found = self._streaming(params)
        if isinstance(found, dict):
            return found
        return {"channel": found.channel, "ts": found.ts}

    def _chat_stop_stream(self, params: JsonDict) -> JsonDict:
        found = self._streaming(params)
        if isinstance(found, dict):
            return found
        if params.get("blocks"):
            found.blocks = _json_field(params["blocks"])
        found.streaming = False
        return {"channel": found.channel, "ts": found.ts, "message": {"text": found.text}}

    def _chat_get_permalink(self, params: JsonDict) -> JsonDict:
        channel, ts = str(params.get("channel", "")), str(params.get("message_ts", ""))
        if not channel or not ts:
            return {"ok": False, "error": "invalid_arguments"}
        return {
            "channel": channel,
            "permalink": f"{PERMALINK_BASE}/{channel}/p{ts.replace('.', '')}",
        }

    def _chat_delete(self, params: JsonDict) -> JsonDict:
        found = self._find(params)
        if found is None:
            return {"ok": False, "error": "message_not_found"}
        found.deleted = True
        return {"channel": found.channel, "ts": found.ts}

    def _user(
        self, user_id: str, real_name: str | None, display_name: str | None, is_bot: bool
    ) -> JsonDict:
        real = real_name or f"User {user_id}"
        display = display_name if display_name is not None else f"user-{user_id.lower()}"
        return {
            "id": user_id,
            "team_id": self.team_id,
            "name": f"user-{user_id.lower()}",
            "deleted": False,
            "real_name": real,
            "tz": "Europe/London",
            "is_bot": is_bot,
            "is_admin": False,
            "profile": {
                "real_name": real,
                "real_name_normalized": real,
                "display_name": display,
                "display_name_normalized": display,
                "team": self.team_id,
            },
        }

    def _users_info(self, params: JsonDict) -> JsonDict:
        user_id = str(params.get("user") or "")
        if not user_id:
            return {"ok": False, "error": "user_not_found"}
        if user_id in self.users:
            return {"user": self.users[user_id]}
        is_bot = user_id == self.bot_user_id
        return {"user": self._user(user_id, None, None, is_bot)}

    def _usergroups_users_list(self, params: JsonDict) -> JsonDict:
        group = str(params.get("usergroup") or "")
        if group not in self.usergroups:
            return {"ok": False, "error": "no_such_subteam"}
        return {"users": list(self.usergroups[group])}

    def _conversations_members(self, params: JsonDict) -> JsonDict:
        channel = str(params.get("channel") or "")
        return {
            "members": list(self.channel_members.get(channel, [])),
            "response_metadata": {"next_cursor": ""},
        }

    def _conversations_info(self, params: JsonDict) -> JsonDict:
        channel = str(params.get("channel") or "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        is_im = channel.startswith("D")
        return {
            "channel": {
                "id": channel,
                "name": None if is_im else f"channel-{channel.lower()}",
                "is_channel": channel.startswith("C"),
                "is_group": channel.startswith("G"),
                "is_im": is_im,
                "is_private": not channel.startswith("C"),
                "is_member": True,
            }
        }


def _ok(params: JsonDict) -> JsonDict:
    return {}


def _json_field(value: Any) -> Any:
    """blocks/attachments arrive as JSON strings in form-encoded calls, as lists in JSON."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


async def _read_params(request: web.Request) -> JsonDict:
    params: JsonDict = dict(request.query)
    if not request.can_read_body:
        return params
    if request.content_type == "application/json":
        body = await request.json()
        if isinstance(body, dict):
            params.update(body)
    elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        params.update({k: v if isinstance(v, str) else "(file)" for k, v in form.items()})
    return params


async def deliver_like_slack(
    url: str,
    signing_secret: str,
    payload: JsonDict,
    *,
    retry_delays_s: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0),
) -> list[int]:
    """Deliver an Events API payload as Slack does: a non-2xx answer (or no answer) is
    retried, with X-Slack-Retry-Num and X-Slack-Retry-Reason, after each delay in turn
    (Slack waits 0 s, 1 min and 5 min; tests compress that). Returns each status seen
    (0: no answer)."""
    statuses: list[int] = []
    for attempt in range(len(retry_delays_s) + 1):
        if attempt:
            await asyncio.sleep(retry_delays_s[attempt - 1])
        reason = "http_error" if statuses and statuses[-1] else "http_timeout"
        try:
            status, _ = await post_event(
                url,
                signing_secret,
                payload,
                retry_num=attempt or None,
                retry_reason=reason,
            )
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        statuses.append(status)
        if 200 <= status < 300:
            break
    return statuses
