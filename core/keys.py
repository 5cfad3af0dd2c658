"""Every Redis key name, stream, group and TTL the project uses, in one place.

Per-conversation keys carry the conversation id in a hash tag (`{...}`) so that Redis Cluster
keeps one conversation's keys on one shard and the Lua scripts that touch them stay legal.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.conversation import ConversationKey

WORKER_GROUP = "workers"
DEDUPE_TTL_S = 24 * 3600
POSTED_TTL_S = 7 * 24 * 3600
DISPLAY_NAME_TTL_S = 24 * 3600
PLACEHOLDER_TTL_S = 3600
# A reply's text while it is generated (`Keys.reply_stream`): long enough for a slow reply
# and a takeover, short because the committed reply is what lasts.
REPLY_STREAM_TTL_S = 900
REPLY_STREAM_MAXLEN = 20  # entries carry the whole text so far: the last few suffice


def adapter_group(platform: str) -> str:
    """Consumer group of one platform's adapter replicas on its outbox."""
    return f"{platform}-adapters"


# Jobs and outboxes are never trimmed by length (that would drop work nobody has done):
# they are trimmed below what every reader has acknowledged (`trim_acknowledged`). Dead
# letters are a record for operators, kept to this many.
DEAD_LETTER_MAXLEN = 10_000
TRIM_EVERY_S = 10.0


