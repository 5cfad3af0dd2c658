"""What to do with a conversation now: the one place that decides, so that the worker only
carries plans out.

The worker holds the conversation's lock, has its history and the newest user message
waiting, and asks `AnswerPolicy.decide`. The answer is one plan:

- `StayQuiet`: a person has the conversation (a handoff is active); record, say nothing;
- `ConfirmForget`: the customer asked to be forgotten; ask them to confirm first;
- `ForgetUser`: they confirmed; delete their data, then say so;
- `StartHandoff`: the customer asked for a person; alert the support channel, tell them;
- `PostText`: a reply with no generation: a knowledge-base answer (sentences quoted from
  the passages, cited), "I don't know" with the offer of a person, a greeting or thanks,
  or, with no knowledge base loaded, what the assistant can and cannot do;
- `Generate`: run the model (free chat: only for a team that set its own persona), then
  `Generate.draft` turns its text into the reply (dropping invented facts).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from core.conversation import ConversationKey, Message, Role
from core.generation.engine import FinishReason
from core.generation.prompt import finalize_reply
from core.knowledge.answers import (
    DECLINE_TEXT,
    FRUSTRATION_OFFER,
    GOODBYE_TEXT,
    GREETING_TEXT,
    NO_DOCUMENTS_TEXT,
    THANKS_TEXT,
    chat_so_far,
    compose_chat,
    find_answer,
    retrieval_query,
)
from core.knowledge.retrieval import Retriever
from core.redis_batching import together
from core.settings import DEFAULT_PERSONA, Settings
from core.support.forget import (
    FORGET_CONFIRM_TEXT,
    FORGET_DONE,
    ForgetRequests,
    is_confirmation,
    is_forget_request,
)
from core.support.handoff import HANDOFF_NO_CONTACT, HANDOFF_STARTED, Handoffs
from core.support.workspaces import WorkspaceConfig, Workspaces

log = logging.getLogger(__name__)


class Intent(StrEnum):
    QUESTION = "question"
    HANDOFF = "handoff"
    FORGET = "forget"
    SMALL_TALK = "small_talk"


_HANDOFF = re.compile(
    r"\b(?:talk|speak|chat|connect\s+me)\s+(?:to|with)\s+(?:a\s+|an\s+|some\s+|your\s+)?"
    r"(?:real\s+|live\s+|actual\s+)?(?:human|person|people|agent|someone|somebody|"
    r"representative|rep|operator|staff|support\s+(?:agent|team|person))\b"
    r"|\b(?:human|live|real)\s+(?:agent|person|being|support)\b"
    r"|^\s*(?:/human|human|agent|operator|representative)\s*(?:please|pls)?[\s.!?]*$",
    re.IGNORECASE,
)
_SMALL_TALK = re.compile(
    r"^\s*(?:hi|hello|hey|hiya|yo|good\s+(?:morning|afternoon|evening)|thanks?|thank\s+you|"
    r"thx|ty|cheers|ok(?:ay)?|great|cool|perfect|awesome|bye|goodbye|see\s+you)"
    r"(?:\s+(?:so\s+much|a\s+lot|very\s+much|there|again|all|everyone|bot|for\s+\w+(?:\s+\w+)?))*"
    r"[\s!.,:)]*$",
    re.IGNORECASE,
)
_THANKS = re.compile(r"\b(?:thanks?|thank\s+you|thx|ty|cheers|great|perfect|awesome)\b", re.I)
_GOODBYE = re.compile(r"\b(?:bye|goodbye|see\s+you)\b", re.IGNORECASE)
_FRUSTRATED = re.compile(
    r"\b(?:useless|not\s+helpful|unhelpful|ridiculous|frustrat\w*|annoy\w*|angry|furious|"
    r"terrible|awful|stupid|waste\s+of\s+(?:my\s+)?time|doesn'?t\s+help|does\s+not\s+help|"
    r"not\s+what\s+i\s+asked|makes\s+no\s+sense|wtf)\b|!!!",
    re.IGNORECASE,
)


def detect_intent(text: str) -> Intent:
    if _HANDOFF.search(text):
        return Intent.HANDOFF
    if is_forget_request(text):
        return Intent.FORGET
    if _SMALL_TALK.match(text):
        return Intent.SMALL_TALK
    return Intent.QUESTION


def small_talk_reply(text: str) -> str:
    """The fixed, fact-free answer to a greeting, thanks or goodbye."""
    if _GOODBYE.search(text):
        return GOODBYE_TEXT
    if _THANKS.search(text):
        return THANKS_TEXT
    return GREETING_TEXT


def is_frustrated(text: str) -> bool:
    if _FRUSTRATED.search(text):
        return True
    shouted = [w for w in re.findall(r"[A-Za-z]{3,}", text) if w.isupper()]
    return len(shouted) >= 3


@dataclass(frozen=True)
class Draft:
    """A reply's content; the worker names it, commits it and sends it."""

    text: str
    kind: str = "answer"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StayQuiet:
    pass


