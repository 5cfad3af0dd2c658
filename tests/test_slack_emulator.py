"""The Slack emulator against the real slack_sdk and slack_bolt clients."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncSay
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from tests.slack_emulator import (
    SlackEmulator,
    app_mention,
    event_callback,
    message,
    post_event,
    post_slash_command,
    sign_request,
    slash_command,
)

SECRET = "test-signing-secret"


@pytest.fixture
async def slack() -> AsyncIterator[SlackEmulator]:
    emulator = SlackEmulator()
    await emulator.start()
    yield emulator
    await emulator.stop()


def web_client(slack: SlackEmulator, **kwargs: Any) -> AsyncWebClient:
    return AsyncWebClient(token=slack.bot_token, base_url=slack.api_url, **kwargs)


def mention_app(slack: SlackEmulator) -> AsyncApp:
    app = AsyncApp(client=web_client(slack), signing_secret=SECRET)

    @app.event("app_mention")
    async def on_mention(event: dict[str, Any], say: AsyncSay) -> None:
        await say(text=f"echo: {event['text']}", thread_ts=event["ts"])

    @app.command("/ask")
    async def on_ask(command: dict[str, Any], ack: AsyncAck) -> None:
        await ack(f"asked: {command['text']}")

    return app


async def test_web_client_calls(slack: SlackEmulator) -> None:
    client = web_client(slack)

    auth = await client.auth_test()
    assert (auth["user_id"], auth["bot_id"], auth["team_id"]) == ("UBOT", "BBOT", "T0001")
    assert "chat:write" in auth.headers["X-OAuth-Scopes"]

    first = await client.chat_postMessage(channel="C1", text="hello", thread_ts="1.000001")
    second = await client.chat_postMessage(channel="C1", text="again")
    assert float(first["ts"]) < float(second["ts"])
    assert first["message"]["bot_id"] == "BBOT"
    assert [(p["text"], p["thread_ts"]) for p in slack.posted] == [
        ("hello", "1.000001"),
        ("again", None),
    ]

    await client.chat_update(channel="C1", ts=first["ts"], text="hello, edited")
    await client.chat_delete(channel="C1", ts=second["ts"])  # query parameters, not a body
    assert slack.messages_in("C1") == ["hello, edited"]
    assert slack.messages_in("C1", thread_ts="1.000001") == ["hello, edited"]
    assert slack.updates[0]["text"] == "hello, edited"

    user = await client.users_info(user="U42")  # a GET
    assert user["user"]["real_name"] == "User U42"
    assert user["user"]["profile"]["display_name"]
    channel = await client.conversations_info(channel="D9")
    assert channel["channel"]["is_im"] is True
    await client.assistant_threads_setStatus(channel_id="D9", thread_ts="1.1", status="typing")
    assert slack.calls_to("assistant.threads.setStatus")[0].params["status"] == "typing"

    with pytest.raises(SlackApiError) as unknown:
        await client.api_call("no.such.method")
    assert unknown.value.response["error"] == "unknown_method"
    with pytest.raises(SlackApiError) as bad_token:
        await AsyncWebClient(token="xoxb-wrong", base_url=slack.api_url).auth_test()
    assert bad_token.value.response["error"] == "invalid_auth"
    assert slack.calls[0].headers["Authorization"] == "Bearer xoxb-test"


async def test_rate_limit_is_retried_after_retry_after(slack: SlackEmulator) -> None:
    slack.fail_next("chat.postMessage", retry_after_s=0)
    client = web_client(slack, retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)])

    await client.chat_postMessage(channel="C1", text="once")

    assert [c.status for c in slack.calls_to("chat.postMessage")] == [429, 200]
    assert slack.messages_in("C1") == ["once"]


async def test_faults_without_retry_surface_as_errors(slack: SlackEmulator) -> None:
    client = web_client(slack)  # no rate-limit handler by default
    slack.fail_next("chat.postMessage", retry_after_s=7)
    with pytest.raises(SlackApiError) as limited:
        await client.chat_postMessage(channel="C1", text="x")
    assert limited.value.response.status_code == 429
    assert limited.value.response["error"] == "ratelimited"
    assert limited.value.response.headers["Retry-After"] == "7"

    slack.fail_next("chat.update", status=200, error="msg_too_long", times=2)
    for _ in range(2):
        with pytest.raises(SlackApiError, match="msg_too_long"):
            await client.chat_update(channel="C1", ts="1.1", text="x")
    with pytest.raises(SlackApiError, match="message_not_found"):  # the faults are used up
        await client.chat_update(channel="C1", ts="1.1", text="x")
    assert slack.posted == []


def test_signature_and_builders() -> None:
    headers = sign_request("8f742231b10e8888abcd99yyyzzz85a5", b"a=b", 1531420618)
    assert headers["X-Slack-Request-Timestamp"] == "1531420618"
    assert (
        headers["X-Slack-Signature"].startswith("v0=") and len(headers["X-Slack-Signature"]) == 67
    )

    first, second = message("hi", channel="D1", channel_type="im"), message("bot", bot_id="B9")
    assert float(first["ts"]) < float(second["ts"])
    assert "client_msg_id" in first and "client_msg_id" not in second
    one, two = event_callback(first), event_callback(first)
    assert one["event_id"] != two["event_id"]
    assert one["authorizations"][0]["user_id"] == "UBOT"


async def test_bolt_http_app(slack: SlackEmulator) -> None:
    server = TestServer(mention_app(slack).web_app(), host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/slack/events"))
        mention = app_mention("<@UBOT> hi", channel="C7")

        status, _ = await post_event(url, SECRET, event_callback(mention))
        assert status == 200
        await slack.wait_for(lambda: len(slack.posted) == 1, 5, "the reply")
        assert slack.posted[0]["thread_ts"] == mention["ts"]
        assert slack.messages_in("C7", mention["ts"]) == ["echo: <@UBOT> hi"]
        assert len(slack.calls_to("auth.test")) == 1

        forged = await post_event(url, SECRET, event_callback(mention), signature="v0=" + "0" * 64)
        stale = await post_event(
            url, SECRET, event_callback(mention), timestamp=int(time.time()) - 600
        )
        assert (forged[0], stale[0]) == (401, 401)

        status, body = await post_slash_command(url, SECRET, slash_command("/ask", "why?"))
        assert (status, body) == (200, "asked: why?")
        assert len(slack.posted) == 1
    finally:
        await server.close()


async def test_bolt_socket_mode(slack: SlackEmulator) -> None:
    app = mention_app(slack)
    # The handler's SocketModeClient calls apps.connections.open through `web_client`,
    # which defaults to app.client: its base_url already points at the emulator.
    handler = AsyncSocketModeHandler(app, slack.app_token)
    await handler.connect_async()
    try:
        await slack.wait_socket_connected(5)
        assert slack.calls_to("apps.connections.open")[0].token == "xapp-test"

        mention = app_mention("<@UBOT> over the socket")
        envelope_id = await slack.socket_send_event(mention)
        await slack.wait_socket_ack(envelope_id, 5)
        await slack.wait_for(lambda: len(slack.posted) == 1, 5, "the reply")
        assert slack.posted[0]["thread_ts"] == mention["ts"]
        assert slack.socket_response(envelope_id) is None

        command_id = await slack.socket_send_slash_command(slash_command("/ask", "socket?"))
        await slack.wait_socket_ack(command_id, 5)
        assert slack.socket_response(command_id) == {"text": "asked: socket?"}

        await slack.socket_send_disconnect()
        await slack.wait_for(lambda: slack.socket_connection_count == 2, 5, "a reconnection")
        await slack.wait_socket_connected(5)
        assert len(slack.calls_to("apps.connections.open")) == 2
    finally:
        await handler.close_async()
