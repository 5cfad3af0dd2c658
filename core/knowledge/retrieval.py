"""Finding the passages that answer a question, and deciding whether any does.

A cosine threshold alone tells answerable questions from others poorly: a question that
names the company ("what is <Company>'s share price?") lands close to the knowledge base.
So each hit is also scored by how much of the question's vocabulary the passage shares,
each word weighted by its rarity in the knowledge base (IDF): the company's name is in every
document and counts for little, "share price" in none and counts for a lot.
`score = COSINE_WEIGHT * cosine + (1 - COSINE_WEIGHT) * overlap`; the threshold
(`CHATBOT_KB_MIN_SCORE`) and the weight were measured with `bench/evaluate_kb.py`.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.knowledge.documents import Passage
from core.knowledge.embeddings import Embedder, Vectors
from core.knowledge.store import KnowledgeBaseStore

COSINE_WEIGHT = 0.5

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STOPWORD_TEXT = """
    a about above after again all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself
    just me more most my myself no nor not of off on once only or other our ours out over own
    same she should so some such than that the their theirs them then there these they this
    those through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself hi hello hey please thanks thank tell know
    want need get got like can't don't i'm i've it's what's there's let me us one also"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def stem(word: str) -> str:
    word = word.split("'")[0]
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    return {stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1}


@dataclass(frozen=True)
class Hit:
    passage: Passage
    cosine: float
    overlap: float

    @property
    def score(self) -> float:
        return COSINE_WEIGHT * self.cosine + (1 - COSINE_WEIGHT) * self.overlap


class _Index:
    def __init__(self, version: int, passages: list[Passage], vectors: Vectors) -> None:
        self.version = version
        self.passages = passages
        self.vectors = vectors
        self.words = [content_words(p.embedding_text()) for p in passages]
        documents: dict[str, set[str]] = {}
        for passage, words in zip(passages, self.words, strict=True):
            documents.setdefault(passage.document, set()).update(words)
        frequency = Counter(w for words in documents.values() for w in words)
        self.n_documents = max(len(documents), 1)
        # No smoothing term: a word in every document (the company's name) weighs nothing.
        self.idf = {w: math.log((1 + self.n_documents) / (1 + df)) for w, df in frequency.items()}

    def weight(self, word: str) -> float:
        return self.idf.get(word, math.log(1 + self.n_documents))

    def overlap(self, query_words: set[str], index: int) -> float:
        if not query_words:
            return 0.0
        total = sum(self.weight(w) for w in query_words)
        if total <= 0:
            return 0.0
        shared = sum(self.weight(w) for w in query_words & self.words[index])
        return shared / total


class Retriever:
    """Searches a knowledge base; keeps each one's vectors in memory until its version moves."""

    def __init__(self, store: KnowledgeBaseStore, embedder: Embedder) -> None:
        self.store = store
        self.embedder = embedder
        self._indexes: dict[str, _Index] = {}
        self._loading = asyncio.Lock()

    async def _index(self, kb: str) -> _Index:
        version = await self.store.version(kb)
        index = self._indexes.get(kb)
        if index is None or index.version != version:
            async with self._loading:
                index = self._indexes.get(kb)
                if index is None or index.version != version:
                    index = _Index(*await self.store.load(kb))
                    self._indexes[kb] = index
        return index

    async def passage_count(self, kb: str) -> int:
        return len((await self._index(kb)).passages)

    async def search(self, kb: str, query: str, top_k: int = 3) -> list[Hit]:
        """The best `top_k` passages for `query`, best first (by `Hit.score`)."""
        index = await self._index(kb)
        if not index.passages or not query.strip():
            return []
        vector = (await self.embedder.embed([query]))[0]
        return rank(index, vector, content_words(query), top_k)

    async def search_many(self, kb: str, queries: Sequence[str], top_k: int = 3) -> list[list[Hit]]:
        index = await self._index(kb)
        if not index.passages or not queries:
            return [[] for _ in queries]
        vectors = await self.embedder.embed(list(queries))
        return [
            rank(index, vector, content_words(query), top_k)
            for query, vector in zip(queries, vectors, strict=True)
        ]


def rank(index: _Index, vector: Vectors, query_words: set[str], top_k: int) -> list[Hit]:
    cosines = index.vectors @ vector
    # Rescore the best few by cosine (cheap) with the lexical overlap.
    candidates = np.argsort(-cosines)[: max(top_k * 4, 12)]
    hits = [
        Hit(index.passages[i], float(cosines[i]), index.overlap(query_words, int(i)))
        for i in candidates
    ]
    hits.sort(key=lambda h: h.score, reverse=True)
    return hits[:top_k]
