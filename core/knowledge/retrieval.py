"""Finding the passages that answer a question, and what of the question the knowledge base
does not cover.

Each passage is scored three ways, each measured with `bench/evaluate_kb.py` on the tuning
company (examples/kb; the held-out company is only reported on):

- the cosine between the question and the passage (heading and text), which finds the topic;
- the best cosine between the question and one of the passage's sentences, which finds the
  passage holding the one sentence that answers (a long passage dilutes its own vector);
- the lexical overlap: the share of the question's vocabulary the passage shares, each word
  weighted by its rarity in the knowledge base (IDF), so the company's name, which is in
  every document, counts for nothing and "share price", in none, counts for a lot.

`score = (PASSAGE_WEIGHT * cosine + SENTENCE_WEIGHT * best sentence + LEXICAL_WEIGHT *
overlap) / sum of the weights`. Misspelt question words ("pasword") are corrected to a
knowledge-base word one edit away; the words that stay unknown are reported
(`Search.missing_share`): a question about "pensioners" to a knowledge base that never
mentions them is not answered by its passage about students.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from core.knowledge.documents import Passage
from core.knowledge.embeddings import DIMENSIONS, Embedder, Vectors
from core.knowledge.store import KnowledgeBaseStore

log = logging.getLogger(__name__)

PASSAGE_WEIGHT = 0.5
SENTENCE_WEIGHT = 0.5
LEXICAL_WEIGHT = 0.25
CANDIDATES = 50  # passages rescored lexically, the best by cosine
MAX_QUERY_WORDS = 64  # content words of a question that count (a pasted essay is not a query)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Function words, and the filler of chat messages ("u", "pls", "guys", "actually"), which
# say nothing about what is asked.
_STOPWORD_TEXT = """
    a about above after again all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself
    just me more most my myself no nor not of off on once only or other our ours out over own
    same she should so some such than that the their theirs them then there these they this
    those through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself hi hello hey please thanks thank tell know
    want need get got like can't don't i'm i've it's what's there's let me us one also
    u ur ya yo pls plz thx ty ok okay yes yeah yep nope im ive dont cant wont didnt doesnt
    isnt arent wasnt wouldnt couldnt shouldnt whats wanna gonna gotta kinda guys guy folks
    stuff thing things something anything someone anyone somebody anybody actually really
    basically literally still anyway even ever much many lot lots bit maybe probably sure
    possible way able make made go going said say says asking ask question help hiya btw
    lol omg idk thing hmm um uh ah oh hes shes theyre youre well now today again soon always
    never already yet else instead though although however since"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def stem(word: str) -> str:
    word = word.split("'")[0]
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    return {stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1}


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


@dataclass(frozen=True)
class Query:
    text: str
    words: frozenset[str]  # content words, misspellings corrected to knowledge-base words
    missing: frozenset[str]  # content words the knowledge base never uses
    spelled: tuple[tuple[str, str], ...] = ()  # (stem, the word as typed) of `missing`


def surface_words(text: str) -> dict[str, str]:
    """Each content word's stem and the word as written (the first time)."""
    found: dict[str, str] = {}
    for word in _WORD.findall(text.lower()):
        if word not in STOPWORDS and len(word) > 1:
            found.setdefault(stem(word), word.split("'")[0])
    return found


def index_vocabulary(passages: Iterable[Passage]) -> list[str]:
    """Every content word the passages use, as written: what `Index` measures an unknown
    question word's nearness against."""
    return sorted({w for p in passages for w in surface_words(p.embedding_text()).values()})


@dataclass(frozen=True)
class Hit:
    passage: Passage
    cosine: float
    sentence_cosines: tuple[float, ...]  # one per `passage.sentences`
    overlap: float

    @property
    def best_sentence(self) -> float:
        return max(self.sentence_cosines, default=self.cosine)

    @property
    def score(self) -> float:
        total = PASSAGE_WEIGHT + SENTENCE_WEIGHT + LEXICAL_WEIGHT
        return (
            PASSAGE_WEIGHT * self.cosine
            + SENTENCE_WEIGHT * self.best_sentence
            + LEXICAL_WEIGHT * self.overlap
        ) / total