@dataclass(frozen=True)
class ForgetUser:
    user_id: str
    notice: str = FORGET_DONE


@dataclass(frozen=True)
class ConfirmForget:
    user_id: str
    reply: Draft = field(
        default_factory=lambda: Draft(FORGET_CONFIRM_TEXT, "confirm", {"actions": ["forget"]})
    )


@dataclass(frozen=True)
class StartHandoff:
    customer: Message  # the conversation's first customer message: whoever pressed the button
    reason: str
    support_channel: str
    support_mention: str
    reply: Draft


@dataclass(frozen=True)
class PostText:
    reply: Draft


@dataclass(frozen=True)
class Generate:
    system: str
    max_new_tokens: int
    knowledge: bool = False  # a knowledge base is loaded (so no fact may come from the model)
    offer_handoff: bool = False
    disclosure: str = ""  # the workspace's "Answered by an AI assistant" line, if any

    def draft(self, generated: str, finish_reason: FinishReason, shown: str = "") -> Draft:
        """The reply; it starts with whatever was `shown` while it was generated."""
        text = compose_chat(
            finalize_reply(generated, finish_reason, shown), knowledge=self.knowledge
        )
        meta: dict[str, Any] = {"actions": ["feedback"]}
        spans = generated_spans(text, generated)
        if spans:  # what the model wrote, for `chatbot watermark detect --reply`
            meta["generated"] = spans
        if self.offer_handoff:
            text = f"{text}\n\n{FRUSTRATION_OFFER}"
            meta["actions"] = ["feedback", "handoff"]
        return disclose(Draft(text, meta=meta), self.disclosure)

    def so_far(self, generated: str) -> str:
        """What may be shown while the reply is generated: never more than `draft`'s text
        will start with, and nothing a check of the final reply could remove."""
        return chat_so_far(generated, knowledge=self.knowledge)


def disclose(draft: Draft, disclosure: str) -> Draft:
    """The draft with the workspace's disclosure line under it (and named in its meta, so
    that the conversation's history keeps the reply without it)."""
    if not disclosure:
        return draft
    meta = {**draft.meta, "disclosure": disclosure}
    return Draft(f"{draft.text}\n\n{disclosure_line(disclosure)}", draft.kind, meta)


def disclosure_line(disclosure: str) -> str:
    return f"_{disclosure}_"  # italics in Slack's mrkdwn and in Discord's markdown


def generated_spans(text: str, generated: str) -> list[list[int]]:
    """[start, end) character spans of `text` that are the model's own words.

    `Generate.draft` only trims the model's text and cuts it short (ending it with "…" or a
    fixed frame where it must), so what the model wrote is the part of `text` that starts
    it the same way; a fixed reply that replaced it shares nothing with it."""
    model = generated.strip()
    length = 0
    for mine, theirs in zip(text, model, strict=False):
        if mine != theirs:
            break
        length += 1
    return [[0, length]] if length else []


Plan = StayQuiet | ConfirmForget | ForgetUser | StartHandoff | PostText | Generate


@dataclass(frozen=True)
class Situation:
    """A conversation's settings and state that decide the plan (`AnswerPolicy.read`)."""

    config: WorkspaceConfig
    handed_off: bool
    # The users read to have no pending "forget me" confirmation (`read`'s `author`): a
    # confirmation is only ever asked for by the holder of the conversation's lock, so
    # under the lock "none" stays true and `decide` need not clear one.
    no_forget_request: frozenset[str] = frozenset()