@dataclass(frozen=True)
class Keys:
    namespace: str = "chatbot"

    @property
    def jobs(self) -> str:
        """Stream of inbound jobs, read by the worker consumer group."""
        return f"{self.namespace}:jobs"

    @property
    def dead_letter(self) -> str:
        """Stream of jobs that failed `max_deliveries` times."""
        return f"{self.namespace}:jobs:dead"

    @property
    def models(self) -> str:
        """List of JSON promotion records, the model workers serve first (`chatbot model`)."""
        return f"{self.namespace}:{{models}}"

    @property
    def models_retired(self) -> str:
        """Promotions rolled back, newest first (same slot as `models`: moved atomically)."""
        return f"{self.namespace}:{{models}}:retired"

    def worker(self, consumer: str) -> str:
        """A worker's liveness record (JSON), expiring unless its heartbeat renews it."""
        return f"{self.namespace}:workers:{consumer}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.namespace}:workers:*"

    def outbox(self, platform: str) -> str:
        """Stream of replies for one platform's adapters."""
        return f"{self.namespace}:outbox:{platform}"

    def _conversation(self, conversation: ConversationKey) -> str:
        return f"{self.namespace}:conv:{{{conversation.id}}}"

    def history(self, conversation: ConversationKey) -> str:
        """List of JSON messages, oldest first, bounded and expiring."""
        return self._conversation(conversation) + ":history"

    def state(self, conversation: ConversationKey) -> str:
        """Hash: `seq` (last message number), `answered` (last user seq replied to),
        `pending_reply` (a committed reply not yet confirmed in the outbox)."""
        return self._conversation(conversation) + ":state"

    def lock(self, conversation: ConversationKey) -> str:
        """The worker generating for this conversation holds it (token, expiring)."""
        return self._conversation(conversation) + ":lock"

    def seen(self, conversation: ConversationKey, message_id: str) -> str:
        """Dedupe marker of a platform message or event id."""
        return self._conversation(conversation) + f":seen:{message_id}"

    def forget_request(self, conversation: ConversationKey, user_id: str) -> str:
        """Present while a user who asked to be forgotten is asked to confirm."""
        return self._conversation(conversation) + f":forget-request:{user_id}"

    def joined(self, conversation: ConversationKey) -> str:
        """Present while the bot takes part in this thread (answers without a mention)."""
        return self._conversation(conversation) + ":joined"

    def placeholder(self, conversation: ConversationKey) -> str:
        """Platform id of the "working on it" message that the next reply replaces."""
        return self._conversation(conversation) + ":placeholder"

    def posted(self, conversation: ConversationKey, reply_id: str) -> str:
        """Hash: part number -> platform message id, for the parts of a reply posted so far."""
        return self._conversation(conversation) + f":posted:{reply_id}"

    def reply_stream(self, conversation: ConversationKey, reply_id: str) -> str:
        """Stream of a reply's text while it is generated: each entry holds the verified
        text so far (`text`), the last says `done`; adapters show it growing."""
        return self._conversation(conversation) + f":streaming:{reply_id}"

    def posting_lock(self, conversation: ConversationKey, reply_id: str) -> str:
        """Held by the adapter replica editing a streamed reply, so that a late edit of the
        partial text never lands after the final one (token, expiring)."""
        return self._conversation(conversation) + f":posting:{reply_id}"

    def reply_chain(self, platform: str, channel: str, message_id: str) -> str:
        """The conversation a bot message belongs to, so that replying to it continues it."""
        return f"{self.namespace}:chains:{platform}:{channel}:{message_id}"

    def display_name(self, platform: str, workspace: str, user_id: str) -> str:
        return f"{self.namespace}:names:{platform}:{workspace}:{user_id}"

    # -- customer-service data: handoff, answers, feedback ------------------------------

    def handoff(self, conversation: ConversationKey) -> str:
        """Hash, present while a human agent has the conversation: `customer`, `since`…"""
        return self._conversation(conversation) + ":handoff"

    def handoff_alerted(self, conversation: ConversationKey) -> str:
        """Present for a while after the support team was alerted about this conversation."""
        return self._conversation(conversation) + ":handoff-alerted"

    def support_team(self, platform: str, workspace: str) -> str:
        """JSON list of the user ids of a workspace's support team, as last looked up."""
        return f"{self.namespace}:support-team:{platform}:{workspace}"

    def answers(self, conversation: ConversationKey) -> str:
        """Hash: reply id -> JSON record of what the bot answered (kind, sources)."""
        return self._conversation(conversation) + ":answers"

    def feedback(self, conversation: ConversationKey) -> str:
        """Hash: `<reply id>|<user id>` -> +1 or -1."""
        return self._conversation(conversation) + ":feedback"

    def conversation_pattern(self, conversation: ConversationKey) -> str:
        """Every key of one conversation (for forgetting it)."""
        return glob_escape(self._conversation(conversation)) + ":*"

    @property
    def history_pattern(self) -> str:
        return f"{glob_escape(self.namespace)}:conv:*:history"

    def conversation_of_history(self, key: str) -> str | None:
        """The conversation id in a key `history_pattern` matched (None: not such a key)."""
        return _between(key, f"{self.namespace}:conv:{{", "}:history")

    def stats(self, platform: str, workspace: str) -> str:
        """Hash of counters: answered, declined, escalated, helpful, unhelpful."""
        return f"{self.namespace}:stats:{platform}:{workspace}"

    @property
    def stats_pattern(self) -> str:
        return f"{glob_escape(self.namespace)}:stats:*"

    def workspace_of_stats(self, key: str) -> tuple[str, str] | None:
        """(platform, workspace) of a key `stats_pattern` matched."""
        rest = _between(key, f"{self.namespace}:stats:", "")
        if rest is None:
            return None
        platform, _, workspace = rest.partition(":")
        return platform, workspace

    def user_conversations(self, platform: str, user_id: str) -> str:
        """Set of the conversation ids a user wrote in (for "forget me"), expiring."""
        return f"{self.namespace}:users:{platform}:{user_id}:conversations"

    def rate(self, platform: str, user_id: str) -> str:
        """A user's rate-limit state (GCRA theoretical arrival time, ms), expiring."""
        return f"{self.namespace}:rate:{{{platform}:{user_id}}}:tat"

    def rate_notice(self, platform: str, user_id: str) -> str:
        """Present while a rate-limited user has been told so in this window."""
        return f"{self.namespace}:rate:{{{platform}:{user_id}}}:noticed"

    def display_name_pattern(self, platform: str, user_id: str) -> str:
        return f"{glob_escape(self.namespace)}:names:{platform}:*:{glob_escape(user_id)}"

    # -- per-workspace settings ------------------------------------------------------------

    def workspace(self, platform: str, workspace: str) -> str:
        """Hash of one Slack workspace's or Discord guild's settings (persona, kb…)."""
        return f"{self.namespace}:workspaces:{platform}:{workspace}"

    @property
    def workspace_pattern(self) -> str:
        return f"{glob_escape(self.namespace)}:workspaces:*"

    def workspace_of_settings(self, key: str) -> str | None:
        """`platform:workspace` of a key `workspace_pattern` matched."""
        return _between(key, f"{self.namespace}:workspaces:", "")

    # -- knowledge bases ---------------------------------------------------------------

    @property
    def knowledge_bases(self) -> str:
        """Set of knowledge-base names."""
        return f"{self.namespace}:kbs"

    def _kb(self, kb: str) -> str:
        return f"{self.namespace}:kb:{{{kb}}}"

    def kb_documents(self, kb: str) -> str:
        """Hash: document id (path relative to the ingested folder) -> JSON metadata."""
        return self._kb(kb) + ":documents"

    def kb_passages(self, kb: str) -> str:
        """Hash: passage id -> JSON (document, title, section, text, vector as base64)."""
        return self._kb(kb) + ":passages"

    def kb_version(self, kb: str) -> str:
        """Counter bumped on every change, so that workers know to reload the passages."""
        return self._kb(kb) + ":version"

    def channel_marks(self, platform: str) -> str:
        """Hash: channel id -> the newest message an adapter stored from it (to catch up
        after a new gateway session, `bot/discord/catch_up.py`)."""
        return f"{self.namespace}:marks:{platform}"

    def reply_of_message(self, platform: str, channel: str, message_id: str) -> str:
        """The reply id a bot message shows, so that a reaction to it rates that reply."""
        return f"{self.namespace}:replies:{platform}:{channel}:{message_id}"


def _between(key: str, prefix: str, suffix: str) -> str | None:
    if not key.startswith(prefix) or not key.endswith(suffix) or len(key) < len(prefix + suffix):
        return None
    return key[len(prefix) : len(key) - len(suffix)]


def glob_escape(text: str) -> str:
    """`text` matched literally in a Redis SCAN/KEYS pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
