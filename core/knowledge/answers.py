"""What the customer-service assistant does with a customer's newest message.

A small model phrases well and invents facts freely, so the facts in a reply come from the
knowledge base, not from the model:

- a relevant passage found: the model writes a short lead-in with the passages in its
  prompt; any number, e-mail address or link in that lead-in that is not in the passages
  drops the lead-in; then the best passage is quoted verbatim and its source cited;
- nothing relevant (score under `CHATBOT_KB_MIN_SCORE`): the bot says it does not know and
  offers a person, with no generation at all;
- small talk (hello, thanks): the model answers, and a reply with any number or contact
  detail in it is replaced by a plain one;
- "talk to a person", "forget me": handled without the model.

With no knowledge base loaded the bot is a plain chat model (the foundation's behaviour).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from core.conversation import Message, Role
from core.knowledge.retrieval import Hit, Retriever

GROUNDING_INSTRUCTIONS = (
    "Answer the customer's last question in one or two short sentences, using only the "
    "help-centre passages below. Do not add facts, numbers or contact details that are not "
    "in them. The passages will be shown to the customer after your answer."
)
DECLINE_TEXT = (
    "I'm sorry, I couldn't find anything about that in our help centre, and I'd rather not "
    "guess. Would you like me to bring in a person from our support team? Just say "
    '"talk to a person".'
)
FRUSTRATION_OFFER = (
    'If this doesn\'t solve it, I can bring in a person from our team: just say "talk to a person".'
)
SMALL_TALK_FALLBACK = "Happy to help! What can I do for you today?"
FORGET_DONE = (
    "Done: I've deleted your messages and feedback from my records. "
    "(Messages still shown in this chat are kept by the chat service, not by me.)"
)
QUOTE_INTRO = "Here's what our help centre says:"
MAX_PASSAGES_IN_PROMPT = 3
GROUNDED_MAX_NEW_TOKENS = 80


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
_FORGET = re.compile(
    r"\b(?:forget|delete|erase|remove|wipe)\s+(?:me|about\s+me|all\s+about\s+me|"
    r"(?:all\s+)?my\s+(?:data|messages|conversations?|history|information|info|details))\b",
    re.IGNORECASE,
)
_SMALL_TALK = re.compile(
    r"^\s*(?:hi|hello|hey|hiya|yo|good\s+(?:morning|afternoon|evening)|thanks?|thank\s+you|"
    r"thx|ty|cheers|ok(?:ay)?|great|cool|perfect|awesome|bye|goodbye|see\s+you)"
    r"(?:\s+(?:so\s+much|a\s+lot|very\s+much|there|again|all|everyone|bot|for\s+\w+(?:\s+\w+)?))*"
    r"[\s!.,:)]*$",
    re.IGNORECASE,
)
_FRUSTRATED = re.compile(
    r"\b(?:useless|not\s+helpful|unhelpful|ridiculous|frustrat\w*|annoy\w*|angry|furious|"
    r"terrible|awful|stupid|waste\s+of\s+(?:my\s+)?time|doesn'?t\s+help|does\s+not\s+help|"
    r"not\s+what\s+i\s+asked|makes\s+no\s+sense|wtf)\b|!!!",
    re.IGNORECASE,
)
# Facts a reply must not invent: numbers (prices, times, phone numbers), e-mails, links.
_FACT = re.compile(
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|https?://\S+|www\.\S+|\d+(?:[.,:/-]\d+)*",
    re.IGNORECASE,
)


def detect_intent(text: str) -> Intent:
    if _HANDOFF.search(text):
        return Intent.HANDOFF
    if _FORGET.search(text):
        return Intent.FORGET
    if _SMALL_TALK.match(text):
        return Intent.SMALL_TALK
    return Intent.QUESTION


def is_frustrated(text: str) -> bool:
    if _FRUSTRATED.search(text):
        return True
    shouted = [w for w in re.findall(r"[A-Za-z]{3,}", text) if w.isupper()]
    return len(shouted) >= 3


def invented_facts(text: str, sources: Sequence[str]) -> list[str]:
    """The facts (numbers, e-mails, links) in `text` that appear in none of `sources`."""
    haystack = re.sub(r"\s+", " ", " ".join(sources)).lower()
    missing = []
    for match in _FACT.finditer(text):
        fact = match.group(0).rstrip(".,:/-").lower()
        if fact and fact not in haystack:
            missing.append(fact)
    return missing


class PlanKind(StrEnum):
    GROUNDED = "grounded"  # generate a lead-in, then quote and cite
    CHAT = "chat"  # generate freely (small talk; or no knowledge base at all)
    DECLINE = "decline"
    HANDOFF = "handoff"
    FORGET = "forget"


@dataclass
class Plan:
    kind: PlanKind
    hits: list[Hit] = field(default_factory=list)
    system: str = ""
    offer_handoff: bool = False
    best_score: float = 0.0

    @property
    def generates(self) -> bool:
        return self.kind in (PlanKind.GROUNDED, PlanKind.CHAT)


def retrieval_query(history: Sequence[Message]) -> list[str]:
    """The newest user message, and for a short follow-up also it with the previous one."""
    users = [m.text for m in history if m.role is Role.USER]
    if not users:
        return []
    queries = [users[-1]]
    if len(users) > 1 and len(users[-1].split()) < 6:
        queries.append(f"{users[-2]} {users[-1]}")
    return queries


class Assistant:
    def __init__(self, retriever: Retriever | None, min_score: float) -> None:
        self.retriever = retriever
        self.min_score = min_score

    async def plan(
        self, history: Sequence[Message], persona: str, kb: str, *, knowledge: bool
    ) -> Plan:
        """Decide how to answer the newest user message of `history`."""
        newest = next(m for m in reversed(history) if m.role is Role.USER)
        intent = detect_intent(newest.text)
        if intent is Intent.HANDOFF:
            return Plan(PlanKind.HANDOFF)
        if intent is Intent.FORGET:
            return Plan(PlanKind.FORGET)
        frustrated = is_frustrated(newest.text)
        if intent is Intent.SMALL_TALK or self.retriever is None or not knowledge:
            return Plan(PlanKind.CHAT, system=persona, offer_handoff=frustrated)
        hits = await self.best_hits(kb, history)
        best = hits[0].score if hits else 0.0
        relevant = [h for h in hits if h.score >= self.min_score]
        if not relevant:
            return Plan(PlanKind.DECLINE, hits=hits, offer_handoff=True, best_score=best)
        return Plan(
            PlanKind.GROUNDED,
            hits=relevant,
            system=grounded_system(persona, relevant),
            offer_handoff=frustrated,
            best_score=best,
        )

    async def best_hits(self, kb: str, history: Sequence[Message]) -> list[Hit]:
        assert self.retriever is not None
        queries = retrieval_query(history)
        results = await self.retriever.search_many(kb, queries, top_k=MAX_PASSAGES_IN_PROMPT)
        return max(results, key=lambda hits: hits[0].score if hits else 0.0, default=[])


def grounded_system(persona: str, hits: Sequence[Hit]) -> str:
    passages = "\n\n".join(
        f"[{n}] {h.passage.title}: {h.passage.text}" for n, h in enumerate(hits, start=1)
    )
    return f"{persona}\n\n{GROUNDING_INSTRUCTIONS}\n\n{passages}"


def source_label(hit: Hit) -> str:
    return hit.passage.title


def compose_grounded(generated: str, hits: Sequence[Hit]) -> tuple[str, list[str]]:
    """Lead-in (if it invents nothing) + the best passage quoted + its source."""
    best = hits[0]
    lead = generated.strip()
    if lead and invented_facts(lead, [h.passage.text for h in hits]):
        lead = ""
    lines = best.passage.text.split("\n")
    quote = "\n".join(f"> {line}" if line.strip() else ">" for line in lines)
    sources = [source_label(best)]
    parts = [lead or QUOTE_INTRO, quote, f"Source: {sources[0]}"]
    return "\n\n".join(parts), sources


def compose_chat(generated: str, *, knowledge: bool) -> str:
    """Small talk: with a knowledge base loaded, no fact may come from the model."""
    text = generated.strip()
    if knowledge and invented_facts(text, []):
        return SMALL_TALK_FALLBACK
    return text
