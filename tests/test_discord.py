"""The Discord adapter on the real discord.py Client, against the local Discord emulator,
with a real Redis and a real worker."""

from __future__ import annotations

import asyncio
import datetime
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import discord
import pytest
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.discord import INTENT_HELP, RESET_DONE, DiscordAdapter, jump_link
from bot.discord.catch_up import ChannelMarks
from bot.discord.posting import _buttons
from core.conversation import ConversationKey, Reply, Role
from core.errors import POLITE_FAILURE, SettingsError
from core.generation.engine import Engine
from core.generation.transformers_engine import TransformersEngine
from core.jobs import Outbox
from core.keys import Keys
from core.settings import Settings
from core.support.agents import ONLY_AGENTS
from core.support.feedback import Feedback
from core.support.handoff import (
    HANDOFF_NO_CONTACT,
    HANDOFF_RELEASED,
    HANDOFF_STARTED,
    Handoffs,
    release_and_announce,
)
from core.support.workspaces import Workspaces
from core.worker import Worker
from tests.discord_emulator import (
    ANN_ID,
    BOB_ID,
    DEFAULT_BOT_ID,
    DEFAULT_CHANNEL_ID,
    DEFAULT_GUILD_ID,
    DEFAULT_SECOND_CHANNEL_ID,
    OTHER_BOT_ID,
    DiscordEmulator,
    GuildSpec,
)
from tests.helpers import RecordingEngine, ScriptedEngine, echo_answer, make_store, wait_for

BOT = f"<@{DEFAULT_BOT_ID}>"
CHANNEL = DEFAULT_CHANNEL_ID
GUILD = DEFAULT_GUILD_ID
SUPPORT_CHANNEL = "3500"
SUPPORT_ROLE = "5000"


@dataclass
class Harness:
    emulator: DiscordEmulator
    settings: Settings
    redis: Any
    engine: Any
    worker: Worker | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def sent_in(self, channel: str) -> list[dict[str, Any]]:
        return [s for s in self.emulator.sent if s["channel_id"] == channel]

    async def wait_sent(
        self, channel: str, count: int, timeout_s: float = 30
    ) -> list[dict[str, Any]]:
        await self.emulator.wait_for(lambda: len(self.sent_in(channel)) >= count, timeout_s)
        return self.sent_in(channel)


@pytest.fixture(autouse=True)
def restore_discord_globals() -> Any:
    old = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    yield
    Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old


async def make_harness(
    redis: Any,
    make_settings: Any,
    engine: Engine,
    *,
    emulator: DiscordEmulator | None = None,
    **overrides: str,
) -> Harness:
    emulator = emulator or DiscordEmulator(heartbeat_interval_ms=1000)
    await emulator.start()
    settings = make_settings(
        DISCORD_TOKEN="test-token",
        DISCORD_API_URL=emulator.api_url,
        DISCORD_GATEWAY_URL=emulator.gateway_url,
        CHATBOT_RECLAIM_IDLE_S="1",
        **overrides,
    )
    harness = Harness(emulator, settings, redis, engine)
    harness.worker = Worker(redis, settings, engine)
    harness.tasks += [
        asyncio.create_task(DiscordAdapter(redis, settings).serve(harness.stop)),
        asyncio.create_task(harness.worker.run()),
    ]
    await emulator.wait_ready(20)
    return harness


async def close(harness: Harness) -> None:
    harness.stop.set()
    if harness.worker is not None:
        harness.worker.stop()
    results = await asyncio.gather(*harness.tasks, return_exceptions=True)
    await harness.emulator.stop()
    for result in results:
        if isinstance(result, BaseException):
            raise result


