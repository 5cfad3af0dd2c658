"""Platform-neutral conversation types: the key that names a conversation and its messages."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import quote, unquote


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    HUMAN_AGENT = "human_agent"


def _part(value: str) -> str:
    # ':' separates the parts and braces are Redis Cluster hash tags: neither may appear raw.
    return quote(value, safe="")


@dataclass(frozen=True)
class ConversationKey:
    """platform + workspace (Slack team / Discord guild / "dm") + channel + thread.

    `thread` is the Slack thread_ts, the Discord thread or reply-chain root, or "" for a
    conversation that is the whole channel (a DM, the console).
    """

    platform: str
    workspace: str
    channel: str
    thread: str = ""

    def __post_init__(self) -> None:
        if not self.platform or not self.channel:
            raise ValueError("a conversation needs a platform and a channel")

    @functools.cached_property
    def id(self) -> str:  # computed once: every Redis key of the conversation names it
        parts = (self.platform, self.workspace, self.channel, self.thread)
        return ":".join(_part(p) for p in parts)

    @classmethod
    def from_id(cls, conversation_id: str) -> ConversationKey:
        parts = conversation_id.split(":")
        if len(parts) != 4:
            raise ValueError(f"not a conversation id: {conversation_id!r}")
        platform, workspace, channel, thread = (unquote(p) for p in parts)
        return cls(platform, workspace, channel, thread)


@dataclass(frozen=True)
class Message:
    role: Role
    text: str
    author_id: str
    author_name: str
    message_id: str
    timestamp: float
    seq: int = 0  # position among the conversation's messages, given by the store

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["role"] = self.role.value
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Message:
        data = json.loads(raw)
        return cls(
            role=Role(data["role"]),
            text=str(data["text"]),
            author_id=str(data["author_id"]),
            author_name=str(data["author_name"]),
            message_id=str(data["message_id"]),
            timestamp=float(data["timestamp"]),
            seq=int(data.get("seq", 0)),
        )


@dataclass(frozen=True)
class ReplyId:
    """The name of a reply: its conversation, what it is, and a number.

    An answer is named by the newest user message it covers (`conv:seq`), so a redelivered
    job produces the same id and the outbox can tell a retry from a new reply; alerts and
    notices that answer no message carry their kind and the time in milliseconds
    (`conv:support:ms`, `conv:released:ms`). Built and parsed only here.
    """

    conversation: ConversationKey
    number: int
    kind: str = ""  # "" for an answer; "support" or "released" otherwise

    @classmethod
    def answer(cls, conversation: ConversationKey, seq: int) -> ReplyId:
        return cls(conversation, seq)

    @classmethod
    def support_alert(cls, conversation: ConversationKey, at_s: float) -> ReplyId:
        return cls(conversation, int(at_s * 1000), "support")

    @classmethod
    def release_notice(cls, conversation: ConversationKey, at_s: float) -> ReplyId:
        return cls(conversation, int(at_s * 1000), "released")

    def __str__(self) -> str:
        if self.kind:
            return f"{self.conversation.id}:{self.kind}:{self.number}"
        return f"{self.conversation.id}:{self.number}"

    @classmethod
    def parse(cls, text: str) -> ReplyId:
        """Raises ValueError for anything `str(ReplyId)` does not produce."""
        parts = text.split(":", 4)
        if len(parts) != 5:
            raise ValueError(f"not a reply id: {text!r}")
        conversation = ConversationKey.from_id(":".join(parts[:4]))
        kind, _, number = parts[4].rpartition(":")
        if kind not in ("", "support", "released") or not number.isdigit():
            raise ValueError(f"not a reply id: {text!r}")
        return cls(conversation, int(number), kind)


@dataclass(frozen=True)
class Reply:
    """What the worker puts in a platform's outbox for its adapter to post."""

    reply_id: str  # a `ReplyId`, as text
    conversation: ConversationKey
    text: str
    reply_to: str  # the platform message id of the newest user message answered
    covers_seq: int
    # "answer" (quoted from the knowledge base, or generated for a team's own persona),
    # "small_talk" (a fixed greeting or thanks), "no_documents" (no knowledge base loaded),
    # "decline" (nothing in the knowledge base answers),
    # "handoff" (a person was asked to join), "notice" (bot back, data forgotten…),
    # "support" (the handoff alert, posted in the support channel), "apology" (failure)
    kind: str = "answer"
    # For adapters: "sources" (list of titles), "actions" (buttons to show: "feedback",
    # "handoff", "release"), "target_channel"/"mention" for a support alert.
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def actions(self) -> list[str]:
        return [str(a) for a in self.meta.get("actions", [])]

    def to_fields(self) -> dict[str, str]:
        fields = {
            "reply_id": self.reply_id,
            "conversation": self.conversation.id,
            "text": self.text,
            "reply_to": self.reply_to,
            "covers_seq": str(self.covers_seq),
            "kind": self.kind,
        }
        if self.meta:
            fields["meta"] = json.dumps(self.meta, ensure_ascii=False, sort_keys=True)
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Reply:
        return cls(
            reply_id=fields["reply_id"],
            conversation=ConversationKey.from_id(fields["conversation"]),
            text=fields["text"],
            reply_to=fields["reply_to"],
            covers_seq=int(fields["covers_seq"]),
            kind=fields.get("kind", "answer"),
            meta=json.loads(fields["meta"]) if fields.get("meta") else {},
        )
