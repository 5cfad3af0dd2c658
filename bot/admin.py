"""Operator commands: knowledge bases, workspaces, stats, transcripts, user data, handoffs.

Each connects to REDIS_URL, or to the Redis of a running `chatbot run`, or else starts the
embedded Redis (same data directory) for the length of the command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bot.redis_session import Embedded, redis_session
from core.conversation import ConversationKey
from core.errors import SettingsError
from core.jobs import Outbox
from core.keys import Keys
from core.knowledge.documents import check_kb_name, read_documents
from core.knowledge.store import KnowledgeBaseStore
from core.redis_conn import Redis
from core.settings import Settings
from core.store import ConversationStore
from core.support.feedback import read_stats
from core.support.handoff import Handoffs, release_and_announce
from core.support.privacy import UserData, import_transcript, parse_transcript, transcript_lines
from core.support.workspaces import FIELDS, Workspaces

PLATFORMS = ["slack", "discord", "console"]
Handler = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


def conversation_id(raw: str) -> ConversationKey:
    """argparse type: a conversation id as `chatbot conversation list` prints it."""
    try:
        return ConversationKey.from_id(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not a conversation id (platform:workspace:channel:thread, "
            "as `chatbot conversation list` prints them)"
        ) from None


def admin_redis(settings: Settings) -> contextlib.AbstractAsyncContextManager[Redis]:
    """REDIS_URL, a running `chatbot run`'s Redis, or the embedded one for this command."""
    return redis_session(settings, embedded=Embedded.FOR_COMMAND)


# -- knowledge bases ------------------------------------------------------------------------


