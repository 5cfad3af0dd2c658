"""Turning knowledge-base hits and generated text into a reply a customer can trust.

A small model phrases well and invents facts freely, so the facts in a reply come from the
knowledge base, not from the model (`core.policy` decides which case applies):

- a relevant passage found: the model writes a short lead-in with the passages in its
  prompt; any number, e-mail address or link in that lead-in that is not in the passages
  drops the lead-in; then the best passage is quoted verbatim and its source cited;
- nothing relevant (score under `CHATBOT_KB_MIN_SCORE`): the bot says it does not know and
  offers a person, with no generation at all;
- small talk (hello, thanks): the model answers, and a reply with any number or contact
  detail in it is replaced by a plain one;

With no knowledge base loaded the bot is a plain chat model (the foundation's behaviour).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.conversation import Message, Role
from core.knowledge.retrieval import Hit

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
QUOTE_INTRO = "Here's what our help centre says:"
MAX_PASSAGES_IN_PROMPT = 3
GROUNDED_MAX_NEW_TOKENS = 80


# Facts a reply must not invent: numbers (prices, times, phone numbers), e-mails, links.
_FACT = re.compile(
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|https?://\S+|www\.\S+|\d+(?:[.,:/-]\d+)*",
    re.IGNORECASE,
)


def invented_facts(text: str, sources: Sequence[str]) -> list[str]:
    """The facts (numbers, e-mails, links) in `text` that appear in none of `sources`."""
    haystack = re.sub(r"\s+", " ", " ".join(sources)).lower()
    missing = []
    for match in _FACT.finditer(text):
        fact = match.group(0).rstrip(".,:/-").lower()
        if fact and fact not in haystack:
            missing.append(fact)
    return missing


def retrieval_query(history: Sequence[Message]) -> list[str]:
    """The newest user message, and for a short follow-up also it with the previous one."""
    users = [m.text for m in history if m.role is Role.USER]
    if not users:
        return []
    queries = [users[-1]]
    if len(users) > 1 and len(users[-1].split()) < 6:
        queries.append(f"{users[-2]} {users[-1]}")
    return queries


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