class AnswerPolicy:
    def __init__(
        self,
        settings: Settings,
        workspaces: Workspaces,
        handoffs: Handoffs,
        forget_requests: ForgetRequests,
        retriever: Retriever | None,
    ) -> None:
        self.settings = settings
        self.workspaces = workspaces
        self.handoffs = handoffs
        self.forget_requests = forget_requests
        self.retriever = retriever

    def read(self, conversation: ConversationKey, author: str = "") -> list[Awaitable[Any]]:
        """The reads `situation` makes a Situation of (what `decide` needs from Redis
        besides the history): the workspace's settings, whether a person has the
        conversation, and, for `author` (the newest message's, when known), whether a
        "forget me" confirmation is pending. Awaitables, for the caller to run side by
        side with its own reads (one round trip; a nested `together` would take two)."""
        reads: list[Awaitable[Any]] = [
            self.workspaces.config(conversation.platform, conversation.workspace),
            self.handoffs.get(conversation),
        ]
        if author:
            reads.append(self.forget_requests.asked(conversation, author))
        return reads

    @staticmethod
    def situation(results: Sequence[Any], author: str = "") -> Situation:
        """The Situation of `read`'s results (in its order)."""
        config, handoff, *forget = results
        clear = frozenset({author}) if author and forget and not forget[0] else frozenset()
        return Situation(config, handed_off=handoff is not None, no_forget_request=clear)

    async def decide(
        self,
        conversation: ConversationKey,
        history: Sequence[Message],
        situation: Situation | None = None,
    ) -> Plan:
        """The plan for the newest user message of `history`, its replies disclosed as the
        workspace asks. `situation`: `read`'s, when the caller read it already."""
        if situation is None:
            situation = self.situation(await together(*self.read(conversation)))
        config, handed_off = situation.config, situation.handed_off
        plan = await self._decide(
            conversation,
            history,
            config,
            handed_off=handed_off,
            no_forget_request=situation.no_forget_request,
        )
        if not config.disclosure:
            return plan
        if isinstance(plan, Generate):
            return replace(plan, disclosure=config.disclosure)
        if isinstance(plan, PostText | StartHandoff | ConfirmForget):
            return replace(plan, reply=disclose(plan.reply, config.disclosure))
        return plan

    async def _decide(
        self,
        conversation: ConversationKey,
        history: Sequence[Message],
        config: WorkspaceConfig,
        *,
        handed_off: bool,
        no_forget_request: frozenset[str] = frozenset(),
    ) -> Plan:
        if handed_off:
            return StayQuiet()
        newest = next(m for m in reversed(history) if m.role is Role.USER)
        # Asked to confirm forgetting? A "yes" does it; anything else keeps the data.
        if newest.author_id not in no_forget_request and (
            await self.forget_requests.take(conversation, newest.author_id)
            and is_confirmation(newest.text)
        ):
            return ForgetUser(newest.author_id)
        intent = detect_intent(newest.text)
        if intent is Intent.HANDOFF:
            # The release button is on the support team's alert, not here.
            text = HANDOFF_STARTED if config.support_channel else HANDOFF_NO_CONTACT
            customer = next(m for m in history if m.role is Role.USER)
            return StartHandoff(
                customer,
                "asked for a person",
                config.support_channel,
                config.support_mention,
                Draft(text, "handoff"),
            )
        if intent is Intent.FORGET:
            return ConfirmForget(newest.author_id)
        frustrated = is_frustrated(newest.text)
        knowledge = bool(self.retriever and await self.retriever.passage_count(config.kb))
        if config.persona != DEFAULT_PERSONA:
            # A team that set its own persona asked for a chat model: it talks, and with a
            # knowledge base loaded its questions are still answered from it.
            chat = Generate(
                config.persona, self.settings.max_new_tokens, knowledge, offer_handoff=frustrated
            )
            if intent is Intent.SMALL_TALK or not knowledge:
                return chat
        elif intent is Intent.SMALL_TALK:
            return PostText(Draft(small_talk_reply(newest.text), "small_talk"))
        elif not knowledge:
            return PostText(Draft(NO_DOCUMENTS_TEXT, "no_documents", {"actions": ["handoff"]}))
        return await self._answer(conversation, config.kb, history, frustrated)

    async def _answer(
        self, conversation: ConversationKey, kb: str, history: Sequence[Message], frustrated: bool
    ) -> PostText:
        """A question to the knowledge base: quoted sentences, or "I don't know"."""
        assert self.retriever is not None
        min_score = self.settings.kb_min_score
        found = await find_answer(self.retriever, kb, retrieval_query(history), min_score)
        answer = found.answer
        if answer is None:
            log.info(
                "nothing in %s answers %s (best score %.3f, unknown words %s): declined",
                kb,
                conversation.id,
                found.search.best,
                ", ".join(sorted(found.search.query.missing)) or "none",
            )
            return PostText(Draft(DECLINE_TEXT, "decline", {"actions": ["handoff"]}))
        text, actions = answer.text, ["feedback"]
        if frustrated:
            text, actions = f"{text}\n\n{FRUSTRATION_OFFER}", ["feedback", "handoff"]
        return PostText(Draft(text, "answer", {"actions": actions, "sources": answer.sources}))
