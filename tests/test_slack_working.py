"""The "working on it" message when the answer is quicker than it: never left behind next
to the answer, never posted after it. The real slack_sdk client against the Slack
emulator, and a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.outbox import PostedParts
from bot.slack import posting, working
from bot.slack.posting import WORKING_TEXT, SlackPoster
from bot.slack.working import WorkingMessages
from core.conversation import ConversationKey, Reply
from core.keys import Keys
from core.settings import Settings
from tests.slack_emulator import SlackEmulator

CONVERSATION = ConversationKey("slack", "T0001", "C1", "1700000000.000100")
QUESTION = "1700000000.000100"
LATER_QUESTION = "1700000000.000200"


@pytest.fixture
async def emulator() -> AsyncIterator[SlackEmulator]:
    async with SlackEmulator() as emulator:
        yield emulator


@pytest.fixture
def poster(redis: Any, keys: Keys, emulator: SlackEmulator, make_settings: Any) -> SlackPoster:
    settings: Settings = make_settings(
        SLACK_BOT_TOKEN="xoxb-test", SLACK_SIGNING_SECRET="s", SLACK_API_URL=emulator.api_url
    )
    return SlackPoster(posting.web_client(settings), redis, keys)


def answer(reply_to: str, text: str) -> Reply:
    return Reply(f"{CONVERSATION.id}:1", CONVERSATION, text, reply_to, 1)


async def post(poster: SlackPoster, reply: Reply, keys: Keys) -> None:
    parts = PostedParts(poster.redis, keys.posted(CONVERSATION, reply.reply_id), {})
    await poster.post_reply(reply, parts)


def thread(emulator: SlackEmulator) -> list[str]:
    return emulator.messages_in(CONVERSATION.channel, CONVERSATION.thread)


async def test_an_answer_before_the_working_message_means_no_working_message(
    poster: SlackPoster, emulator: SlackEmulator, keys: Keys
) -> None:
    await post(poster, answer(QUESTION, "The answer."), keys)
    await poster.show_working(CONVERSATION, QUESTION)  # late: the answer is out
    assert thread(emulator) == ["The answer."]
    assert [p["text"] for p in emulator.posted] == ["The answer."]
    # The conversation's next message gets its working message, which its answer replaces.
    await poster.show_working(CONVERSATION, LATER_QUESTION)
    assert thread(emulator) == ["The answer.", WORKING_TEXT]
    await post(poster, answer(LATER_QUESTION, "The second answer."), keys)
    assert thread(emulator) == ["The answer.", "The second answer."]


async def test_an_answer_waits_for_the_working_message_being_posted_and_replaces_it(
    poster: SlackPoster, emulator: SlackEmulator, keys: Keys
) -> None:
    messages = WorkingMessages(poster.redis, keys)
    assert await messages.claim(CONVERSATION, QUESTION)  # the adapter is posting it
    taking = asyncio.create_task(messages.take(CONVERSATION, QUESTION))
    await asyncio.sleep(0.2)
    assert not taking.done()  # the answer waits for it
    assert await messages.posted(CONVERSATION, QUESTION, "1700000000.000150")
    assert await taking == "1700000000.000150"
    # Replaced once: a second reply does not take it again.
    assert await messages.take(CONVERSATION, QUESTION) == ""
    # Through the poster: one message, the working one, ends up as the answer.
    emulator.posted.clear()
    await poster.show_working(CONVERSATION, LATER_QUESTION)
    await post(poster, answer(LATER_QUESTION, "Answer."), keys)
    assert [p["text"] for p in emulator.posted] == [WORKING_TEXT]
    assert thread(emulator)[-1] == "Answer."


async def test_a_working_message_posted_too_late_is_deleted_by_its_poster(
    redis: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(working, "WAIT_FOR_POSTING_S", 0.1)
    messages = WorkingMessages(redis, keys)
    assert await messages.claim(CONVERSATION, QUESTION)
    assert await messages.take(CONVERSATION, QUESTION) == ""  # gave up waiting: posts its own
    assert not await messages.posted(CONVERSATION, QUESTION, "1700000000.000150")
    assert not await messages.claim(CONVERSATION, QUESTION)  # and it is not posted again


async def test_an_older_reply_leaves_a_newer_messages_working_message_alone(
    redis: Any, keys: Keys
) -> None:
    messages = WorkingMessages(redis, keys)
    assert await messages.claim(CONVERSATION, LATER_QUESTION)
    assert await asyncio.wait_for(messages.take(CONVERSATION, QUESTION), 1) == ""
    assert await messages.posted(CONVERSATION, LATER_QUESTION, "1700000000.000250")
    assert await messages.take(CONVERSATION, LATER_QUESTION) == "1700000000.000250"
    # A reply that covers the newer message came: one for an older message cannot claim.
    assert not await messages.claim(CONVERSATION, QUESTION)