@pytest.fixture
async def discord_bot(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> AsyncIterator[Harness]:
    harness = await make_harness(redis, make_settings, ScriptedEngine(tiny_engine, echo_answer))
    yield harness
    await close(harness)


async def test_a_mention_gets_a_reply_to_the_message(discord_bot: Harness) -> None:
    question = await discord_bot.emulator.send_message(
        CHANNEL, f"{BOT} how do I reset my password?"
    )
    [sent] = await discord_bot.wait_sent(CHANNEL, 1)
    assert sent["content"] == "Answer to: how do I reset my password?"
    assert str(sent["message_reference"]["message_id"]) == question["id"]
    allowed = sent["allowed_mentions"]
    assert allowed["parse"] == [] and allowed.get("replied_user") is True  # no @everyone/roles
    assert CHANNEL in discord_bot.emulator.typing
    history = await make_store(discord_bot.redis, discord_bot.settings).history(
        ConversationKey("discord", GUILD, CHANNEL, question["id"])
    )
    assert next((m.role, m.author_id, m.message_id) for m in history) == (
        Role.USER,
        ANN_ID,
        question["id"],
    )


async def test_a_reply_to_the_bot_continues_the_conversation(discord_bot: Harness) -> None:
    first = await discord_bot.emulator.send_message(CHANNEL, f"{BOT} my order is late")
    [answer] = await discord_bot.wait_sent(CHANNEL, 1)
    await discord_bot.emulator.send_message(
        CHANNEL, "it was due monday", author_id=BOB_ID, reply_to=answer["id"]
    )
    sent = await discord_bot.wait_sent(CHANNEL, 2)
    assert (
        sent[1]["content"].startswith("Answer to: ") and "it was due monday" in sent[1]["content"]
    )
    conversation = ConversationKey("discord", GUILD, CHANNEL, first["id"])
    history = await make_store(discord_bot.redis, discord_bot.settings).history(conversation)
    assert [m.author_id for m in history if m.role is Role.USER] == [ANN_ID, BOB_ID]


async def test_plain_channel_chatter_bots_and_everyone_are_ignored(discord_bot: Harness) -> None:
    emulator = discord_bot.emulator
    await emulator.send_message(CHANNEL, "just chatting, no mention")
    await emulator.send_message(CHANNEL, "@everyone meeting at 5", mention_everyone=True)
    await emulator.send_message(CHANNEL, f"<@&{GUILD}> hello role", mention_roles=[GUILD])
    await emulator.send_message(CHANNEL, f"{BOT} beep boop", author_id=OTHER_BOT_ID)
    # A sentinel that must be answered, sent after them: by its answer they were handled.
    await emulator.send_message(CHANNEL, f"{BOT} sentinel")
    await discord_bot.wait_sent(CHANNEL, 1)
    assert [s["content"] for s in discord_bot.sent_in(CHANNEL)] == ["Answer to: sentinel"]


async def test_direct_messages_are_answered(discord_bot: Harness) -> None:
    dm = await discord_bot.emulator.send_dm(ANN_ID, "hello in private")
    channel = dm["channel_id"]
    [sent] = await discord_bot.wait_sent(channel, 1)
    assert sent["content"] == "Answer to: hello in private"
    await discord_bot.emulator.send_dm(ANN_ID, "and a follow-up")
    sent_all = await discord_bot.wait_sent(channel, 2)
    assert sent_all[1]["content"] == "Answer to: and a follow-up"
    history = await make_store(discord_bot.redis, discord_bot.settings).history(
        ConversationKey("discord", "dm", channel)
    )
    assert len(history) == 4


async def test_a_thread_is_its_own_conversation_once_the_bot_is_mentioned(
    discord_bot: Harness,
) -> None:
    emulator = discord_bot.emulator
    thread = await emulator.create_thread(CHANNEL, "help with billing")
    tid = thread["id"]
    await emulator.send_message(tid, "anyone?")  # not yet joined: ignored
    await emulator.send_message(tid, f"{BOT} can you help with my invoice?")
    [first] = await discord_bot.wait_sent(tid, 1)
    # The first reply answers the mention ("anyone?" may come with it as context): the
    # message before the bot joined got no reply of its own.
    assert first["content"].startswith("Answer to: ") and "invoice" in first["content"]
    await emulator.send_message(tid, "it's invoice 42", author_id=BOB_ID)  # no mention needed now
    sent = await discord_bot.wait_sent(tid, 2)
    assert "invoice 42" in sent[1]["content"]


async def test_a_long_reply_with_code_is_split_below_2000_characters(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    code = "\n".join(f"config_value_{i} = {i}  # explained" for i in range(100))
    text = (
        "Here is the file you need:\n\n```python\n"
        + code
        + "\n```\n\n"
        + "Then restart the app. " * 80
    )
    assert len(text) > 5000
    harness = await make_harness(redis, make_settings, ScriptedEngine(tiny_engine, lambda r: text))
    try:
        await harness.emulator.send_message(CHANNEL, f"{BOT} send me the config")
        await harness.emulator.wait_for(
            lambda: any(
                "Then restart the app." in s["content"] for s in harness.sent_in(CHANNEL)[-1:]
            ),
            30,
        )
        sent = harness.sent_in(CHANNEL)
    finally:
        await close(harness)
    assert len(sent) >= 3
    assert all(len(s["content"]) <= 2000 for s in sent)
    assert all(s["content"].count("```") % 2 == 0 for s in sent)
    assert sent[0]["message_reference"] is not None
    assert all(s["message_reference"] is None for s in sent[1:])
    joined = "\n".join(s["content"] for s in sent)
    assert all(f"config_value_{i} = {i}" in joined for i in range(100))


async def test_a_rate_limited_send_is_retried_and_posted_once(discord_bot: Harness) -> None:
    discord_bot.emulator.rate_limit_next("POST /channels", retry_after_s=0.3)
    await discord_bot.emulator.send_message(CHANNEL, f"{BOT} are you there?")
    await discord_bot.wait_sent(CHANNEL, 1)
    # A sentinel that must be answered: a second copy of the first reply would come before
    # its answer (one outbox, in order).
    await discord_bot.emulator.send_message(CHANNEL, f"{BOT} sentinel")
    await discord_bot.wait_sent(CHANNEL, 2)
    assert [s["content"] for s in discord_bot.sent_in(CHANNEL)] == [
        "Answer to: are you there?",
        "Answer to: sentinel",
    ]


async def test_a_dropped_connection_resumes_without_a_second_reply(discord_bot: Harness) -> None:
    emulator = discord_bot.emulator
    await emulator.send_message(CHANNEL, f"{BOT} first question")
    await discord_bot.wait_sent(CHANNEL, 1)
    with emulator.gateway_paused():
        await emulator.drop_connection(None)
        await emulator.send_message(CHANNEL, f"{BOT} asked while you were away")
    await emulator.wait_for(lambda: emulator.resume_count >= 1, 20)
    await discord_bot.wait_sent(CHANNEL, 2)
    await emulator.drop_connection(4000)  # and again: replays must not be answered twice
    await emulator.wait_for(lambda: emulator.resume_count >= 2, 20)
    # A sentinel sent after the resume: the replayed events came before it.
    await emulator.send_message(CHANNEL, f"{BOT} sentinel")
    await discord_bot.wait_sent(CHANNEL, 3)
    assert [s["content"] for s in discord_bot.sent_in(CHANNEL)] == [
        "Answer to: first question",
        "Answer to: asked while you were away",
        "Answer to: sentinel",
    ]
    assert emulator.identify_count == 1


async def test_a_failed_generation_gets_an_apology(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    engine = RecordingEngine(tiny_engine, fail_marker="explode")
    harness = await make_harness(redis, make_settings, engine, CHATBOT_MAX_DELIVERIES="1")
    try:
        await harness.emulator.send_message(CHANNEL, f"{BOT} please explode")
        [sent] = await harness.wait_sent(CHANNEL, 1)
    finally:
        await close(harness)
    assert sent["content"] == POLITE_FAILURE


async def test_slash_commands_are_registered_and_answered(discord_bot: Harness) -> None:
    emulator = discord_bot.emulator
    await emulator.wait_for(lambda: {c["name"] for c in emulator.commands} >= {"ask", "reset"}, 10)
    interaction = await emulator.send_interaction(
        "ask", {"question": "what are your opening hours?"}, guild_id=GUILD
    )
    await emulator.wait_for(lambda: bool(emulator.interaction_replies(interaction)), 10)
    [asked] = emulator.interaction_replies(interaction)
    assert "what are your opening hours?" in asked
    await emulator.wait_for(
        lambda: any(
            s["content"] == "Answer to: what are your opening hours?" for s in emulator.sent
        ),
        30,
    )

    dm = await emulator.send_dm(ANN_ID, "remember me")
    await discord_bot.wait_sent(dm["channel_id"], 1)
    store = make_store(discord_bot.redis, discord_bot.settings)
    conversation = ConversationKey("discord", "dm", dm["channel_id"])
    assert await store.history(conversation)
    reset = await emulator.send_interaction("reset", channel_id=dm["channel_id"])
    await emulator.wait_for(lambda: emulator.interaction_replies(reset) == [RESET_DONE], 10)
    assert await store.history(conversation) == []


async def test_a_refused_content_intent_says_which_switch_to_turn_on(
    redis: Any, make_settings: Any
) -> None:
    emulator = DiscordEmulator(refuse_intents=True, heartbeat_interval_ms=1000)
    await emulator.start()
    try:
        settings = make_settings(
            DISCORD_TOKEN="test-token",
            DISCORD_API_URL=emulator.api_url,
            DISCORD_GATEWAY_URL=emulator.gateway_url,
        )
        with pytest.raises(SettingsError) as caught:
            await asyncio.wait_for(DiscordAdapter(redis, settings).serve(asyncio.Event()), 30)
    finally:
        await emulator.stop()
    assert str(caught.value) == INTENT_HELP
    assert "MESSAGE CONTENT INTENT" in INTENT_HELP


async def test_a_wrong_token_is_a_clear_error(redis: Any, make_settings: Any) -> None:
    emulator = DiscordEmulator()
    await emulator.start()
    try:
        settings = make_settings(
            DISCORD_TOKEN="wrong-token",
            DISCORD_API_URL=emulator.api_url,
            DISCORD_GATEWAY_URL=emulator.gateway_url,
        )
        with pytest.raises(SettingsError, match="DISCORD_TOKEN was refused"):
            await asyncio.wait_for(DiscordAdapter(redis, settings).serve(asyncio.Event()), 30)
    finally:
        await emulator.stop()


async def test_dms_are_answered_where_the_workspace_limits_channels(discord_bot: Harness) -> None:
    redis, settings = discord_bot.redis, discord_bot.settings
    workspaces = Workspaces(redis, Keys(settings.namespace), settings)
    await workspaces.set("discord", GUILD, {"channels": CHANNEL})
    await workspaces.set("discord", "dm", {"channels": CHANNEL})
    await discord_bot.emulator.send_message(DEFAULT_SECOND_CHANNEL_ID, f"{BOT} not here")
    dm = await discord_bot.emulator.send_dm(ANN_ID, "hello in private")
    [sent] = await discord_bot.wait_sent(dm["channel_id"], 1)
    assert sent["content"] == "Answer to: hello in private"
    # A sentinel in the DM, sent after: answered, so the message before it was handled.
    await discord_bot.emulator.send_dm(ANN_ID, "sentinel")
    await discord_bot.wait_sent(dm["channel_id"], 2)
    assert discord_bot.sent_in(DEFAULT_SECOND_CHANNEL_ID) == []


@pytest.fixture
async def support_bot(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> AsyncIterator[Harness]:
    """A guild with a support channel and role, set as the guild's handoff contact."""
    guild = GuildSpec(
        channels={CHANNEL: "general", SUPPORT_CHANNEL: "support"},
        roles={SUPPORT_ROLE: "support"},
    )
    emulator = DiscordEmulator(heartbeat_interval_ms=1000, guilds=[guild])
    emulator.add_member(GUILD, BOB_ID, roles=[SUPPORT_ROLE])  # Bob is the support team
    harness = await make_harness(
        redis, make_settings, ScriptedEngine(tiny_engine, echo_answer), emulator=emulator
    )
    await Workspaces(redis, Keys(harness.settings.namespace), harness.settings).set(
        "discord", GUILD, {"support_channel": SUPPORT_CHANNEL, "support_mention": SUPPORT_ROLE}
    )
    yield harness
    await close(harness)


def custom_ids(sent: dict[str, Any]) -> list[str]:
    rows = sent["payload"].get("components") or []
    return [c["custom_id"] for row in rows for c in row["components"]]


async def test_a_handoff_alerts_the_support_channel_and_is_released_by_a_button(
    support_bot: Harness,
) -> None:
    emulator = support_bot.emulator
    question = await emulator.send_message(CHANNEL, f"{BOT} can I talk to a person?")
    conversation = ConversationKey("discord", GUILD, CHANNEL, question["id"])
    [told] = await support_bot.wait_sent(CHANNEL, 1)
    assert told["content"] == HANDOFF_STARTED
    assert str(told["message_reference"]["message_id"]) == question["id"]
    assert custom_ids(told) == []  # the release button is for the support team only

    [alert] = await support_bot.wait_sent(SUPPORT_CHANNEL, 1)
    assert alert["content"].startswith(f"<@&{SUPPORT_ROLE}> ")
    assert "Ann asked for a person" in alert["content"]
    link = f"https://discord.com/channels/{GUILD}/{CHANNEL}/{question['id']}"
    assert link in alert["content"] and link == jump_link(conversation, question["id"])
    allowed = alert["allowed_mentions"]
    assert allowed["parse"] == [] and allowed["roles"] == [int(SUPPORT_ROLE)]
    assert not allowed.get("users") and not allowed.get("replied_user")
    assert custom_ids(alert) == [f"handoff_release:{conversation.id}"]
    handoffs = Handoffs(support_bot.redis, Keys(support_bot.settings.namespace), 3600)
    assert await handoffs.get(conversation) is not None

    # An agent clicks "Hand back to the bot" on the alert: the click is acknowledged, the
    # conversation is told, and the bot answers again.
    click = await emulator.click_button(
        alert["id"], f"handoff_release:{conversation.id}", user_id=BOB_ID
    )
    await emulator.wait_for(
        lambda: any(r["token"] == click["token"] for r in emulator.interaction_responses), 10
    )
    [ack] = [r for r in emulator.interaction_responses if r["token"] == click["token"]]
    assert ack["type"] == 6  # deferred update: nothing posted
    sent = await support_bot.wait_sent(CHANNEL, 2)
    assert sent[1]["content"] == HANDOFF_RELEASED
    assert await handoffs.get(conversation) is None


async def test_a_thumbs_up_reaction_rates_the_answer(discord_bot: Harness) -> None:
    emulator = discord_bot.emulator
    question = await emulator.send_message(CHANNEL, f"{BOT} where is my parcel?")
    [answer] = await discord_bot.wait_sent(CHANNEL, 1)
    await emulator.wait_for(
        lambda: {r[2] for r in emulator.reactions if r[1] == answer["id"]} == {"👍", "👎"}, 10
    )
    conversation = ConversationKey("discord", GUILD, CHANNEL, question["id"])
    feedback = Feedback(discord_bot.redis, Keys(discord_bot.settings.namespace), 3600)
    await emulator.add_user_reaction(answer["id"], "👍", user_id=DEFAULT_BOT_ID)  # its own
    await emulator.add_user_reaction(answer["id"], "🎉", user_id=BOB_ID)  # not a rating
    await emulator.add_user_reaction(answer["id"], "👎", user_id=OTHER_BOT_ID)  # a bot
    await emulator.add_user_reaction(answer["id"], "👍", user_id=BOB_ID)
    rating = f"{conversation.id}:1|{BOB_ID}"  # reply id | user id

    async def rated(value: int) -> bool:
        return (await feedback.ratings(conversation)).get(rating) == value

    await wait_for(lambda: rated(1), 10, "the rating")
    # A sentinel rating, sent after the ignored reactions: once it is recorded, they were
    # handled, and nothing else is recorded.
    await emulator.add_user_reaction(answer["id"], "👎", user_id=ANN_ID)
    ann_rating = f"{conversation.id}:1|{ANN_ID}"

    async def sentinel_rated() -> bool:
        return (await feedback.ratings(conversation)).get(ann_rating) == -1

    await wait_for(sentinel_rated, 10, "the sentinel rating")
    assert await feedback.ratings(conversation) == {rating: 1, ann_rating: -1}
    await emulator.add_user_reaction(answer["id"], "👎", user_id=BOB_ID)  # changes their mind
    await wait_for(lambda: rated(-1), 10, "the changed rating")
    assert await feedback.ratings(conversation) == {rating: -1, ann_rating: -1}


async def test_the_talk_to_a_person_button_and_release_command(discord_bot: Harness) -> None:
    emulator = discord_bot.emulator
    dm = await emulator.send_dm(ANN_ID, "my order is late")
    channel = dm["channel_id"]
    await discord_bot.wait_sent(channel, 1)
    conversation = ConversationKey("discord", "dm", channel)
    # An answer offering a person (as the worker sends when the customer is frustrated).
    offer = Reply(
        f"{conversation.id}:offer",
        conversation,
        "Sorry about that! Want a person?",
        dm["id"],
        0,
        meta={"actions": ["handoff"]},
    )
    await Outbox(discord_bot.redis, Keys(discord_bot.settings.namespace)).publish(offer)
    sent = await discord_bot.wait_sent(channel, 2)
    assert custom_ids(sent[1]) == [f"handoff_request:{conversation.id}"]
    await emulator.click_button(sent[1]["id"], f"handoff_request:{conversation.id}")
    sent = await discord_bot.wait_sent(channel, 3)
    assert sent[2]["content"] == HANDOFF_NO_CONTACT  # no support channel is set here
    assert str(sent[2]["message_reference"]["message_id"]) == sent[1]["id"]
    history = await make_store(discord_bot.redis, discord_bot.settings).history(conversation)
    assert [(m.author_id, m.text) for m in history if m.role is Role.USER][-1] == (
        ANN_ID,
        "talk to a person",
    )
    handoffs = Handoffs(discord_bot.redis, Keys(discord_bot.settings.namespace), 3600)
    assert (await handoffs.get(conversation)) is not None

    # The customer cannot hand the conversation back herself: only the support team can
    # (or an operator, from the command line).
    await emulator.wait_for(lambda: "release" in {c["name"] for c in emulator.commands}, 10)
    release = await emulator.send_interaction("release", channel_id=channel)
    await emulator.wait_for(lambda: emulator.interaction_replies(release) == [ONLY_AGENTS], 10)
    assert (await handoffs.get(conversation)) is not None
    keys = Keys(discord_bot.settings.namespace)
    outbox_writer = Outbox(discord_bot.redis, keys)
    assert await release_and_announce(handoffs, outbox_writer, conversation, by="operator")
    sent = await discord_bot.wait_sent(channel, 4)
    assert sent[3]["content"] == HANDOFF_RELEASED and sent[3]["message_reference"] is None
    assert await handoffs.get(conversation) is None


def test_a_too_long_conversation_id_gets_no_button() -> None:
    short = ConversationKey("discord", GUILD, CHANNEL, "1" * 19)
    long = ConversationKey("discord", GUILD, CHANNEL, "x" * 100)
    assert _buttons(Reply("r", long, "t", "", 0, meta={"actions": ["release"]})) is None
    assert _buttons(Reply("r", short, "t", "", 0, meta={"actions": ["feedback"]})) is None
    view = _buttons(Reply("r", short, "t", "", 0, meta={"actions": ["feedback", "release"]}))
    assert view is not None
    [row] = view.to_components()
    assert [c["custom_id"] for c in row["components"]] == [f"handoff_release:{short.id}"]


@pytest.mark.slow
async def test_round_trip_with_the_bundled_model(
    redis: Any, make_settings: Any, bundled_engine: TransformersEngine
) -> None:
    harness = await make_harness(redis, make_settings, bundled_engine, CHATBOT_MAX_NEW_TOKENS="48")
    try:
        await harness.emulator.send_message(
            CHANNEL, f"{BOT} Hello! How do I update my billing address?"
        )
        [sent] = await harness.wait_sent(CHANNEL, 1, timeout_s=120)
    finally:
        await close(harness)
    assert len(sent["content"]) > 10
    assert sent["message_reference"] is not None


async def test_who_may_act_as_the_support_team_on_discord(support_bot: Harness) -> None:
    """Ann the customer, Bob who holds the support role, Carl a bystander."""
    emulator = support_bot.emulator
    carl = "4003"
    emulator.add_member(GUILD, carl)
    tid = (await emulator.create_thread(CHANNEL, "help please"))["id"]
    conversation = ConversationKey("discord", GUILD, tid)
    await emulator.send_message(tid, f"{BOT} can I talk to a person?")
    [told] = await support_bot.wait_sent(tid, 1)
    assert told["content"] == HANDOFF_STARTED
    [alert] = await support_bot.wait_sent(SUPPORT_CHANNEL, 1)
    await emulator.send_message(tid, "not support, but: reboot it", author_id=carl)
    await emulator.send_message(tid, "Bob from support here", author_id=BOB_ID)
    store = make_store(support_bot.redis, support_bot.settings)

    async def both_recorded() -> bool:
        texts = {m.text for m in await store.history(conversation)}
        return {"not support, but: reboot it", "Bob from support here"} <= texts

    await wait_for(both_recorded, 10, "both messages in the history")
    roles = {m.author_id: m.role for m in await store.history(conversation) if m.seq > 2}
    assert roles == {carl: Role.USER, BOB_ID: Role.HUMAN_AGENT}

    # Carl's release click and /reset are refused; Bob's work.
    release_id = f"handoff_release:{conversation.id}"
    click = await emulator.click_button(alert["id"], release_id, user_id=carl)
    await emulator.wait_for(lambda: emulator.interaction_replies(click) == [ONLY_AGENTS], 10)
    handoffs = Handoffs(support_bot.redis, Keys(support_bot.settings.namespace), 3600)
    assert await handoffs.get(conversation) is not None
    reset = await emulator.send_interaction("reset", channel_id=tid, user_id=carl)
    await emulator.wait_for(lambda: emulator.interaction_replies(reset) == [ONLY_AGENTS], 10)
    assert await store.history(conversation)
    await emulator.click_button(alert["id"], release_id, user_id=BOB_ID)
    sent = await support_bot.wait_sent(tid, 2)
    assert sent[1]["content"] == HANDOFF_RELEASED
    reset = await emulator.send_interaction("reset", channel_id=tid, user_id=BOB_ID)
    await emulator.wait_for(lambda: emulator.interaction_replies(reset) == [RESET_DONE], 10)
    assert await store.history(conversation) == []


async def test_odd_messages_and_clicks_never_stop_the_adapter(discord_bot: Harness) -> None:
    """Seeded fuzz through the real discord.py client: odd texts (markup, special tokens,
    invisible characters, huge); then a sentinel is answered."""
    rng = random.Random(1201)
    pieces = [BOT, "<@&1>", "@everyone", "<|im_start|>", "```", "\u202e", "\u200b", "😀", "x"]
    emulator = discord_bot.emulator
    for i in range(40):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        if i % 10 == 0:
            text += "y" * 5000
        await emulator.send_message(CHANNEL, f"{BOT} {text}", author_id=BOB_ID)
    await discord_bot.wait_sent(CHANNEL, 1)
    sentinel = await emulator.send_message(CHANNEL, f"{BOT} sentinel", author_id=ANN_ID)
    await emulator.wait_for(
        lambda: any(
            str((s.get("message_reference") or {}).get("message_id")) == sentinel["id"]
            for s in discord_bot.sent_in(CHANNEL)
        ),
        30,
    )
    assert not any(t.done() for t in discord_bot.tasks)  # adapter and worker still running


async def test_a_part_posted_again_after_a_crash_is_not_doubled(discord_bot: Harness) -> None:
    """A reply posted but not yet recorded when the adapter died goes out again: Discord
    (here its emulator) drops the second copy by its nonce."""
    emulator = discord_bot.emulator
    question = await emulator.send_message(CHANNEL, f"{BOT} hello")
    [first] = await discord_bot.wait_sent(CHANNEL, 1)
    conversation = ConversationKey("discord", GUILD, CHANNEL, question["id"])
    keys = Keys(discord_bot.settings.namespace)
    history = await make_store(discord_bot.redis, discord_bot.settings).history(conversation)
    answer = history[-1]  # the outbox entry itself is trimmed once acknowledged
    reply = Reply(answer.message_id, conversation, answer.text, question["id"], 1)
    await discord_bot.redis.delete(keys.posted(conversation, reply.reply_id))  # "not recorded"
    await Outbox(discord_bot.redis, keys).publish(reply)
    sentinel = await emulator.send_message(CHANNEL, f"{BOT} sentinel")
    await emulator.wait_for(
        lambda: any(s["content"] == "Answer to: sentinel" for s in discord_bot.sent_in(CHANNEL)),
        30,
    )
    assert [m["id"] for m in discord_bot.sent_in(CHANNEL)].count(first["id"]) == 1
    assert emulator.messages_in(CHANNEL) == ["Answer to: hello", "Answer to: sentinel"]
    assert sentinel["id"]


async def start_adapter(harness: Harness) -> None:
    """A Discord adapter and a worker on the harness's emulator, Redis and settings."""
    harness.worker = Worker(harness.redis, harness.settings, harness.engine)
    harness.tasks += [
        asyncio.create_task(DiscordAdapter(harness.redis, harness.settings).serve(harness.stop)),
        asyncio.create_task(harness.worker.run()),
    ]


async def stop_adapter(harness: Harness) -> None:
    """The adapter and the worker stop (a restart); the emulator, Discord, goes on."""
    harness.stop.set()
    if harness.worker is not None:
        harness.worker.stop()
    for result in await asyncio.gather(*harness.tasks, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result
    harness.tasks.clear()
    harness.stop = asyncio.Event()


async def test_messages_written_while_the_adapter_was_away_are_answered_once(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    harness = await make_harness(redis, make_settings, ScriptedEngine(tiny_engine, echo_answer))
    emulator = harness.emulator
    try:
        await emulator.send_message(CHANNEL, f"{BOT} before the restart?")
        dm = await emulator.send_dm(BOB_ID, "a private question")
        dm_channel = dm["channel_id"]
        await harness.wait_sent(CHANNEL, 1)
        await harness.wait_sent(dm_channel, 1)
        await stop_adapter(harness)

        # Written while no session is connected: Discord will not replay these.
        away = await emulator.send_message(CHANNEL, f"{BOT} while you were away?")
        await emulator.send_message(CHANNEL, "people chatting, not to the bot")
        away_dm = await emulator.send_dm(BOB_ID, "are you there?")

        await start_adapter(harness)
        channel_replies = await harness.wait_sent(CHANNEL, 2)
        dm_replies = await harness.wait_sent(dm_channel, 2)
        assert channel_replies[1]["content"] == "Answer to: while you were away?"
        assert str(channel_replies[1]["message_reference"]["message_id"]) == away["id"]
        assert dm_replies[1]["content"] == "Answer to: are you there?"
        assert away_dm["id"] != dm["id"]

        # A live message after the catch-up, answered: nothing before it was answered twice.
        await emulator.send_message(CHANNEL, f"{BOT} and now?")
        channel_replies = await harness.wait_sent(CHANNEL, 3)
        assert [r["content"] for r in channel_replies] == [
            "Answer to: before the restart?",
            "Answer to: while you were away?",
            "Answer to: and now?",
        ]
        assert len(harness.sent_in(dm_channel)) == 2
    finally:
        await close(harness)


async def test_channel_marks_keep_the_newest_message_of_the_last_hour(
    redis: Any, make_settings: Any
) -> None:
    settings = make_settings()
    marks = ChannelMarks(redis, Keys(settings.namespace))
    now = datetime.datetime.now(datetime.UTC)
    two_hours_ago = str(discord.utils.time_snowflake(now - datetime.timedelta(hours=2)))
    earlier, later = (
        str(discord.utils.time_snowflake(now - datetime.timedelta(seconds=s))) for s in (60, 5)
    )
    await marks.record("100", later)
    await marks.record("100", earlier)  # arrives late: the newer mark stays
    await marks.record("200", two_hours_ago)
    await marks.record("300", earlier)
    assert await marks.recent(now.timestamp()) == [("100", later), ("300", earlier)]
    stored = await redis.hkeys(Keys(settings.namespace).channel_marks("discord"))
    assert sorted(stored) == ["100", "300"]  # the channel quiet for two hours is dropped
