"""The Discord emulator against the real discord.py client (REST, gateway, app commands)."""

from __future__ import annotations

import asyncio
import io
import sys
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import discord
import pytest
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from tests.discord_emulator import (
    ANN_ID,
    BOB_ID,
    DEFAULT_CHANNEL_ID,
    DEFAULT_GUILD_ID,
    DiscordEmulator,
)

GUILD = discord.Object(int(DEFAULT_GUILD_ID))


@asynccontextmanager
async def running_emulator(**kwargs: Any) -> AsyncIterator[DiscordEmulator]:
    """A started emulator with discord.py pointed at it; both put back afterwards."""
    kwargs.setdefault("heartbeat_interval_ms", 1000)
    old_base, old_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    async with DiscordEmulator(**kwargs) as emulator:
        Route.BASE = emulator.api_url
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(emulator.gateway_url)
        try:
            yield emulator
        finally:
            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old_base, old_gateway


@pytest.fixture
async def emulator() -> AsyncIterator[DiscordEmulator]:
    async with running_emulator() as started:
        yield started


class RecordingClient(discord.Client):
    """A discord.Client that queues what it receives and keeps handler errors."""

    def __init__(self, *, message_content: bool = True) -> None:
        intents = discord.Intents.default()
        intents.message_content = message_content
        super().__init__(intents=intents, guild_ready_timeout=0.1)
        self.messages: asyncio.Queue[discord.Message] = asyncio.Queue()
        self.threads: asyncio.Queue[discord.Thread] = asyncio.Queue()
        self.errors: list[BaseException | None] = []
        self.ready_count = 0
        self.ready = asyncio.Event()
        self.resumed = asyncio.Event()

    async def on_ready(self) -> None:
        self.ready_count += 1
        self.ready.set()

    async def on_resumed(self) -> None:
        self.resumed.set()

    async def on_message(self, message: discord.Message) -> None:
        await self.messages.put(message)

    async def on_thread_create(self, thread: discord.Thread) -> None:
        await self.threads.put(thread)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        self.errors.append(sys.exc_info()[1])

    async def next_message(self, *, own: bool = False, timeout_s: float = 5) -> discord.Message:
        """The next message received, skipping the bot's own echoes unless `own`."""
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.messages.get()
                if own == (message.author == self.user):
                    return message


