"""The customer-service cycle through Slack (real slack-bolt against the emulator, real Redis,
real worker, real embedding model and the example knowledge base): a grounded answer with
feedback buttons, a rating, a handoff to a person, the bot silent while the agent talks, the
release, and the bot resuming with the agent's words in its context. Also forget-me and
transcript export/import."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.conversation import ConversationKey, Message, Role
from core.generation.transformers_engine import TransformersEngine
from core.jobs import Outbox
from core.keys import Keys
from core.knowledge.answers import QUOTE_INTRO
from core.knowledge.embeddings import Embedder
from core.knowledge.retrieval import Retriever
from core.knowledge.store import KnowledgeBaseStore
from core.settings import Settings
from core.support.agents import ONLY_AGENTS
from core.support.feedback import Feedback, read_stats
from core.support.forget import FORGET_CONFIRM_TEXT, is_confirmation, is_forget_request
from core.support.handoff import (
    HANDOFF_RELEASED,
    HANDOFF_STARTED,
    Handoffs,
    release_and_announce,
)
from core.support.privacy import UserData, import_transcript, parse_transcript, transcript_lines
from core.support.workspaces import Workspaces
from core.worker import Worker
from tests.helpers import ScriptedEngine, echo_answer, make_store, outbox, submit, wait_for
from tests.slack_emulator import (
    app_mention,
    block_action,
    message,
    post_interaction,
    post_slash_command,
    slash_command,
)
from tests.test_slack import TEAM, Harness, close, conversation, make_harness

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "kb"
SUPPORT_CHANNEL = "CSUPPORT"
SUPPORT_GROUP = "S0SUPPORT"


@pytest.fixture
async def cs_slack(
    redis: Any, make_settings: Any, keys: Keys, embedder: Embedder, tiny_engine: TransformersEngine
) -> AsyncIterator[Harness]:
    kb_store = KnowledgeBaseStore(redis, keys)
    await kb_store.ingest("default", EXAMPLES, embedder)
    engine = ScriptedEngine(tiny_engine, lambda r: "Here is what I found.", context_tokens=2048)
    harness = await make_harness(
        redis,
        make_settings,
        engine,
        retriever=Retriever(kb_store, embedder),
        CHATBOT_MAX_NEW_TOKENS="32",
    )
    await Workspaces(redis, keys, harness.settings).set(
        "slack", TEAM, {"support_channel": SUPPORT_CHANNEL, "support_mention": SUPPORT_GROUP}
    )
    harness.emulator.usergroups[SUPPORT_GROUP] = ["U2"]  # Bob is the support team
    yield harness
    await close(harness)


def buttons(posted: dict[str, Any]) -> dict[str, str]:
    """action_id -> value of the buttons on a posted Slack message."""
    found = {}
    for block in posted.get("blocks") or []:
        for element in block.get("elements", []):
            found[element["action_id"]] = element["value"]
    return found


def last_post_with(harness: Harness, action_id: str) -> dict[str, Any]:
    posts = [
        c.params
        for c in harness.emulator.calls
        if c.method in ("chat.postMessage", "chat.update")
        and action_id in buttons({"blocks": _json(c.params.get("blocks"))})
    ]
    assert posts, f"no message with a {action_id} button"
    return {**posts[-1], "blocks": _json(posts[-1].get("blocks"))}


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def test_answer_rate_hand_off_release_and_resume(cs_slack: Harness) -> None:
    slack, emulator = cs_slack, cs_slack.emulator
    url = slack.url
    root = app_mention("<@UBOT> how much does standard shipping cost?", channel="C1")
    conv = conversation("C1", root["ts"])
    await slack.send(root)

    # 1. A grounded answer, quoting the knowledge base, citing it, with feedback buttons.
    texts = await slack.wait_thread("C1", root["ts"], lambda t: any(cited(x) for x in t))
    answer = next(x for x in texts if cited(x))
    assert "$5.95" in answer and answer.startswith(QUOTE_INTRO)
    post = last_post_with(slack, "feedback_up")
    reply_id = buttons(post)["feedback_up"]

    # 2. Thumbs up: stored with the answer, counted, thanked.
    status, _ = await post_interaction(
        url, "test-signing-secret", block_action("feedback_up", reply_id, user="U1", channel="C1")
    )
    assert status == 200
    feedback = Feedback(slack.redis, Keys(slack.settings.namespace), 3600)
    await wait_for(lambda: _ratings(feedback, conv), 10, "the rating")
    assert await feedback.ratings(conv) == {f"{reply_id}|U1": 1}
    await emulator.wait_for(lambda: bool(emulator.calls_to("chat.postEphemeral")), 10)

    # 3. The customer asks for a person: told so, the support channel is alerted with the
    # user group and a link to the thread.
    await slack.send(message("can I talk to a person please", thread_ts=root["ts"]))
    await slack.wait_thread("C1", root["ts"], lambda t: HANDOFF_STARTED in t)
    alerts = await slack.wait_thread(SUPPORT_CHANNEL, None, lambda t: len(t) == 1)
    assert f"<!subteam^{SUPPORT_GROUP}>" in alerts[0] and "ann asked for a person" in alerts[0]
    assert f"/C1/p{root['ts'].replace('.', '')}" in alerts[0]
    release_value = buttons(last_post_with(slack, "handoff_release"))["handoff_release"]
    assert release_value == conv.id

    # 4. The bot stays quiet; the customer's and the agent's words are recorded.
    before = len(slack.thread("C1", root["ts"]))
    await slack.send(message("hello? anyone?", thread_ts=root["ts"], user="U1"))
    await slack.send(
        message("Hi ann, Bob from support here: refund sent.", thread_ts=root["ts"], user="U2")
    )
    store = make_store(slack.redis, slack.settings)

    async def recorded() -> bool:
        return any(m.role is Role.HUMAN_AGENT for m in await store.history(conv))

    await wait_for(recorded, 10, "the agent's message in the history")
    await asyncio.sleep(1.0)  # the worker had time to answer, if it were going to
    assert len(slack.thread("C1", root["ts"])) == before
    history = await store.history(conv)
    agent = next(m for m in history if m.role is Role.HUMAN_AGENT)
    assert (agent.author_name, agent.text) == ("bob", "Hi ann, Bob from support here: refund sent.")

    # 5. The agent hands back; the bot says so and answers again, knowing what Bob said.
    await post_interaction(
        url,
        "test-signing-secret",
        block_action("handoff_release", release_value, user="U2", channel=SUPPORT_CHANNEL),
    )
    await slack.wait_thread("C1", root["ts"], lambda t: HANDOFF_RELEASED in t)
    await slack.send(message("how long do I have to return a tent?", thread_ts=root["ts"]))
    await slack.wait_thread("C1", root["ts"], lambda t: sum(cited(x) for x in t) == 2)
    stats = (await read_stats(slack.redis, Keys(slack.settings.namespace), "slack")).to_dict()
    assert (stats["answered"], stats["escalated"], stats["helpful"]) == (2, 1, 1)
    # Knowledge answers are quoted, not generated; small talk is generated here (the test
    # persona is a chat model), and its prompt holds what Bob said.
    engine = slack.engine
    await slack.send(message("thanks!", thread_ts=root["ts"]))
    await wait_for(lambda: _generated(engine), 30, "a generated reply")
    last_prompt = engine.requests[-1].turns
    assert any("(Human agent bob) Hi ann" in t["content"] for t in last_prompt)


def cited(text: str) -> bool:
    return "Source:" in text or "Sources:" in text


async def _generated(engine: Any) -> bool:
    return bool(engine.requests)


async def _ratings(feedback: Feedback, conv: ConversationKey) -> bool:
    return bool(await feedback.ratings(conv))


async def test_the_talk_to_a_person_button_hands_off(cs_slack: Harness) -> None:
    slack = cs_slack
    root = app_mention("<@UBOT> Who won the 2022 FIFA World Cup?", channel="C1")
    await slack.send(root)
    await slack.wait_thread("C1", root["ts"], lambda t: any("rather not guess" in x for x in t))
    value = buttons(last_post_with(slack, "handoff_request"))["handoff_request"]
    await post_interaction(
        slack.url, "test-signing-secret", block_action("handoff_request", value, user="U1")
    )
    await slack.wait_thread("C1", root["ts"], lambda t: HANDOFF_STARTED in t)
    await slack.wait_thread(SUPPORT_CHANNEL, None, lambda t: len(t) == 1)


async def test_a_workspace_can_limit_the_channels_the_bot_answers_in(cs_slack: Harness) -> None:
    slack = cs_slack
    await Workspaces(slack.redis, Keys(slack.settings.namespace), slack.settings).set(
        "slack", TEAM, {"channels": "C2"}
    )
    quiet = app_mention("<@UBOT> how much does standard shipping cost?", channel="C1")
    allowed = app_mention("<@UBOT> how much does standard shipping cost?", channel="C2")
    await slack.send(quiet)
    await slack.send(allowed)
    await slack.wait_thread("C2", allowed["ts"], lambda t: any(cited(x) for x in t))
    assert slack.thread("C1", quiet["ts"]) == []
    # Direct messages are always answered.
    dm = message("how much does standard shipping cost?", channel="D1", channel_type="im")
    await slack.send(dm)
    await slack.wait_thread("D1", None, lambda t: any(cited(x) for x in t))


async def test_a_workspace_disclosure_line_is_under_every_reply(cs_slack: Harness) -> None:
    slack = cs_slack
    await Workspaces(slack.redis, Keys(slack.settings.namespace), slack.settings).set(
        "slack", TEAM, {"disclosure": "Answered by an AI assistant"}
    )
    asked = app_mention("<@UBOT> how much does standard shipping cost?", channel="C1")
    await slack.send(asked)
    thread = await slack.wait_thread("C1", asked["ts"], lambda t: any(cited(x) for x in t))
    answer = next(x for x in thread if cited(x))
    assert answer.rstrip().endswith("_Answered by an AI assistant_")
    greeting = app_mention("<@UBOT> hello", channel="C1")
    await slack.send(greeting)
    [hello] = await slack.wait_thread(
        "C1", greeting["ts"], lambda t: len(t) == 1 and "Working on it" not in t[0]
    )
    assert hello.rstrip().endswith("_Answered by an AI assistant_"), hello
    # The conversation's history keeps the bot's words without it (the model's context).
    history = await make_store(slack.redis, slack.settings).history(conversation("C1", asked["ts"]))
    bot_turns = [m.text for m in history if m.role is Role.ASSISTANT]
    assert bot_turns and not any("AI assistant" in t for t in bot_turns)


# -- user data ------------------------------------------------------------------------------


async def _all_data(redis: Any, namespace: str) -> dict[str, str]:
    """Every key of the namespace with a dump of its value, for searching."""
    found = {}
    async for key in redis.scan_iter(match=f"{namespace}:*"):
        kind = await redis.type(key)
        if kind == "string":
            value: Any = await redis.get(key)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "hash":
            value = await redis.hgetall(key)
        elif kind == "set":
            value = sorted(await redis.smembers(key))
        elif kind == "stream":
            value = await redis.xrange(key)
        else:
            value = kind
        found[key] = json.dumps(value, ensure_ascii=False)
    return found


async def test_forget_me_deletes_every_key_of_that_user(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine, keys: Keys
) -> None:
    settings: Settings = make_settings()
    # The bot's replies quote the customer's words and name, as a real model's may.
    engine = ScriptedEngine(tiny_engine, lambda r: f"Sure: {r.turns[-1]['content']}")
    worker = Worker(redis, settings, engine)
    task = asyncio.create_task(worker.run())
    mine = ConversationKey("test", "w", "dm-zed")
    shared = ConversationKey("test", "w", "channel", "thread")
    try:
        await submit(
            redis, settings, mine, "my email is zed@example.com, secret-zed-1", "z1", "zed"
        )
        await submit(redis, settings, shared, "zed here: secret-zed-2", "z2", "zed")
        await wait_for(lambda: _count(redis, settings, 2), 20, "two answers")
        await submit(redis, settings, shared, "amy here, hello ZED", "a1", "amy")
        await wait_for(lambda: _count(redis, settings, 3), 20, "three answers")
        replies = await outbox(redis, settings)
        await Feedback(redis, keys, 3600).rate(replies[0].reply_id, "zed", helpful=False)
        await Feedback(redis, keys, 3600).rate(replies[2].reply_id, "amy", helpful=True)
        assert "zed" in json.dumps(await _all_data(redis, settings.namespace)).lower()
        # The user asks in words; the bot asks them to confirm, and deletes nothing yet.
        await submit(redis, settings, shared, "please forget me", "z3", "zed")
        await wait_for(lambda: _kind_posted(redis, settings, "confirm"), 20, "the question")
        [confirm] = [r for r in await outbox(redis, settings) if r.kind == "confirm"]
        assert confirm.text == FORGET_CONFIRM_TEXT and confirm.actions == ["forget"]
        assert "secret-zed-1" in json.dumps(await _all_data(redis, settings.namespace))
        await submit(redis, settings, shared, "yes", "z4", "zed")
        await wait_for(lambda: _kind_posted(redis, settings, "notice"), 20, "the confirmation")
    finally:
        worker.stop()
        await task
    data = await _all_data(redis, settings.namespace)
    leaks = {k: v for k, v in data.items() if "zed" in k.lower() or "zed" in v.lower()}
    assert leaks == {}
    # The other customer's words (their name for zed scrubbed) and rating stay.
    history = await make_store(redis, settings).history(shared)
    assert [m.text for m in history if m.role is Role.USER] == ["amy here, hello [removed]"]
    assert list((await Feedback(redis, keys, 3600).ratings(shared)).values()) == [1]
    # An operator can do the same by id.
    report = await UserData(redis, keys, 3600).forget("test", "amy")
    assert report.conversations_deleted == [shared.id]
    assert "amy" not in json.dumps(await _all_data(redis, settings.namespace)).lower()


async def test_forget_me_needs_a_clear_request_and_a_yes(
    redis: Any, make_settings: Any, tiny_engine: TransformersEngine
) -> None:
    settings: Settings = make_settings()
    worker = Worker(redis, settings, ScriptedEngine(tiny_engine, echo_answer))
    task = asyncio.create_task(worker.run())
    conv = ConversationKey("test", "w", "dm-kim")
    store = make_store(redis, settings)
    try:
        await submit(redis, settings, conv, "How do I delete my messages in the app?", "k1", "kim")
        await wait_for(lambda: _count(redis, settings, 1), 20, "an answer")
        await submit(redis, settings, conv, "please don't delete my data", "k2", "kim")
        await wait_for(lambda: _count(redis, settings, 2), 20, "an answer")
        await submit(redis, settings, conv, "forget me", "k3", "kim")
        await wait_for(lambda: _kind_posted(redis, settings, "confirm"), 20, "the question")
        await submit(redis, settings, conv, "actually no, what are your hours?", "k4", "kim")
        await wait_for(lambda: _count(redis, settings, 4), 20, "an answer")
    finally:
        worker.stop()
        await task
    kinds = [r.kind for r in await outbox(redis, settings)]
    assert kinds == ["answer", "answer", "confirm", "answer"]  # nothing deleted, ever
    assert next(m.text for m in await store.history(conv) if m.role is Role.USER) == (
        "How do I delete my messages in the app?"
    )


@pytest.mark.parametrize(
    ("text", "asks"),
    [
        ("forget me", True),
        ("Please delete my data.", True),
        ("can you forget me?", True),
        ("I want you to delete all my messages please", True),
        ("erase my personal data from your records", True),
        ("please don't delete my data", False),
        ("How do I delete my messages in the app?", False),
        ("do not forget me", False),
        ("I forgot my password, can you remove me from the mailing list?", False),
        ("delete my account", False),  # an account question for the team, not our records
    ],
)
def test_only_clear_requests_ask_to_forget(text: str, asks: bool) -> None:
    assert is_forget_request(text) is asks


@pytest.mark.parametrize(
    ("text", "yes"),
    [("yes", True), ("Yes, delete it!", True), ("ok", True), ("no", False), ("yes?? why", False)],
)
def test_what_counts_as_yes(text: str, yes: bool) -> None:
    assert is_confirmation(text) is yes


async def _kind_posted(redis: Any, settings: Settings, kind: str) -> bool:
    return any(r.kind == kind for r in await outbox(redis, settings))


async def _notice_posted(redis: Any, settings: Settings) -> bool:
    return any(r.kind == "notice" for r in await outbox(redis, settings))


async def _count(redis: Any, settings: Settings, n: int) -> bool:
    return len(await outbox(redis, settings)) >= n


async def test_export_round_trips(redis: Any, settings: Settings) -> None:
    store = make_store(redis, settings)
    source = ConversationKey("slack", "T1", "C1", "1700000000.000100")
    texts = [
        (Role.USER, 'Ünïcode ✓ and "quotes"\nnew line'),
        (Role.ASSISTANT, "> quoted\n\nSource: Shipping Policy"),
        (Role.HUMAN_AGENT, "Bob here"),
    ]
    for n, (role, text) in enumerate(texts):
        message = Message(role, text, f"u{n}", f"User {n}", f"m{n}", 1700000000.0 + n)
        await store.add_message(source, message)
    exported = transcript_lines(source, await store.history(source))
    assert all(json.loads(line)["conversation"] == source.id for line in exported)
    found, messages = parse_transcript(["", *exported, ""])
    assert found == source
    target = ConversationKey("slack", "T1", "C9", "")
    assert await import_transcript(store, target, messages) == 3
    assert await import_transcript(store, target, messages) == 0  # idempotent
    again = transcript_lines(target, await store.history(target))
    assert [json.loads(x) | {"conversation": ""} for x in again] == [
        json.loads(x) | {"conversation": ""} for x in exported
    ]
    # Imported history is not a question waiting for an answer.
    state = await store.state(target)
    assert state.answered == state.seq == 3
    with pytest.raises(ValueError, match="line 1"):
        parse_transcript(["{not json"])


async def test_who_may_act_as_the_support_team_on_slack(cs_slack: Harness) -> None:
    """U1 the customer, U2 the support group's member, U3 a bystander in the channel."""
    slack, emulator = cs_slack, cs_slack.emulator
    root = app_mention("<@UBOT> how much does standard shipping cost?", channel="C1")
    conv = conversation("C1", root["ts"])
    await slack.send(root)
    await slack.wait_thread("C1", root["ts"], lambda t: any(cited(x) for x in t))
    # A bystander presses "Talk to a person" under the customer's answer: the handoff is
    # the customer's, and the bystander does not become anybody's agent.
    value = buttons(last_post_with(slack, "feedback_up"))["feedback_up"]
    assert value.startswith(conv.id)
    await post_interaction(
        slack.url, "test-signing-secret", block_action("handoff_request", conv.id, user="U3")
    )
    await slack.wait_thread("C1", root["ts"], lambda t: HANDOFF_STARTED in t)
    handoffs = Handoffs(slack.redis, Keys(slack.settings.namespace), 3600)
    handoff = await handoffs.get(conv)
    assert handoff is not None and handoff.customer_id == "U1"
    # The release button is on the support alert only.
    told = [c.params for c in emulator.calls if HANDOFF_STARTED in str(c.params.get("text"))]
    assert told and all("handoff_release" not in str(p.get("blocks")) for p in told)

    # In the thread: the bystander's words are a user's, the agent's an agent's.
    await slack.send(message("I know the answer, it's free!", thread_ts=root["ts"], user="U3"))
    await slack.send(message("Bob from support: it's $5.95.", thread_ts=root["ts"], user="U2"))
    store = make_store(slack.redis, slack.settings)

    async def both_recorded() -> bool:
        texts = {m.text for m in await store.history(conv)}
        return {"I know the answer, it's free!", "Bob from support: it's $5.95."} <= texts

    await wait_for(both_recorded, 10, "both messages in the history")
    roles = {m.author_id: m.role for m in await store.history(conv) if m.author_id in ("U2", "U3")}
    assert roles == {"U3": Role.USER, "U2": Role.HUMAN_AGENT}

    # A bystander's release is refused (ephemeral), the handoff stays; the agent's works.
    await post_interaction(
        slack.url,
        "test-signing-secret",
        block_action("handoff_release", conv.id, user="U3", channel=SUPPORT_CHANNEL),
    )
    await emulator.wait_for(
        lambda: any(ONLY_AGENTS in str(c.params) for c in emulator.calls_to("chat.postEphemeral")),
        10,
    )
    assert await handoffs.get(conv) is not None
    await post_interaction(
        slack.url,
        "test-signing-secret",
        block_action("handoff_release", conv.id, user="U2", channel=SUPPORT_CHANNEL),
    )
    await slack.wait_thread("C1", root["ts"], lambda t: HANDOFF_RELEASED in t)
    assert await handoffs.get(conv) is None
    # /reset of a channel's conversation: the support team's to do, not a bystander's.
    for user, allowed in (("U3", False), ("U2", True)):
        form = slash_command("/reset", channel="C1", user=user)
        status, body = await post_slash_command(slack.url, "test-signing-secret", form)
        assert status == 200 and (ONLY_AGENTS in body) is not allowed


async def test_a_handoff_loop_pings_the_support_team_once(cs_slack: Harness) -> None:
    slack = cs_slack
    root = app_mention("<@UBOT> can I talk to a person?", channel="C1")
    conv = conversation("C1", root["ts"])
    handoffs = Handoffs(slack.redis, Keys(slack.settings.namespace), 3600)
    outbox_writer = Outbox(slack.redis, Keys(slack.settings.namespace))
    await slack.send(root)
    await slack.wait_thread("C1", root["ts"], lambda t: HANDOFF_STARTED in t)
    for i in range(3):
        assert await release_and_announce(handoffs, outbox_writer, conv, by="operator")
        await slack.send(message(f"talk to a person ({i})", thread_ts=root["ts"]))

        async def again(n: int = i) -> bool:
            return sum(HANDOFF_STARTED in x for x in slack.thread("C1", root["ts"])) == n + 2

        await wait_for(again, 20, "the handoff again")
    assert len(slack.thread(SUPPORT_CHANNEL, None)) == 1  # one alert, not four
