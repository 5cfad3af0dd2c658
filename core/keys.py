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


def adapter_group(platform: str) -> str:
    """Consumer group of one platform's adapter replicas on its outbox."""
    return f"{platform}-adapters"


JOBS_MAXLEN = 100_000
OUTBOX_MAXLEN = 10_000
DEAD_LETTER_MAXLEN = 10_000


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

    def joined(self, conversation: ConversationKey) -> str:
        """Present while the bot takes part in this thread (answers without a mention)."""
        return self._conversation(conversation) + ":joined"

    def placeholder(self, conversation: ConversationKey) -> str:
        """Platform id of the "working on it" message that the next reply replaces."""
        return self._conversation(conversation) + ":placeholder"

    def posted(self, conversation: ConversationKey, reply_id: str) -> str:
        """Hash: part number -> platform message id, for the parts of a reply posted so far."""
        return self._conversation(conversation) + f":posted:{reply_id}"

    def reply_chain(self, platform: str, channel: str, message_id: str) -> str:
        """The conversation a bot message belongs to, so that replying to it continues it."""
        return f"{self.namespace}:chains:{platform}:{channel}:{message_id}"

    def display_name(self, platform: str, workspace: str, user_id: str) -> str:
        return f"{self.namespace}:names:{platform}:{workspace}:{user_id}"