@asynccontextmanager
async def run_client(
    emulator: DiscordEmulator, client: RecordingClient | None = None
) -> AsyncIterator[RecordingClient]:
    """Starts `client` against the emulator, waits for on_ready; on exit closes it and
    checks that it stopped cleanly: no exception from start(), none in event handlers."""
    client = client or RecordingClient()
    task = asyncio.create_task(client.start(emulator.token))
    ready = asyncio.create_task(client.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        await client.close()
        raise AssertionError(f"no on_ready; client task: {task}")
    try:
        yield client
        assert not task.done(), f"the client stopped early: {task}"
    finally:
        await client.close()
        await asyncio.wait_for(task, timeout=5)
    assert task.exception() is None
    assert client.errors == []
    # Event handlers run as tasks named "discord.py: <event>"; all should be finished.
    pending = [
        t for t in asyncio.all_tasks() if t.get_name().startswith("discord.py") and not t.done()
    ]
    for t in pending:
        await asyncio.wait_for(t, timeout=1)


async def eventually(predicate: Callable[[], object], timeout_s: float = 5) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("zlib_stream", [True, False], ids=["zlib-stream", "text-frames"])
async def test_connects_and_receives_messages(zlib_stream: bool) -> None:
    async with (
        running_emulator(zlib_stream=zlib_stream) as emulator,
        run_client(emulator) as client,
    ):
        # What discord.py asked for: no GET /gateway, the default gateway with its query.
        assert emulator.calls_to("GET /gateway") == []
        assert [c.route for c in emulator.requests] == [
            "GET /users/@me",
            "GET /oauth2/applications/@me",
        ]
        assert emulator.gateway_queries == [
            {"v": "10", "encoding": "json", "compress": "zlib-stream"}
        ]
        assert emulator.identifies[0]["intents"] == client.intents.value
        assert emulator.identifies[0]["intents"] & (1 << 15)
        assert emulator.identifies[0]["token"] == "test-token"

        assert client.user is not None
        assert (client.user.id, client.user.name, client.user.bot) == (1000, "support", True)
        assert client.application_id == 1000
        guild = client.get_guild(2000)
        assert guild is not None and guild.name == "G"
        assert sorted(c.id for c in guild.text_channels) == [3000, 3001]
        # Without the members intent GUILD_CREATE lists only the bot, as on Discord.
        assert guild.member_count == 4 and [m.id for m in guild.members] == [1000]
        assert guild.me is not None and guild.default_role.id == 2000
        other_bot = await guild.fetch_member(4999)
        assert other_bot.bot and other_bot.name == "otherbot"

        sent = await emulator.send_message(DEFAULT_CHANNEL_ID, "hello <@1000>", author_id=ANN_ID)
        message = await client.next_message()
        assert message.id == int(sent["id"])
        assert message.content == "hello <@1000>"
        assert isinstance(message.author, discord.Member)
        assert (message.author.id, message.author.name) == (4001, "ann")
        assert message.mentions == [client.user]
        assert client.user.mentioned_in(message)
        assert message.channel.id == 3000 and message.guild == guild
        assert message.type is discord.MessageType.default

        await emulator.send_message(
            DEFAULT_CHANNEL_ID, "hi all", author_id=BOB_ID, mentions=[], mention_everyone=True
        )
        everyone = await client.next_message()
        assert (everyone.author.name, everyone.mention_everyone) == ("bob", True)
        assert everyone.mentions == []

        # GET /channels/{id}/messages/{id} serves what was dispatched.
        fetched = await message.channel.fetch_message(message.id)
        assert fetched.content == "hello <@1000>"
        assert emulator.heartbeat_count >= 1


async def test_reply_typing_edit_and_own_echo(emulator: DiscordEmulator) -> None:
    async with run_client(emulator) as client:
        sent = await emulator.send_message(DEFAULT_CHANNEL_ID, "<@1000> where is my order?")
        message = await client.next_message()

        async with message.channel.typing():
            reply = await message.reply("hi ann")
        assert emulator.typing == [DEFAULT_CHANNEL_ID]

        assert len(emulator.sent) == 1
        record = emulator.sent[0]
        assert record["channel_id"] == DEFAULT_CHANNEL_ID
        assert record["content"] == "hi ann"
        assert str(record["message_reference"]["message_id"]) == sent["id"]
        assert record["id"] == str(reply.id)
        assert reply.type is discord.MessageType.reply
        assert reply.reference is not None and reply.reference.message_id == message.id
        assert reply.author == client.user

        # Discord sends the bot its own message back, as MESSAGE_CREATE.
        echo = await client.next_message(own=True)
        assert (echo.id, echo.content) == (reply.id, "hi ann")

        # A user's reply to the bot: referenced_message filled in, the bot mentioned.
        await emulator.send_message(DEFAULT_CHANNEL_ID, "thanks", reply_to=record["id"])
        follow_up = await client.next_message()
        assert follow_up.reference is not None
        assert follow_up.reference.message_id == reply.id
        assert isinstance(follow_up.reference.resolved, discord.Message)
        assert client.user in follow_up.mentions

        await reply.edit(content="hi ann, edited")
        await emulator.send_message(DEFAULT_CHANNEL_ID, "<@1000> bye")
        bye = await client.next_message()
        await (await bye.channel.send("bye")).delete()
        assert emulator.messages_in(DEFAULT_CHANNEL_ID) == ["hi ann, edited"]
        assert [e["content"] for e in emulator.edits] == ["hi ann, edited"]
        assert len(emulator.deletions) == 1

        # A file upload arrives as multipart/form-data with payload_json.
        upload = await message.channel.send(
            "the log", file=discord.File(io.BytesIO(b"abc"), "a.txt")
        )
        assert emulator.sent[-1]["files"] == ["a.txt"] and emulator.sent[-1]["content"] == "the log"
        assert [a.filename for a in upload.attachments] == ["a.txt"]
        await upload.delete()

        # GET /channels/{id}/messages: newest first, deleted ones gone.
        history = [m.content async for m in message.channel.history(limit=3)]
        assert history == ["<@1000> bye", "thanks", "hi ann, edited"]


async def test_rate_limited_send_is_retried_once(emulator: DiscordEmulator) -> None:
    async with run_client(emulator) as client:
        channel = client.get_channel(int(DEFAULT_CHANNEL_ID))
        assert isinstance(channel, discord.TextChannel)
        emulator.rate_limit_next("POST /channels/3000/messages", retry_after_s=0.2)

        loop = asyncio.get_running_loop()
        started = loop.time()
        await channel.send("after the 429")
        assert loop.time() - started >= 0.2

        calls = emulator.calls_to("POST /channels/3000/messages")
        assert [c.status for c in calls] == [429, 200]
        assert calls[0].response["retry_after"] == 0.2
        assert emulator.messages_in(DEFAULT_CHANNEL_ID) == ["after the 429"]
        assert len(emulator.sent) == 1


@pytest.mark.parametrize("code", [4000, None], ids=["close-4000", "abrupt"])
async def test_dropped_connection_resumes_and_replays(
    emulator: DiscordEmulator, code: int | None
) -> None:
    async with run_client(emulator) as client:
        session_id = next(iter(emulator.sessions))
        with emulator.gateway_paused():
            await emulator.drop_connection(code)
            await emulator.wait_for(lambda: not emulator.connected)
            await emulator.send_message(DEFAULT_CHANNEL_ID, "<@1000> sent while you were away")
            await asyncio.sleep(0.1)
            assert client.messages.empty()

        await asyncio.wait_for(client.resumed.wait(), timeout=10)
        message = await client.next_message()
        assert message.content == "<@1000> sent while you were away"

        assert (emulator.identify_count, emulator.resume_count) == (1, 1)
        assert emulator.resumes[0]["session_id"] == session_id
        assert emulator.replayed_count == 1
        # The resume went to READY's resume_gateway_url, with discord.py's query on it.
        assert len(emulator.gateway_queries) == 2
        assert emulator.gateway_queries[1]["compress"] == "zlib-stream"
        assert client.ready_count == 1

        # Still live after the resume.
        await emulator.send_message(DEFAULT_CHANNEL_ID, "<@1000> and now")
        assert (await client.next_message()).content == "<@1000> and now"


async def test_reconnect_opcode_resumes(emulator: DiscordEmulator) -> None:
    async with run_client(emulator) as client:
        await emulator.send_reconnect()
        await asyncio.wait_for(client.resumed.wait(), timeout=10)
        assert (emulator.identify_count, emulator.resume_count) == (1, 1)


async def test_refused_privileged_intent_raises() -> None:
    async with running_emulator(refuse_intents=True) as emulator:
        client = RecordingClient(message_content=True)
        with pytest.raises(discord.PrivilegedIntentsRequired):
            await asyncio.wait_for(client.start(emulator.token), timeout=10)
        await client.close()  # discord.py leaves the client open on 4014
        assert emulator.identify_count == 1
        assert not emulator.connected

        # Without the privileged intent the same application connects.
        async with run_client(emulator, RecordingClient(message_content=False)):
            assert emulator.identify_count == 2


async def test_bad_token() -> None:
    async with running_emulator() as emulator:
        client = RecordingClient()
        with pytest.raises(discord.LoginFailure):
            await client.start("wrong-token")
        await client.close()
        assert emulator.calls_to("GET /users/@me")[0].status == 401

        # The gateway refuses a bad IDENTIFY with 4004.
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(emulator.gateway_url + "?v=10&encoding=json")
            hello = await ws.receive_json()
            assert hello["op"] == 10 and hello["d"]["heartbeat_interval"] == 1000
            await ws.send_json({"op": 2, "d": {"token": "wrong", "intents": 513}})
            closing = await ws.receive()
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4004
            await ws.close()


async def test_message_content_intent_is_enforced(emulator: DiscordEmulator) -> None:
    async with run_client(emulator, RecordingClient(message_content=False)) as client:
        await emulator.send_message(DEFAULT_CHANNEL_ID, "no mention here")
        assert (await client.next_message()).content == ""
        await emulator.send_message(DEFAULT_CHANNEL_ID, "<@1000> with a mention")
        assert (await client.next_message()).content == "<@1000> with a mention"
        await emulator.send_dm(ANN_ID, "a direct message")
        assert (await client.next_message()).content == "a direct message"


async def test_direct_messages_and_threads(emulator: DiscordEmulator) -> None:
    async with run_client(emulator) as client:
        # A DM from bob, and the bot's answer through POST /users/@me/channels.
        await emulator.send_dm(BOB_ID, "help me")
        dm = await client.next_message()
        assert isinstance(dm.channel, discord.DMChannel) and dm.guild is None
        assert isinstance(dm.author, discord.User) and dm.author.name == "bob"
        bob = await client.fetch_user(int(BOB_ID))
        channel = await bob.create_dm()
        assert channel.id == int(emulator.dm_channel_id(BOB_ID))
        await channel.send("sure")
        assert emulator.messages_in(emulator.dm_channel_id(BOB_ID)) == ["sure"]

        # The bot starts a thread from a message: the thread takes the message's id.
        await emulator.send_message(DEFAULT_CHANNEL_ID, "<@1000> long question")
        question = await client.next_message()
        thread = await question.create_thread(name="help")
        assert thread.id == question.id and thread.parent_id == 3000
        assert (await client.threads.get()).id == thread.id  # THREAD_CREATE
        await thread.send("let's talk here")
        assert emulator.messages_in(str(thread.id)) == ["let's talk here"]

        # A user starts a thread and posts in it.
        user_thread = await emulator.create_thread(DEFAULT_CHANNEL_ID, "user thread")
        created = await asyncio.wait_for(client.threads.get(), timeout=5)
        assert created.name == "user thread"
        await emulator.send_message(user_thread["id"], "<@1000> in the thread")
        in_thread = await client.next_message()
        assert isinstance(in_thread.channel, discord.Thread)
        assert in_thread.channel.id == int(user_thread["id"])
        assert in_thread.guild is not None and in_thread.guild.id == 2000


async def test_app_commands_sync_and_interactions(emulator: DiscordEmulator) -> None:
    client = RecordingClient()
    tree = app_commands.CommandTree(client)

    @tree.command(name="ask", description="Ask the bot", guild=GUILD)
    async def ask(interaction: discord.Interaction, question: str) -> None:
        await interaction.response.send_message(f"asked: {question}")

    @tree.command(name="slow", description="Think first", guild=GUILD)
    async def slow(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send("done thinking")
        await interaction.followup.send("and one more")

    @tree.command(name="secret", description="Only for you", guild=GUILD)
    async def secret(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("just for you", ephemeral=True)

    @tree.error
    async def on_tree_error(
        interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        client.errors.append(error)

    async with run_client(emulator, client):
        synced = await tree.sync(guild=GUILD)
        assert sorted(c.name for c in synced) == ["ask", "secret", "slow"]
        assert {c["name"]: c["guild_id"] for c in emulator.commands} == {
            "ask": "2000",
            "slow": "2000",
            "secret": "2000",
        }
        assert emulator.command_syncs == [("2000", ["ask", "slow", "secret"])]
        ask_options = next(c for c in emulator.commands if c["name"] == "ask")["options"]
        assert [(o["name"], o["type"], o["required"]) for o in ask_options] == [
            ("question", 3, True)
        ]

        asked = await emulator.send_interaction("ask", {"question": "why?"})
        await emulator.wait_for(lambda: emulator.interaction_replies(asked) == ["asked: why?"])
        callback = emulator.interaction_responses[0]
        assert (callback["kind"], callback["type"]) == ("callback", 4)
        assert callback["interaction_id"] == asked["id"]

        slowed = await emulator.send_interaction("slow")
        await emulator.wait_for(
            lambda: emulator.interaction_replies(slowed) == ["done thinking", "and one more"]
        )
        kinds = [
            (r["kind"], r.get("type"))
            for r in emulator.interaction_responses
            if r["token"] == slowed["token"]
        ]
        assert kinds == [("callback", 5), ("followup", None), ("followup", None)]

        hidden = await emulator.send_interaction("secret", user_id=BOB_ID)
        await emulator.wait_for(lambda: emulator.interaction_replies(hidden) == ["just for you"])

        assert emulator.messages_in(DEFAULT_CHANNEL_ID) == [
            "asked: why?",
            "done thinking",
            "and one more",
        ]
        assert "just for you" in emulator.messages_in(DEFAULT_CHANNEL_ID, include_ephemeral=True)


async def test_gateway_frames_are_zlib_stream_when_asked(emulator: DiscordEmulator) -> None:
    async with aiohttp.ClientSession() as session:
        url = emulator.gateway_url + "?v=10&encoding=json&compress=zlib-stream"
        async with session.ws_connect(url) as ws:
            frame = await ws.receive()
            assert frame.type is aiohttp.WSMsgType.BINARY
            assert frame.data.endswith(b"\x00\x00\xff\xff")
            hello = zlib.decompressobj().decompress(frame.data)
            assert b'"op": 10' in hello


async def test_discord_py_attributes_are_restored() -> None:
    base, gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    async with running_emulator() as emulator:
        assert emulator.api_url == Route.BASE
        assert str(DiscordWebSocket.DEFAULT_GATEWAY) == emulator.gateway_url
    assert (base, gateway) == (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)


async def test_rest_answers_like_discord(emulator: DiscordEmulator) -> None:
    auth = {"Authorization": "Bot test-token"}
    base = emulator.api_url
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/users/@me", headers=auth) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            assert (await response.json())["id"] == "1000"
        async with session.get(f"{base}/users/@me") as response:
            assert response.status == 401
            assert await response.json() == {"message": "401: Unauthorized", "code": 0}
        async with session.get(f"{base}/no/such/route", headers=auth) as response:
            assert response.status == 404
            assert await response.json() == {"message": "404: Not Found", "code": 0}
        async with session.get(f"{base}/gateway/bot", headers=auth) as response:
            assert (await response.json())["url"] == emulator.gateway_url
        too_long = {"content": "x" * 2001}
        url = f"{base}/channels/3000/messages"
        async with session.post(url, json=too_long, headers=auth) as response:
            assert response.status == 400
            assert (await response.json())["code"] == 50035
        async with session.post(url, json={"content": ""}, headers=auth) as response:
            assert (await response.json())["code"] == 50006
        async with session.get(f"{base}/channels/999/messages", headers=auth) as response:
            assert (response.status, (await response.json())["code"]) == (404, 10003)
    assert emulator.sent == []