@dataclass(frozen=True)
class Search:
    query: Query
    hits: list[Hit]  # best first
    # The share of the question's weight on words the knowledge base lacks, each counted by
    # how far it is in meaning from the nearest word it has ("toronto" is near "canada" and
    # counts little; "ceo" is near nothing and counts fully).
    unknown_share: float
    vector: Vectors | None = None  # the question's embedding

    @property
    def best(self) -> float:
        return self.hits[0].score if self.hits else 0.0


class Index:
    """One version of a knowledge base, in memory: vectors, vocabulary and word weights."""

    def __init__(
        self,
        version: int,
        passages: list[Passage],
        vectors: Vectors,
        sentence_vectors: Sequence[Vectors],
        vocabulary: Sequence[str] = (),
        vocabulary_vectors: Vectors | None = None,
    ) -> None:
        self.version = version
        self.passages = passages
        self.vectors = vectors
        counts = [len(v) for v in sentence_vectors]
        self.sentence_matrix = (
            np.concatenate(list(sentence_vectors)).astype(np.float32)
            if sum(counts)
            else np.zeros((0, DIMENSIONS), dtype=np.float32)
        )
        self.sentence_start = np.cumsum([0, *counts])
        self._position = {p.id: i for i, p in enumerate(passages)}
        self.words = [content_words(p.embedding_text()) for p in passages]
        self.sentence_words = [[content_words(s) for s in p.sentences] for p in passages]
        documents: dict[str, set[str]] = {}
        for passage, words in zip(passages, self.words, strict=True):
            documents.setdefault(passage.document, set()).update(words)
        frequency = Counter(w for words in documents.values() for w in words)
        self.n_documents = max(len(documents), 1)
        # No smoothing term: a word in every document (the company's name) weighs nothing.
        self.idf = {w: math.log((1 + self.n_documents) / (1 + df)) for w, df in frequency.items()}
        self.vocabulary = list(vocabulary)
        self.vocabulary_vectors = vocabulary_vectors
        self._near: dict[str, set[str]] = {}
        for word in frequency:
            if len(word) >= 4:
                for key in _deletions(word) | {word}:
                    self._near.setdefault(key, set()).add(word)

    def weight(self, word: str) -> float:
        return self.idf.get(word, math.log(1 + self.n_documents))

    def correct(self, word: str) -> str | None:
        """`word` if the knowledge base uses it, else its one known word one edit away."""
        if word in self.idf:
            return word
        if len(word) < 4:
            return None
        found: set[str] = set(self._near.get(word, ()))
        for key in _deletions(word):
            found |= self._near.get(key, set())
        if len(found) == 1:
            return found.pop()
        return None  # unknown, or ambiguous: better left unmatched than guessed

    def query(self, text: str) -> Query:
        words, missing, spelled = set(), set(), []
        for word, written in list(surface_words(text).items())[:MAX_QUERY_WORDS]:
            known = self.correct(word)
            if known is None and any(c.isdigit() for c in word):
                continue  # an amount or a date of the customer's ("$88"), not a topic
            if known is None:
                missing.add(word)
                words.add(word)
                spelled.append((word, written))
            else:
                words.add(known)
        return Query(text, frozenset(words), frozenset(missing), tuple(spelled))

    def unknown_share(self, query: Query, unknown_vectors: Vectors | None) -> float:
        """See `Search.unknown_share`; `unknown_vectors`: one row per `query.spelled`."""
        total = sum(self.weight(w) for w in query.words)
        if total <= 0:
            return 1.0
        if not query.spelled:
            return 0.0
        if unknown_vectors is None or self.vocabulary_vectors is None:
            nearness = [0.0] * len(query.spelled)
        else:
            nearness = [float(n) for n in (unknown_vectors @ self.vocabulary_vectors.T).max(1)]
        far = sum(
            self.weight(word) * (1.0 - max(near, 0.0))
            for (word, _), near in zip(query.spelled, nearness, strict=True)
        )
        return far / total

    def share(self, query_words: Iterable[str], covered: set[str]) -> float:
        """The share of the question's weight on words that `covered` contains."""
        words = set(query_words)
        total = sum(self.weight(w) for w in words)
        if total <= 0:
            return 0.0
        return sum(self.weight(w) for w in words & covered) / total

    def passage_sentence_vectors(self, passage: Passage) -> Vectors | None:
        position = self._position.get(passage.id)
        if position is None:
            return None
        start, end = self.sentence_start[position], self.sentence_start[position + 1]
        vectors: Vectors = self.sentence_matrix[start:end]
        return vectors

    def sentence_cosines(self, vector: Vectors) -> Vectors:
        if not len(self.sentence_matrix):
            return np.zeros(0, dtype=np.float32)
        result: Vectors = self.sentence_matrix @ vector
        return result

    def rank(self, query: Query, vector: Vectors, top_k: int) -> list[Hit]:
        if not self.passages:
            return []
        cosines = self.vectors @ vector
        sentences = self.sentence_cosines(vector)
        starts, ends = self.sentence_start[:-1], self.sentence_start[1:]
        # Each passage's best sentence, in one pass over every sentence (its own cosine for a
        # passage without sentences); Python objects only for the candidates.
        best_sentence = cosines.copy()
        filled = ends > starts
        if sentences.size and filled.any():
            best_sentence[filled] = np.maximum.reduceat(sentences, starts[filled])
        dense = PASSAGE_WEIGHT * cosines + SENTENCE_WEIGHT * best_sentence
        hits = [
            Hit(
                self.passages[i],
                float(cosines[i]),
                tuple(float(c) for c in sentences[starts[i] : ends[i]]),
                self.share(query.words, self.words[i]),
            )
            for i in np.argsort(-dense)[: max(top_k, CANDIDATES)]
        ]
        hits.sort(key=lambda h: h.score, reverse=True)
        return hits[:top_k]


