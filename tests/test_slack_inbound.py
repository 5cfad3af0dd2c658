"""Slack inbound that loses nothing: malformed requests get a fast 4xx (never a 5xx that
Slack would retry), and a message is acknowledged only once it is in Redis, so one sent
while Redis is down is delivered again by Slack and answered exactly once. Real bolt, real
redis-server (killed and restarted), the Slack emulator."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from slack_bolt.request.async_request import AsyncBoltRequest

from bot.slack.adapter import _well_formed
from bot.slack.requests import problem_with
from core.redis_conn import connect
from core.redis_server import RedisServer
from tests import test_slack
from tests.slack_emulator import (
    _post,
    app_mention,
    block_action,
    deliver_like_slack,
    event_callback,
    post_event,
    sign_request,
)
from tests.test_slack import SECRET, Harness, close, make_harness

slack = test_slack.slack  # the adapter + worker + emulator fixture


async def post_raw(url: str, body: bytes, content_type: str = "application/json", **h: str) -> int:
    headers = sign_request(SECRET, body, content_type=content_type)
    headers.update(h)
    status, _ = await _post(url, body, headers)
    return status


def interaction_body(payload: Any) -> bytes:
    return urlencode({"payload": json.dumps(payload)}).encode()


async def test_malformed_requests_get_a_4xx_and_the_adapter_goes_on(slack: Harness) -> None:
    mention = app_mention("<@UBOT> hello", channel="C1")
    good = event_callback(mention)
    no_user = block_action("feedback_up", "x")
    no_user["user"] = "U1"  # a string, not an object
    no_channel = block_action("handoff_request", "slack:T0001:C1:1.2")
    del no_channel["channel"]
    cases = {
        "not UTF-8": b'{"type": "event_callback", "x": "\xff\xfe"}',
        "top-level array": b"[1, 2, 3]",
        "deep nesting": b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "broken JSON": b'{"type": "event_callback",',
        "authorizations not a list": json.dumps({**good, "authorizations": "x"}).encode(),
        "event not an object": json.dumps({**good, "event": [1]}).encode(),
        "user not an object": interaction_body(no_user),
        "payload not JSON": urlencode({"payload": "{nope"}).encode(),
        "payload an array": interaction_body([1]),
    }
    for name, body in cases.items():
        content_type = (
            "application/x-www-form-urlencoded" if b"payload=" in body else "application/json"
        )
        status = await post_raw(slack.url, body, content_type)
        assert 400 <= status < 500, name
    body = json.dumps(good).encode()
    assert await post_raw(slack.url, body, **{"X-Slack-Request-Timestamp": "soon"}) == 401
    # A button without a channel is acknowledged (and logged), not left to time out.
    assert await post_raw(
        slack.url, interaction_body(no_channel), "application/x-www-form-urlencoded"
    ) in (200, 400)
    for broken_event in ({**mention, "user": 7}, {**mention, "ts": None}, {"type": "message"}):
        status, _ = await post_event(slack.url, SECRET, event_callback(broken_event))
        assert status in (200, 400)  # refused or logged: redelivering would not help
    status, _ = await post_event(slack.url, SECRET, good)
    assert status == 200
    texts = await slack.wait_thread("C1", mention["ts"], lambda t: any("Answer" in x for x in t))
    assert texts == ["Answer to: hello"]


def _mutations(rng: random.Random, base: dict[str, Any]) -> Any:
    """A signed envelope with one field swapped for a value of another type, dropped, or
    nested; or the event's own fields so treated."""
    junk = [None, 0, -1, 3.5, True, "", "x" * 300, [], [None], {}, {"id": 5}, "\u202e\u200b"]
    payload = json.loads(json.dumps(base))
    target = payload if rng.random() < 0.5 else payload["event"]
    key = rng.choice([*target.keys(), "extra"])
    action = rng.random()
    if action < 0.2:
        target.pop(key, None)
    elif action < 0.9:
        target[key] = rng.choice(junk)
    else:
        target[key] = {"nested": [target.get(key)] * 3}
    return payload


