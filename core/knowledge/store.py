"""Knowledge bases in Redis: passages with their vectors, ingested from documents.

A knowledge base is a name (`default` unless a workspace picks another). Redis holds, per
knowledge base (keys share one hash tag): a hash of documents (content digest, title,
passage ids), a hash of passages (text and vector) and a version counter. Ingesting again
is idempotent: unchanged files are skipped by digest, changed files replace their passages,
and files gone from the folder are removed. Workers keep the vectors in memory and reload
them when the version changes; a few thousand passages search in well under a millisecond
with one matrix product, so no vector index is needed.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.keys import Keys
from core.knowledge.documents import (
    DEFAULT_KB,
    Document,
    KnowledgeBaseError,
    Passage,
    check_kb_name,
    read_documents,
)
from core.knowledge.embeddings import DIMENSIONS, Embedder, Vectors
from core.redis_conn import Redis

__all__ = [
    "DEFAULT_KB",
    "KnowledgeBaseError",
    "KnowledgeBaseStore",
    "check_kb_name",
    "read_documents",
]

log = logging.getLogger(__name__)


def _encode(vectors: Vectors) -> str:
    return base64.b64encode(vectors.astype(np.float32).tobytes()).decode()


def passage_record(passage: Passage, vector: Vectors, sentence_vectors: Vectors) -> str:
    data = {
        "document": passage.document,
        "title": passage.title,
        "section": passage.section,
        "text": passage.text,
        "vector": _encode(vector),
        "sentence_vectors": _encode(sentence_vectors),  # one row per `passage.sentences`
    }
    return json.dumps(data, ensure_ascii=False)


def read_passage_record(passage_id: str, raw: str) -> tuple[Passage, Vectors, Vectors | None]:
    """The passage, its vector and its sentences' vectors (None when it was ingested by a
    version that did not store them, or they do not match its sentences)."""
    data = json.loads(raw)
    vector = np.frombuffer(base64.b64decode(data["vector"]), dtype=np.float32)
    passage = Passage(passage_id, data["document"], data["title"], data["section"], data["text"])
    sentence_vectors = None
    if "sentence_vectors" in data:
        flat = np.frombuffer(base64.b64decode(data["sentence_vectors"]), dtype=np.float32)
        if flat.size == len(passage.sentences) * DIMENSIONS:
            sentence_vectors = flat.reshape(len(passage.sentences), DIMENSIONS)
    return passage, vector, sentence_vectors


async def embed_passages(
    embedder: Embedder, passages: list[Passage]
) -> tuple[Vectors, list[Vectors]]:
    """Each passage's vector (of its heading and text) and its sentences' vectors."""
    texts = [p.embedding_text() for p in passages]
    sentences = [s for p in passages for s in p.sentences]
    vectors = await embedder.embed(texts + sentences)
    per_passage, start = [], len(passages)
    for passage in passages:
        per_passage.append(vectors[start : start + len(passage.sentences)])
        start += len(passage.sentences)
    return vectors[: len(passages)], per_passage


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    passages: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.removed)} removed; "
            f"{self.passages} passages embedded"
        )


Progress = Callable[[int], None]  # called with the number of passages just embedded


class KnowledgeBaseStore:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def names(self) -> list[str]:
        return sorted(str(n) for n in await self.redis.smembers(self.keys.knowledge_bases))

    async def documents(self, kb: str) -> dict[str, dict[str, Any]]:
        raw = await self.redis.hgetall(self.keys.kb_documents(kb))
        return {str(doc_id): json.loads(meta) for doc_id, meta in raw.items()}

    async def version(self, kb: str) -> int:
        return int(await self.redis.get(self.keys.kb_version(kb)) or 0)

    async def ingest(
        self,
        kb: str,
        folder: Path,
        embedder: Embedder,
        *,
        prune: bool = True,
        progress: Progress | None = None,
        documents: list[Document] | None = None,
    ) -> IngestReport:
        """Bring knowledge base `kb` in line with `folder`: see the module docstring.
        `documents`: the folder's documents when the caller has read them already."""
        check_kb_name(kb)
        if documents is None:
            documents = list(read_documents(folder))
        existing = await self.documents(kb)
        origin = str(folder.resolve())
        report = IngestReport()
        for document in documents:
            before = existing.get(document.id)
            if before and before.get("digest") == document.digest:
                report.unchanged.append(document.id)
                continue
            vectors, sentence_vectors = await embed_passages(embedder, document.passages)
            if progress:
                progress(len(document.passages))
            await self._replace(kb, document, vectors, sentence_vectors, before, origin)
            (report.updated if before else report.added).append(document.id)
            report.passages += len(document.passages)
        if prune:
            present = {d.id for d in documents}
            for doc_id, meta in existing.items():
                if meta.get("origin") == origin and doc_id not in present:
                    await self.remove_document(kb, doc_id)
                    report.removed.append(doc_id)
        await self.redis.sadd(self.keys.knowledge_bases, kb)
        return report

    async def _replace(
        self,
        kb: str,
        document: Document,
        vectors: Vectors,
        sentence_vectors: list[Vectors],
        before: dict[str, Any] | None,
        origin: str,
    ) -> None:
        k = self.keys
        passage_ids = [p.id for p in document.passages]
        meta = {
            "title": document.title,
            "digest": document.digest,
            "passages": passage_ids,
            "origin": origin,
            "ingested_at": time.time(),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            old: set[str] = set(before.get("passages", [])) if before else set()
            stale = old - set(passage_ids)
            if stale:
                pipe.hdel(k.kb_passages(kb), *stale)
            pipe.hset(
                k.kb_passages(kb),
                mapping={
                    p.id: passage_record(p, v, sv)
                    for p, v, sv in zip(document.passages, vectors, sentence_vectors, strict=True)
                },
            )
            pipe.hset(k.kb_documents(kb), document.id, json.dumps(meta, ensure_ascii=False))
            pipe.incr(k.kb_version(kb))
            await pipe.execute()

    async def remove_document(self, kb: str, doc_id: str) -> bool:
        k = self.keys
        raw = await self.redis.hget(k.kb_documents(kb), doc_id)
        if raw is None:
            return False
        passages = json.loads(raw).get("passages", [])
        async with self.redis.pipeline(transaction=True) as pipe:
            if passages:
                pipe.hdel(k.kb_passages(kb), *passages)
            pipe.hdel(k.kb_documents(kb), doc_id)
            pipe.incr(k.kb_version(kb))
            await pipe.execute()
        return True

    async def remove(self, kb: str) -> bool:
        """Delete a whole knowledge base; its version moves on so workers drop their copy."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:  # all in the `{kb}` slot
            pipe.delete(k.kb_documents(kb), k.kb_passages(kb))
            pipe.incr(k.kb_version(kb))
            await pipe.execute()
        # The list of names is in a slot of its own (Redis Cluster): removed after.
        return bool(await self.redis.srem(k.knowledge_bases, kb))

    async def load(self, kb: str) -> tuple[int, list[Passage], Vectors, list[Vectors | None]]:
        """Version, passages, their vectors (one row each) and their sentences' vectors
        (None for a passage stored without them), read consistently."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(k.kb_version(kb))
            pipe.hgetall(k.kb_passages(kb))
            version, raw = await pipe.execute()
        passages, vectors, sentence_vectors = [], [], []
        for passage_id in sorted(raw):
            try:
                passage, vector, sentences = read_passage_record(passage_id, raw[passage_id])
            except (ValueError, KeyError, TypeError) as exc:
                log.error("passage %s of %s is corrupt (%s); skipped", passage_id, kb, exc)
                continue
            if vector.shape != (DIMENSIONS,):
                log.error("passage %s of %s has a bad vector; skipped", passage_id, kb)
                continue
            passages.append(passage)
            vectors.append(vector)
            sentence_vectors.append(sentences)
        matrix = np.stack(vectors) if vectors else np.zeros((0, DIMENSIONS), dtype=np.float32)
        return int(version or 0), passages, matrix, sentence_vectors
