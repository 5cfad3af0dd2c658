"""Streamed replies through the real slack-bolt and discord.py code paths, against the
emulators, with a real Redis and a real worker: the text grows, one final message carries
the reply and its buttons, edits keep Slack's and Discord's pace."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.generation.transformers_engine import TransformersEngine
from tests.discord_emulator import BOB_ID, DEFAULT_BOT_ID, DEFAULT_CHANNEL_ID
from tests.helpers import ScriptedEngine
from tests.slack_emulator import app_mention
from tests.test_discord import close as close_discord
from tests.test_discord import make_harness as discord_harness
from tests.test_discord import restore_discord_globals  # noqa: F401 (an autouse fixture)
from tests.test_slack import Harness as SlackHarness
from tests.test_slack import close as close_slack
from tests.test_slack import make_harness as slack_harness

ANSWER = (
    "Thanks for waiting. Your parcel left our warehouse this morning and the courier "
    "will bring it to your door within two working days. Reply here if it does not arrive."
)


def slow_engine(tiny_engine: TransformersEngine, delay_s: float = 0.15) -> ScriptedEngine:
    engine = ScriptedEngine(tiny_engine, lambda _r: ANSWER)
    engine.word_delay_s = delay_s  # about 4 s for the whole answer
    return engine


def gaps_s(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


@pytest.fixture
async def slack(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> AsyncIterator[SlackHarness]:
    harness = await slack_harness(
        redis, make_settings, slow_engine(tiny_engine), CHATBOT_STREAMING="on"
    )
    yield harness
    await close_slack(harness)


async def ask(slack: SlackHarness) -> dict[str, Any]:
    mention = app_mention("<@UBOT> where is my parcel?", channel="C1")
    await slack.send(mention)
    return mention


async def test_slack_streams_a_reply_and_stops_it_with_the_buttons(slack: SlackHarness) -> None:
    mention = await ask(slack)
    emulator = slack.emulator
    await emulator.wait_for(lambda: bool(emulator.calls_to("chat.stopStream")), 30)
    [start] = emulator.calls_to("chat.startStream")
    assert start.params["thread_ts"] == mention["ts"]
    assert start.params["recipient_user_id"] == "U1" and start.params["recipient_team_id"]
    appends = emulator.calls_to("chat.appendStream")
    assert len(appends) >= 2  # it grew while it was generated
    assert min(gaps_s([c.at_s for c in appends])) >= 0.9  # about once a second
    [stop] = emulator.calls_to("chat.stopStream")
    assert any(b["type"] == "actions" for b in stop.params["blocks"])  # the buttons
    assert slack.thread("C1", mention["ts"]) == [ANSWER]  # one message, the whole reply
    assert emulator.calls_to("assistant.threads.setStatus")  # "is thinking…" first
    assert not [c for c in emulator.calls_to("chat.postMessage") if c.params.get("thread_ts")]


async def test_slack_without_streaming_methods_edits_the_message_once_a_second(
    slack: SlackHarness,
) -> None:
    slack.emulator.without_streaming()
    mention = await ask(slack)
    emulator = slack.emulator
    await emulator.wait_for(lambda: slack.thread("C1", mention["ts"]) == [ANSWER], 30)
    updates = emulator.calls_to("chat.update")
    assert len(updates) >= 3  # partial edits, then the final one
    assert min(gaps_s([c.at_s for c in updates[:-1]])) >= 0.9
    assert updates[-1].params["blocks"]  # the buttons come with the final edit
    assert len(slack.thread("C1", mention["ts"])) == 1


async def test_slack_falls_back_to_editing_when_a_stream_expires(slack: SlackHarness) -> None:
    mention = await ask(slack)
    emulator = slack.emulator
    await emulator.wait_for(lambda: bool(emulator.calls_to("chat.appendStream")), 30)
    assert emulator.expire_streams() == 1  # what Slack does after about 5 minutes
    await emulator.wait_for(lambda: slack.thread("C1", mention["ts"]) == [ANSWER], 30)
    assert any(
        c.response.get("error") == "message_not_in_streaming_state"
        for c in emulator.calls_to("chat.appendStream") + emulator.calls_to("chat.stopStream")
    )
    final = emulator.calls_to("chat.update")[-1]
    assert (
        final.params["blocks"]
        and final.params["ts"] == emulator.calls_to("chat.startStream")[0].response["ts"]
    )


async def test_discord_replies_grow_with_edits_paced_per_channel(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    bot = await discord_harness(
        redis, make_settings, slow_engine(tiny_engine), CHATBOT_STREAMING="on"
    )
    try:
        emulator = bot.emulator
        first = await emulator.send_message(DEFAULT_CHANNEL_ID, f"<@{DEFAULT_BOT_ID}> parcel?")
        second = await emulator.send_message(
            DEFAULT_CHANNEL_ID, f"<@{DEFAULT_BOT_ID}> my parcel too?", author_id=BOB_ID
        )
        await emulator.wait_for(
            lambda: emulator.messages_in(DEFAULT_CHANNEL_ID) == [ANSWER, ANSWER], 60
        )
        sent = bot.sent_in(DEFAULT_CHANNEL_ID)
        assert len(sent) == 2  # one message per reply, each grown by edits
        assert {str(s["message_reference"]["message_id"]) for s in sent} == {
            first["id"],
            second["id"],
        }
        assert all(s["content"] != ANSWER for s in sent)  # first shown part-way
        edits = [
            c
            for c in emulator.requests
            if c.method == "PATCH" and f"/channels/{DEFAULT_CHANNEL_ID}/messages/" in c.path
        ]
        assert len(edits) >= 4
        # Both replies share the channel's pace: about one edit a second, all told (the
        # final edits excepted, which do not wait).
        partial = [c for c in edits if c.body.get("content") != ANSWER]
        assert min(gaps_s([c.at_s for c in partial])) >= 0.9
        assert DEFAULT_CHANNEL_ID in emulator.typing  # "typing…" until the first words
        # The rating reactions go on each final reply.
        await emulator.wait_for(
            lambda: {s["id"] for s in sent} <= {m for (_c, m, _e) in emulator.reactions}, 10
        )
    finally:
        await close_discord(bot)