async def test_fuzzed_events_never_get_a_5xx(slack: Harness) -> None:
    rng = random.Random(20261201)
    base = event_callback(app_mention("<@UBOT> fuzz", channel="C9"))
    statuses = []
    for _ in range(300):
        status, _ = await post_event(slack.url, SECRET, _mutations(rng, base))
        statuses.append(status)
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    # Still answering afterwards (another user: the fuzzer's own is past its rate limit).
    mention = app_mention("<@UBOT> still there?", user="U2", channel="C1")
    assert (await post_event(slack.url, SECRET, event_callback(mention)))[0] == 200
    await slack.wait_thread("C1", mention["ts"], lambda t: any("Answer" in x for x in t))


@pytest.mark.slow
async def test_mentions_across_redis_restarts_are_answered_exactly_once(
    own_redis: RedisServer, make_settings: Any, tiny_engine: Any, tmp_path: Path
) -> None:
    from tests.helpers import ScriptedEngine, echo_answer

    redis = connect(own_redis.url)
    harness = await make_harness(
        redis,
        lambda **o: make_settings(REDIS_URL=own_redis.url, **o),
        ScriptedEngine(tiny_engine, echo_answer),
    )
    mentions = [app_mention(f"<@UBOT> question {i}", channel="C1") for i in range(12)]
    deliveries = []
    try:
        for i, mention in enumerate(mentions):
            down = i in (3, 8)
            if down:  # Redis dies (SIGKILL) just before this mention arrives...
                own_redis.kill()
            payload = event_callback(mention)
            deliveries.append(asyncio.create_task(deliver_like_slack(harness.url, SECRET, payload)))
            if down:  # ...and comes back from its AOF a second later
                await asyncio.sleep(1.0)
                own_redis.start()
            await asyncio.sleep(0.3)
        statuses = await asyncio.gather(*deliveries)
        for mention in mentions:
            await harness.wait_thread(
                "C1", mention["ts"], lambda t: any(x.startswith("Answer") for x in t)
            )
        # A sentinel asked last and answered last: any duplicate would be posted by now.
        sentinel = app_mention("<@UBOT> sentinel", channel="C1")
        await deliver_like_slack(harness.url, SECRET, event_callback(sentinel))
        await harness.wait_thread("C1", sentinel["ts"], lambda t: any("sentinel" in x for x in t))
        for i, mention in enumerate(mentions):
            assert harness.thread("C1", mention["ts"]) == [f"Answer to: question {i}"]
    finally:
        await close(harness)
        await redis.aclose()
    assert all(s[-1] == 200 for s in statuses)
    assert any(len(s) > 1 for s in statuses), "no delivery met Redis down: test proves nothing"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_ENVELOPE_KEYS = st.sampled_from(
    ["type", "team_id", "event", "authorizations", "event_id", "api_app_id", "enterprise_id"]
)
_EVENT_KEYS = st.sampled_from(["type", "user", "text", "ts", "channel", "thread_ts", "team"])


@hyp_settings(max_examples=400, deadline=None)
@given(
    envelope=st.dictionaries(_ENVELOPE_KEYS, _JSON, max_size=7),
    event=st.dictionaries(_EVENT_KEYS, _JSON, max_size=7),
)
def test_what_passes_the_check_is_what_bolt_and_the_listeners_can_read(
    envelope: dict[str, Any], event: dict[str, Any]
) -> None:
    """Any envelope: the check never raises; one it lets through has the types bolt reads,
    and a message event the listener accepts has every field it uses."""
    envelope = {**envelope, "event": event} if "event" not in envelope else envelope
    body = json.dumps(envelope).encode()
    headers = {"X-Slack-Request-Timestamp": "1700000000", "Content-Type": "application/json"}
    found = problem_with(headers, body)
    if found is not None:
        assert 400 <= found[0] < 500
        return
    # bolt builds its request context from what passes, before any listener runs.
    AsyncBoltRequest(body=body.decode(), headers={k: [v] for k, v in headers.items()})
    if isinstance(envelope.get("event"), dict):
        inner = envelope["event"]
        if _well_formed(inner):
            assert all(isinstance(inner[k], str) and inner[k] for k in ("user", "ts", "channel"))
