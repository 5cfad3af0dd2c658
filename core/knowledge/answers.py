"""Knowledge-base answers a support team can trust: sentences quoted from the passages,
inside a few fixed frames that state no fact.

A 135M model paraphrases policy unreliably (it wrote "No, you don't need permission" above
a passage saying that you do), so no sentence of a knowledge-base answer is the model's:

- `choose_sentences` picks the one to three sentences that answer the question, across the
  best passages (the answer is often in the second one, or needs a sentence from each),
  within `WORD_BUDGET` words;
- `answerable` decides whether the knowledge base answers at all: the best passage's score,
  less what the question asks about that the knowledge base never mentions
  (`Search.unknown_share`); below the line the bot says it does not know and offers a
  person;
- `compose_answer` frames the sentences and cites their documents (title › section).

Every text here is fixed and fact-free; `core.knowledge.verify` checks anything a model
writes before a customer sees it. The weights and thresholds were chosen with
`bench/evaluate_kb.py` on the tuning company (examples/kb) only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from core.conversation import Message, Role
from core.knowledge.retrieval import Hit, Index, Retriever, Search, content_words
from core.knowledge.sentences import split_sentences
from core.knowledge.verify import invented_facts

DECLINE_TEXT = (
    "I'm sorry, I couldn't find anything about that in our help centre, and I'd rather not "
    "guess. Would you like me to bring in a person from our support team? Just say "
    '"talk to a person".'
)
FRUSTRATION_OFFER = (
    'If this doesn\'t solve it, I can bring in a person from our team: just say "talk to a person".'
)
QUOTE_INTRO = "Here's what our help centre says:"
GREETING_TEXT = "Hello! I'm the support assistant. What can I help you with today?"
THANKS_TEXT = "You're welcome! Is there anything else I can help you with?"
GOODBYE_TEXT = "Goodbye, and thanks for getting in touch!"
NO_DOCUMENTS_TEXT = (
    "I'm the support assistant, but no help-centre documents are loaded yet, so I can't "
    "answer questions about products, orders or accounts without guessing, and I'd rather "
    'not. I can bring in a person from our support team: just say "talk to a person".'
)
SMALL_TALK_FALLBACK = "Happy to help! What can I do for you today?"
FRAMES = (
    QUOTE_INTRO,
    DECLINE_TEXT,
    FRUSTRATION_OFFER,
    GREETING_TEXT,
    THANKS_TEXT,
    GOODBYE_TEXT,
    NO_DOCUMENTS_TEXT,
    SMALL_TALK_FALLBACK,
)

TOP_PASSAGES = 2  # sentences are chosen from this many passages
WORD_BUDGET = 35  # words of quoted sentences, beyond the best one
# Three, not two: on the tuning set a third sentence answered 12.5 points more follow-ups
# with the same facts share, and the median answer stayed under 60 words (56.5).
MAX_SENTENCES = 3
# Sentence score: its cosine with the question, its share of the question's vocabulary
# (with its passage's heading), and its passage's score.
SENTENCE_COSINE_WEIGHT = 1.0
SENTENCE_LEXICAL_WEIGHT = 1.0
SENTENCE_PASSAGE_WEIGHT = 2.0
COMPANION_MIN = 0.6  # a second sentence scores at least this share of the best one
REPEAT_SHARE = 0.8  # a sentence sharing this much of a chosen one's words repeats it
# Answerable when best passage score - UNKNOWN_PENALTY * unknown share >= min_score
# (CHATBOT_KB_MIN_SCORE, default 0.3).
UNKNOWN_PENALTY = 0.6


@dataclass(frozen=True)
class Quoted:
    hit: Hit
    position: int  # index into hit.passage.sentences
    score: float

    @property
    def text(self) -> str:
        return self.hit.passage.sentences[self.position]


@dataclass(frozen=True)
class Answer:
    text: str
    sources: list[str]  # what it cites, best first


_FOLLOW_UP = re.compile(
    r"^\W*(?:and|also|so|but|plus|then|what\s+about|how\s+about|what\s+if|ok(?:ay)?)\b"
    r"|\b(?:that|this|it|those|these|them|there|one)\b",
    re.IGNORECASE,
)
FOLLOW_UP_MAX_WORDS = 8
MAX_PARTS = 6  # sentences of a long message searched on their own


def retrieval_query(history: Sequence[Message]) -> list[str]:
    """The newest user message, and for a short follow-up also it with the previous one."""
    users = [m.text for m in history if m.role is Role.USER]
    if not users:
        return []
    queries = [users[-1]]
    if len(users) > 1 and len(users[-1].split()) < FOLLOW_UP_MAX_WORDS:
        queries.append(f"{users[-2]} {users[-1]}")
    return queries


def is_follow_up(text: str) -> bool:
    """A short message that leans on the one before ("and how much is that?")."""
    return len(text.split()) < FOLLOW_UP_MAX_WORDS and bool(_FOLLOW_UP.search(text))


def question_parts(text: str) -> list[str]:
    """The sentences of a message of several ("My sister moved to London. Can I send her a
    jacket?"), each able to show that the knowledge base answers it; none for one sentence."""
    parts = [p for p in split_sentences(text) if len(content_words(p)) >= 2]
    # The question is usually at the end; a long message costs a few searches, not hundreds.
    return parts[-MAX_PARTS:] if len(parts) > 1 else []


def pick_search(searches: Sequence[Search], min_score: float) -> tuple[Search, Search | None]:
    """The search to answer from, and for a follow-up the newest message's own search (its
    words choose the sentences; the conversation's topic chooses the passages)."""
    alone = searches[0]
    if len(searches) < 2:
        return alone, None
    together = searches[1]
    if is_follow_up(alone.query.text) and answerable(together, min_score):
        return together, alone
    best = max(searches, key=lambda s: answer_margin(s, min_score))
    return best, (alone if best is together else None)


@dataclass(frozen=True)
class Found:
    """What the knowledge base has for a question: the search answered from, and the
    answer (None: it does not answer, so the bot declines)."""

    search: Search
    answer: Answer | None


async def find_answer(
    retriever: Retriever, kb: str, queries: Sequence[str], min_score: float
) -> Found:
    """The one decision, for the worker and for `chatbot kb search`: `queries` as
    `retrieval_query` makes them. The whole message (or, for a follow-up, with the one
    before) finds the passages; a long message that falls short is answered when the
    knowledge base answers one of its sentences (searched only then)."""
    searches = await retriever.search_many(kb, queries, TOP_PASSAGES)
    search, focus = pick_search(searches, min_score)
    if not answerable(search, min_score):
        parts = question_parts(queries[0])
        found = await retriever.search_many(kb, parts, TOP_PASSAGES) if parts else []
        if not any(answerable(part, min_score) for part in found):
            return Found(search, None)
    index = await retriever.index(kb)
    return Found(search, compose_answer(choose_sentences(index, search, focus)))


def answer_margin(search: Search, min_score: float) -> float:
    """How far above the line of `answerable` a search is (negative: below)."""
    return search.best - UNKNOWN_PENALTY * search.unknown_share - min_score


def answerable(search: Search, min_score: float) -> bool:
    return bool(search.hits) and answer_margin(search, min_score) >= 0


def choose_sentences(index: Index, search: Search, focus: Search | None = None) -> list[Quoted]:
    """The sentences that answer, passage by passage (the best sentence's first). `focus`:
    a follow-up's own search, whose words and meaning weigh as much as the whole topic's."""
    words = search.query.words
    scored = []
    for hit in search.hits[:TOP_PASSAGES]:
        heading = content_words(f"{hit.passage.title} {hit.passage.section}")
        focused = _focus_cosines(index, hit, focus)
        for position, sentence in enumerate(hit.passage.sentences):
            sentence_words = content_words(sentence) | heading
            lexical = index.share(words, sentence_words)
            cosine = hit.sentence_cosines[position] if hit.sentence_cosines else hit.cosine
            if focus is not None and focused is not None:
                lexical = (lexical + index.share(focus.query.words, sentence_words)) / 2
                cosine = (cosine + focused[position]) / 2
            score = (
                SENTENCE_COSINE_WEIGHT * cosine
                + SENTENCE_LEXICAL_WEIGHT * lexical
                + SENTENCE_PASSAGE_WEIGHT * hit.score
            )
            scored.append(Quoted(hit, position, score))
    if not scored:
        return []
    scored.sort(key=lambda q: q.score, reverse=True)
    best = scored[0]
    chosen = [best]
    used = 0
    for candidate in scored[1:]:
        if len(chosen) >= MAX_SENTENCES or candidate.score < COMPANION_MIN * best.score:
            break
        size = len(candidate.text.split())
        if used + size > WORD_BUDGET or any(_repeats(candidate, q) for q in chosen):
            continue
        chosen.append(candidate)
        used += size
    # The best sentence's passage first, then the others; each passage's in reading order.
    rank = {id(hit): n + 1 for n, hit in enumerate(search.hits)}
    rank[id(best.hit)] = 0
    chosen.sort(key=lambda q: (rank[id(q.hit)], q.position))
    return chosen


def _repeats(candidate: Quoted, chosen: Quoted) -> bool:
    """Whether `candidate` says what `chosen` says (a FAQ answer copying a policy page)."""
    mine, theirs = content_words(candidate.text), content_words(chosen.text)
    if not mine or not theirs:
        return False
    return len(mine & theirs) >= REPEAT_SHARE * min(len(mine), len(theirs))


def _focus_cosines(index: Index, hit: Hit, focus: Search | None) -> list[float] | None:
    if focus is None or focus.vector is None:
        return None
    vectors = index.passage_sentence_vectors(hit.passage)
    if vectors is None:
        return None
    return [float(c) for c in vectors @ focus.vector]


def source_label(hit: Hit) -> str:
    passage = hit.passage
    return f"{passage.title} › {passage.section}" if passage.section else passage.title


def compose_answer(quoted: Sequence[Quoted]) -> Answer:
    """The frame, the quoted sentences (a quote block per passage, "…" where sentences are
    skipped) and the sources, the best sentence's first."""
    blocks: list[str] = []
    sources: list[str] = []
    previous: Quoted | None = None
    for q in quoted:
        if previous is not None and previous.hit is q.hit:
            gap = " … " if q.position != previous.position + 1 else " "
            blocks[-1] += gap + q.text
        else:
            blocks.append(q.text)
            label = source_label(q.hit)
            if label not in sources:
                sources.append(label)
        previous = q
    best = max(quoted, key=lambda q: q.score)
    first = source_label(best.hit)
    sources.remove(first)
    sources.insert(0, first)
    quote = "\n>\n".join(f"> {block}" for block in blocks)
    cite = f"Source: {sources[0]}" if len(sources) == 1 else "Sources: " + "; ".join(sources)
    return Answer(f"{QUOTE_INTRO}\n\n{quote}\n\n{cite}", sources)


def compose_chat(generated: str, *, knowledge: bool) -> str:
    """A free-chat reply (a team's own persona): with a knowledge base loaded, no fact may
    come from the model, so the reply ends before the first sentence that states one (and
    is a fixed reply if that is the first)."""
    text = generated.strip()
    if knowledge:
        text = _before_first_fact(text)
    return text or SMALL_TALK_FALLBACK


def chat_so_far(generated: str, *, knowledge: bool) -> str:
    """What may be shown of a free-chat reply still being generated: never more than the
    final reply (`compose_chat`) will start with. With a knowledge base loaded, whole
    sentences that state no fact; otherwise whole words."""
    text = generated.lstrip()
    if knowledge:
        # A sentence is whole once something follows its full stop ("2." may become "2.5").
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        return _before_first_fact(text[: ends[-1]]) if ends else ""
    cut = max(text.rfind(" "), text.rfind("\n"))
    return text[:cut].rstrip() if cut > 0 else ""


_SENTENCE_END = re.compile(r"[.!?…](?=\s)")


def _before_first_fact(text: str) -> str:
    """`text` up to the first sentence with a fact (a number, an address) of its own."""
    kept = 0
    for match in re.finditer(r".*?(?:[.!?…](?=\s|$)|$)", text, re.DOTALL):
        sentence = match.group(0)
        if not sentence:
            break
        if invented_facts(sentence, []):
            break
        kept = match.end()
    return text[:kept].strip()