class Retriever:
    """Searches a knowledge base; keeps each one's vectors in memory until its version moves."""

    def __init__(self, store: KnowledgeBaseStore, embedder: Embedder) -> None:
        self.store = store
        self.embedder = embedder
        self._indexes: dict[str, Index] = {}
        self._loading = asyncio.Lock()

    async def index(self, kb: str) -> Index:
        version = await self.store.version(kb)
        index = self._indexes.get(kb)
        if index is None or index.version != version:
            async with self._loading:
                index = self._indexes.get(kb)
                if index is None or index.version != version:
                    index = await self._load(kb)
                    self._indexes[kb] = index
        return index

    async def _load(self, kb: str) -> Index:
        version, passages, vectors, sentence_vectors = await self.store.load(kb)
        stale = [i for i, v in enumerate(sentence_vectors) if v is None]
        if stale:
            log.warning(
                "%d passages of %s were ingested without sentence vectors: embedding them now "
                "(run `chatbot kb ingest` again to store them)",
                len(stale),
                kb,
            )
            texts = [s for i in stale for s in passages[i].sentences]
            embedded = await self.embedder.embed(texts)
            start = 0
            for i in stale:
                n = len(passages[i].sentences)
                sentence_vectors[i] = embedded[start : start + n]
                start += n
        complete = [
            v if v is not None else np.zeros((0, DIMENSIONS), np.float32) for v in sentence_vectors
        ]
        # Every word the knowledge base uses, embedded once per version (a few thousand
        # words take about a second): how near an unknown question word is to them.
        vocabulary = index_vocabulary(passages)
        vocabulary_vectors = await self.embedder.embed(vocabulary) if vocabulary else None
        return Index(version, passages, vectors, complete, vocabulary, vocabulary_vectors)

    async def passage_count(self, kb: str) -> int:
        return len((await self.index(kb)).passages)

    async def search(self, kb: str, query: str, top_k: int = 3) -> list[Hit]:
        """The best `top_k` passages for `query`, best first (by `Hit.score`)."""
        [found] = await self.search_many(kb, [query], top_k)
        return found.hits

    async def search_many(self, kb: str, queries: Sequence[str], top_k: int = 3) -> list[Search]:
        index = await self.index(kb)
        texts = [q for q in queries if q.strip()]
        if not index.passages or not texts:
            return [Search(Query(q, frozenset(), frozenset()), [], 1.0) for q in queries]
        parsed = [index.query(text) for text in texts]
        unknown = [written for query in parsed for _, written in query.spelled]
        vectors = await self.embedder.embed(texts + unknown)
        found, start = {}, len(texts)
        for text, query, vector in zip(texts, parsed, vectors, strict=False):
            unknown_vectors = vectors[start : start + len(query.spelled)]
            start += len(query.spelled)
            found[text] = Search(
                query,
                index.rank(query, vector, top_k),
                index.unknown_share(query, unknown_vectors),
                vector,
            )
        return [
            found.get(q) or Search(Query(q, frozenset(), frozenset()), [], 1.0) for q in queries
        ]