async def ingest(settings: Settings, redis: Redis, folder: Path, kb: str, prune: bool) -> str:
    """Ingest `folder` into `kb` with a progress bar; returns the summary line."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    from core.knowledge.embeddings import load_embedder

    check_kb_name(kb)
    documents = list(read_documents(folder))
    total = sum(len(d.passages) for d in documents)
    embedder = await asyncio.to_thread(load_embedder)
    store = KnowledgeBaseStore(redis, Keys(settings.namespace))
    with tqdm(total=total, unit="passage", desc=f"kb {kb}", file=sys.stderr) as bar:
        report = await store.ingest(
            kb, folder, embedder, prune=prune, progress=bar.update, documents=documents
        )
        bar.update(total - bar.n)  # unchanged documents count as done
    return f"knowledge base {kb!r} from {folder}: {report.summary()}"


async def cmd_kb_ingest(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_redis(settings) as redis:
        print(await ingest(settings, redis, Path(args.path), args.kb or settings.kb, args.prune))
    return 0


async def cmd_kb_list(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_redis(settings) as redis:
        store = KnowledgeBaseStore(redis, Keys(settings.namespace))
        names = [args.kb] if args.kb else await store.names()
        if not names:
            print("no knowledge base yet: load one with `chatbot kb ingest PATH`")
        for name in names:
            documents = await store.documents(name)
            passages = sum(len(d.get("passages", [])) for d in documents.values())
            print(f"{name}: {len(documents)} documents, {passages} passages")
            for doc_id, meta in sorted(documents.items()):
                print(f"  {doc_id}  {meta.get('title', '')!r}  ({len(meta['passages'])} passages)")
    return 0


async def cmd_kb_remove(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_redis(settings) as redis:
        store = KnowledgeBaseStore(redis, Keys(settings.namespace))
        if args.document:
            found = await store.remove_document(args.kb, args.document)
            what = f"document {args.document!r} of {args.kb!r}"
        else:
            found = await store.remove(args.kb)
            what = f"knowledge base {args.kb!r}"
    print(f"removed {what}" if found else f"no {what}", file=sys.stdout if found else sys.stderr)
    return 0 if found else 1


async def cmd_kb_search(settings: Settings, args: argparse.Namespace) -> int:
    """Show what retrieval finds for a question, with scores, and whether the bot would
    answer it (the worker's own decision): for tuning `CHATBOT_KB_MIN_SCORE`."""
    from core.knowledge.answers import UNKNOWN_PENALTY, find_answer
    from core.knowledge.embeddings import load_embedder
    from core.knowledge.retrieval import Retriever

    async with admin_redis(settings) as redis:
        embedder = await asyncio.to_thread(load_embedder)
        retriever = Retriever(KnowledgeBaseStore(redis, Keys(settings.namespace)), embedder)
        kb = args.kb or settings.kb
        found = await find_answer(retriever, kb, [args.question], settings.kb_min_score)
        [search] = await retriever.search_many(kb, [args.question], top_k=args.top)
    unknown = ", ".join(sorted(search.query.missing)) or "none"
    print(
        f"{'answers' if found.answer else 'declines'}: best score "
        f"{search.best:.3f} - {UNKNOWN_PENALTY} x unknown share {search.unknown_share:.2f} "
        f"(unknown words: {unknown}) vs CHATBOT_KB_MIN_SCORE {settings.kb_min_score:.3f}"
    )
    for hit in search.hits:
        print(
            f"{hit.score:.3f} (cosine {hit.cosine:.3f}, best sentence {hit.best_sentence:.3f}, "
            f"overlap {hit.overlap:.3f})  {hit.passage.title} / {hit.passage.section}"
        )
    if found.answer:
        print("would answer:")
        print("\n".join(f"  {line}" for line in found.answer.text.splitlines()))
    return 0


# -- workspaces -----------------------------------------------------------------------------


async def cmd_workspace_list(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_redis(settings) as redis:
        found = await Workspaces(redis, Keys(settings.namespace), settings).all()
    if not found:
        print("no workspace settings: every workspace uses the process settings")
    for name, overrides in found.items():
        print(f"{name}: {json.dumps(overrides, ensure_ascii=False)}")
    return 0


async def cmd_workspace_show(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_redis(settings) as redis:
        workspaces = Workspaces(redis, Keys(settings.namespace), settings)
        overrides = await workspaces.overrides(args.platform, args.workspace)
        config = await workspaces.config(args.platform, args.workspace)
    effective = {
        "persona": config.persona,
        "kb": config.kb,
        "support_channel": config.support_channel,
        "support_mention": config.support_mention,
        "channels": ",".join(sorted(config.channels)),
    }
    for name, value in effective.items():
        origin = "workspace" if name in overrides else "default"
        print(f"{name} ({origin}): {value!r}")
    return 0


async def cmd_workspace_set(settings: Settings, args: argparse.Namespace) -> int:
    values = {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}
    if not values:
        raise SettingsError("nothing to set: give at least one of " + ", ".join(_flags()))
    async with admin_redis(settings) as redis:
        await Workspaces(redis, Keys(settings.namespace), settings).set(
            args.platform, args.workspace, values
        )
    print(f"{args.platform} {args.workspace}: set {', '.join(values)}")
    return 0


async def cmd_workspace_unset(settings: Settings, args: argparse.Namespace) -> int:
    names = [n.replace("-", "_") for n in args.names]
    async with admin_redis(settings) as redis:
        await Workspaces(redis, Keys(settings.namespace), settings).unset(
            args.platform, args.workspace, names
        )
    print(f"{args.platform} {args.workspace}: unset {', '.join(names)}")
    return 0


def _flags() -> list[str]:
    return ["--" + name.replace("_", "-") for name in FIELDS]


# -- stats, transcripts, users, handoffs ------------------------------------------------


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


async def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_redis(settings) as redis:
        stats = await read_stats(redis, Keys(settings.namespace), args.platform, args.workspace)
    data = stats.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rated = data["helpful"] + data["unhelpful"]
    print(f"replies:    {data['replies']}")
    print(f"answered:   {data['answered']} ({_percent(data['answered_rate'])})")
    print(f"declined:   {data['declined']} (no relevant passage; a person was offered)")
    print(f"escalated:  {data['escalated']} ({_percent(data['escalated_rate'])})")
    print(f"helpful:    {data['helpful']} of {rated} rated ({_percent(data['helpful_rate'])})")
    print(f"rate-limited messages: {data['rate_limited']} (not queued; CHATBOT_USER_RATE)")
    return 0


async def cmd_conversation_list(settings: Settings, args: argparse.Namespace) -> int:
    keys = Keys(settings.namespace)
    async with admin_redis(settings) as redis:
        async for key in redis.scan_iter(match=keys.history_pattern):
            conversation = keys.conversation_of_history(str(key))
            if conversation is not None:
                print(f"{conversation}  ({await redis.llen(key)} messages)")
    return 0


async def cmd_conversation_export(settings: Settings, args: argparse.Namespace) -> int:
    conversation: ConversationKey = args.conversation
    async with admin_redis(settings) as redis:
        messages = await ConversationStore.from_settings(redis, settings).history(conversation)
    if not messages:
        print(f"no stored messages in {conversation.id}", file=sys.stderr)
        return 1
    text = "".join(line + "\n" for line in transcript_lines(conversation, messages))
    if args.output and args.output != "-":
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"{len(messages)} messages written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


async def cmd_conversation_import(settings: Settings, args: argparse.Namespace) -> int:
    try:
        lines = Path(args.path).read_text(encoding="utf-8").splitlines()
        found, messages = parse_transcript(lines)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SettingsError(f"cannot import {args.path}: {exc}") from exc
    target = args.conversation or found
    if target is None:
        raise SettingsError(f"{args.path} holds no messages")
    async with admin_redis(settings) as redis:
        store = ConversationStore.from_settings(redis, settings)
        count = await import_transcript(store, target, messages)
    print(f"{count} messages imported into {target.id}")
    return 0


async def cmd_user_forget(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_redis(settings) as redis:
        report = await UserData(redis, Keys(settings.namespace), settings.history_ttl_s).forget(
            args.platform, args.user
        )
    print(f"{args.platform} user {args.user}: {report.summary()}")
    return 0


async def cmd_handoff_release(settings: Settings, args: argparse.Namespace) -> int:
    conversation: ConversationKey = args.conversation
    keys = Keys(settings.namespace)
    async with admin_redis(settings) as redis:
        released = await release_and_announce(
            Handoffs(redis, keys, settings.history_ttl_s),
            Outbox(redis, keys),
            conversation,
            by="operator (CLI)",
        )
    if not released:
        print(f"{conversation.id} is not with a person", file=sys.stderr)
        return 1
    print(f"{conversation.id} is back with the bot")
    return 0


# -- parser ---------------------------------------------------------------------------------


def _command(group: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    return parser


def add_admin_commands(sub: Any) -> None:
    for add in (_add_kb, _add_workspace, _add_stats, _add_conversation, _add_user, _add_handoff):
        add(sub)


def _add_kb(sub: Any) -> None:
    kb = sub.add_parser("kb", help="manage knowledge bases").add_subparsers(
        dest="kb_command", required=True, metavar="ACTION"
    )
    p = _command(kb, "ingest", cmd_kb_ingest, "load a folder of Markdown/text/FAQ files")
    p.add_argument("path", help="a folder (or one file)")
    p.add_argument("--kb", help="knowledge base name (default: CHATBOT_KB, 'default')")
    p.add_argument(
        "--no-prune",
        dest="prune",
        action="store_false",
        help="keep documents ingested earlier from this folder that are no longer in it",
    )
    p = _command(kb, "list", cmd_kb_list, "list knowledge bases and their documents")
    p.add_argument("--kb", help="only this knowledge base")
    p = _command(kb, "remove", cmd_kb_remove, "remove a knowledge base, or one document")
    p.add_argument("kb", help="knowledge base name")
    p.add_argument("--document", help="only this document (its path, as `kb list` shows it)")
    p = _command(kb, "search", cmd_kb_search, "show the passages a question retrieves, scored")
    p.add_argument("question")
    p.add_argument("--kb", help="knowledge base name (default: CHATBOT_KB)")
    p.add_argument("--top", type=int, default=3)


def _add_workspace(sub: Any) -> None:
    ws = sub.add_parser("workspace", help="per-workspace settings").add_subparsers(
        dest="workspace_command", required=True, metavar="ACTION"
    )
    _command(ws, "list", cmd_workspace_list, "list workspaces with settings of their own")
    for name, handler, help_text in (
        ("show", cmd_workspace_show, "show a workspace's effective settings"),
        ("set", cmd_workspace_set, "set a workspace's settings"),
        ("unset", cmd_workspace_unset, "go back to the default for some settings"),
    ):
        p = _command(ws, name, handler, help_text)
        p.add_argument("platform", choices=PLATFORMS)
        p.add_argument("workspace", help="Slack team id (T…) or Discord guild id")
        if name == "set":
            for field_name, meaning in FIELDS.items():
                p.add_argument("--" + field_name.replace("_", "-"), dest=field_name, help=meaning)
        if name == "unset":
            p.add_argument(
                "names", nargs="+", choices=[*FIELDS, *(f.replace("_", "-") for f in FIELDS)]
            )


def _add_stats(sub: Any) -> None:
    p = _command(sub, "stats", cmd_stats, "answered / escalated / helpful rates")
    p.add_argument("--platform", default="")
    p.add_argument("--workspace", default="")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_conversation(sub: Any) -> None:
    conv = sub.add_parser("conversation", help="list, export, import transcripts").add_subparsers(
        dest="conversation_command", required=True, metavar="ACTION"
    )
    _command(conv, "list", cmd_conversation_list, "list stored conversations")
    p = _command(conv, "export", cmd_conversation_export, "export a transcript as JSON Lines")
    p.add_argument(
        "conversation",
        type=conversation_id,
        help="conversation id, as `conversation list` shows it",
    )
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    p = _command(conv, "import", cmd_conversation_import, "import a JSON Lines transcript")
    p.add_argument("path")
    p.add_argument(
        "--conversation",
        type=conversation_id,
        help="into this conversation id (default: the file's)",
    )


def _add_user(sub: Any) -> None:
    user = sub.add_parser("user", help="user data").add_subparsers(
        dest="user_command", required=True, metavar="ACTION"
    )
    p = _command(user, "forget", cmd_user_forget, "delete a user's messages and feedback")
    p.add_argument("platform", choices=PLATFORMS)
    p.add_argument("user", help="the user's platform id")


def _add_handoff(sub: Any) -> None:
    handoff = sub.add_parser("handoff", help="conversations with a person").add_subparsers(
        dest="handoff_command", required=True, metavar="ACTION"
    )
    p = _command(handoff, "release", cmd_handoff_release, "give a conversation back to the bot")
    p.add_argument("conversation", type=conversation_id, help="conversation id")
