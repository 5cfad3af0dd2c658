"""Knowledge bases: documents split into passages, embedded, stored in Redis, searched.

A knowledge base is a name (`default` unless a workspace picks another). Its documents come
from a folder: Markdown or text files (the first `# ` line is the title, `##` headings start
sections) and FAQ files (YAML or JSON: a list of `{question, answer}`; each entry is its own
passage, cited by its question).

Redis holds, per knowledge base (keys share one hash tag): a hash of documents (content
digest, title, passage ids), a hash of passages (text and vector) and a version counter.
Ingesting again is idempotent: unchanged files are skipped by digest, changed files replace
their passages, and files gone from the folder are removed. Workers keep the vectors in
memory and reload them when the version changes; a few thousand passages search in well
under a millisecond with one matrix product, so no vector index is needed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from core.knowledge.embeddings import DIMENSIONS, Embedder, Vectors
from core.errors import ChatbotError
from core.keys import Keys
from core.redis_conn import Redis

log = logging.getLogger(__name__)

DEFAULT_KB = "default"
TEXT_SUFFIXES = {".md", ".markdown", ".txt"}
FAQ_SUFFIXES = {".yaml", ".yml", ".json"}
PASSAGE_CHARS = 700  # paragraphs are grouped up to this size; a longer one stands alone
SPLITTER_VERSION = "1"  # part of the digest: a new splitter re-ingests everything
_KB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class KnowledgeBaseError(ChatbotError):
    """A document that cannot be read, or a malformed FAQ file."""


def check_kb_name(name: str) -> str:
    if not _KB_NAME.match(name):
        raise KnowledgeBaseError(
            f"knowledge base name {name!r} is not valid: use letters, digits, '.', '_' or '-'"
        )
    return name


@dataclass(frozen=True)
class Passage:
    id: str
    document: str  # document id: the file's path relative to the ingested folder
    title: str  # what a reply cites: the document title, or the FAQ question
    section: str
    text: str

    def embedding_text(self) -> str:
        heading = " — ".join(p for p in (self.title, self.section) if p)
        return f"{heading}\n{self.text}" if heading else self.text

    def to_record(self, vector: Vectors) -> str:
        data = {
            "document": self.document,
            "title": self.title,
            "section": self.section,
            "text": self.text,
            "vector": base64.b64encode(vector.astype(np.float32).tobytes()).decode(),
        }
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_record(cls, passage_id: str, raw: str) -> tuple[Passage, Vectors]:
        data = json.loads(raw)
        vector = np.frombuffer(base64.b64decode(data["vector"]), dtype=np.float32)
        passage = cls(passage_id, data["document"], data["title"], data["section"], data["text"])
        return passage, vector


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    digest: str
    passages: list[Passage]


# -- reading documents ----------------------------------------------------------------


def _passage_id(document: str, index: int) -> str:
    return f"{document}#{index}"


def _title_from_name(path: Path) -> str:
    return path.stem.replace("-", " ").replace("_", " ").strip().capitalize()


def _paragraph_groups(paragraphs: list[str]) -> Iterator[str]:
    group: list[str] = []
    size = 0
    for paragraph in paragraphs:
        if group and size + len(paragraph) > PASSAGE_CHARS:
            yield "\n\n".join(group)
            group, size = [], 0
        group.append(paragraph)
        size += len(paragraph) + 2
    if group:
        yield "\n\n".join(group)


def split_text_document(doc_id: str, text: str, fallback_title: str) -> tuple[str, list[Passage]]:
    """Title and passages of a Markdown/text document: sections by heading, paragraphs
    grouped up to `PASSAGE_CHARS`."""
    title = ""
    sections: list[tuple[str, list[str]]] = [("", [])]
    paragraph: list[str] = []
    in_code = False

    def end_paragraph() -> None:
        if paragraph:
            sections[-1][1].append("\n".join(paragraph).strip())
            paragraph.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_code = not in_code
        heading = re.match(r"^(#{1,6})\s+(.*?)\s*#*$", stripped) if not in_code else None
        if heading:
            end_paragraph()
            if len(heading.group(1)) == 1 and not title:
                title = heading.group(2)
            else:
                sections.append((heading.group(2), []))
        elif not stripped and not in_code:
            end_paragraph()
        else:
            paragraph.append(line.rstrip())
    end_paragraph()
    title = title or fallback_title
    passages: list[Passage] = []
    for section, paragraphs in sections:
        for chunk in _paragraph_groups([p for p in paragraphs if p]):
            passages.append(
                Passage(_passage_id(doc_id, len(passages)), doc_id, title, section, chunk)
            )
    return title, passages


def split_faq_document(doc_id: str, raw: str, where: str) -> tuple[str, list[Passage]]:
    """Passages of a FAQ file: one per `{question, answer}` entry, cited by its question."""
    try:
        data: Any = yaml.safe_load(raw)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise KnowledgeBaseError(f"{where}: not valid YAML/JSON: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("faq", data.get("questions"))
    if not isinstance(data, list):
        raise KnowledgeBaseError(
            f"{where}: a FAQ file must hold a list of {{question, answer}} entries"
        )
    passages = []
    for number, entry in enumerate(data, start=1):
        if not isinstance(entry, dict) or not {"question", "answer"} <= entry.keys():
            raise KnowledgeBaseError(
                f"{where}: entry {number} needs both 'question' and 'answer' (got {entry!r:.80})"
            )
        question, answer = str(entry["question"]).strip(), str(entry["answer"]).strip()
        if not question or not answer:
            raise KnowledgeBaseError(f"{where}: entry {number} has an empty question or answer")
        passages.append(Passage(_passage_id(doc_id, number - 1), doc_id, question, "", answer))
    return "FAQ", passages


def read_documents(folder: Path) -> Iterator[Document]:
    """The documents under `folder` (or the one file `folder` names), sorted by path."""
    if folder.is_file():
        files, root = [folder], folder.parent
    elif folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        root = folder
    else:
        raise KnowledgeBaseError(f"{folder} does not exist")
    for path in files:
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES | FAQ_SUFFIXES or path.name.startswith("."):
            continue
        doc_id = path.relative_to(root).as_posix()
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KnowledgeBaseError(f"cannot read {path}: {exc}") from exc
        if suffix in FAQ_SUFFIXES:
            title, passages = split_faq_document(doc_id, raw, str(path))
        else:
            title, passages = split_text_document(doc_id, raw, _title_from_name(path))
        digest = hashlib.sha256(f"{SPLITTER_VERSION}\0{doc_id}\0{raw}".encode()).hexdigest()
        if passages:
            yield Document(doc_id, title, digest, passages)
        else:
            log.warning("%s has no text: skipped", path)


# -- storing ------------------------------------------------------------------------------


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
            vectors = await embedder.embed([p.embedding_text() for p in document.passages])
            if progress:
                progress(len(document.passages))
            await self._replace(kb, document, vectors, before, origin)
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
                    p.id: p.to_record(v) for p, v in zip(document.passages, vectors, strict=True)
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
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(k.kb_documents(kb), k.kb_passages(kb))
            pipe.incr(k.kb_version(kb))
            pipe.srem(k.knowledge_bases, kb)
            results = await pipe.execute()
        return bool(results[-1])

    async def load(self, kb: str) -> tuple[int, list[Passage], Vectors]:
        """Version, passages and their vectors (one row each), read consistently."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(k.kb_version(kb))
            pipe.hgetall(k.kb_passages(kb))
            version, raw = await pipe.execute()
        passages, vectors = [], []
        for passage_id in sorted(raw):
            passage, vector = Passage.from_record(passage_id, raw[passage_id])
            if vector.shape != (DIMENSIONS,):
                log.error("passage %s of %s has a bad vector; skipped", passage_id, kb)
                continue
            passages.append(passage)
            vectors.append(vector)
        matrix = np.stack(vectors) if vectors else np.zeros((0, DIMENSIONS), dtype=np.float32)
        return int(version or 0), passages, matrix
