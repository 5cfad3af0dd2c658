"""Knowledge-base documents: reading a folder and splitting its files into passages.

Markdown or text files (the first `# ` line is the title, `##` headings start sections)
and FAQ files (YAML or JSON: a list of `{question, answer}`; each entry is its own passage,
cited by its question). Nothing here needs the embedding model or Redis.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.errors import ChatbotError
from core.knowledge.sentences import split_sentences

log = logging.getLogger(__name__)

DEFAULT_KB = "default"
TEXT_SUFFIXES = {".md", ".markdown", ".txt"}
FAQ_SUFFIXES = {".yaml", ".yml", ".json"}
PASSAGE_CHARS = 700  # paragraphs are grouped up to this size; a longer one stands alone
SPLITTER_VERSION = "2"  # 2: sentence vectors stored with each passage
MAX_FILE_BYTES = 5_000_000
MAX_FILES = 10_000  # part of the digest: a new splitter re-ingests everything
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

    @functools.cached_property
    def sentences(self) -> list[str]:
        """What an answer quotes: `split_sentences(text)`, in order."""
        return split_sentences(self.text)

    def embedding_text(self) -> str:
        heading = " — ".join(p for p in (self.title, self.section) if p)
        return f"{heading}\n{self.text}" if heading else self.text


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    digest: str
    passages: list[Passage]


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


def _files_under(folder: Path) -> list[Path]:
    """The document files under `folder`, none reached through a link that leaves it."""
    inside = folder.resolve()
    files = []
    for path in sorted(folder.rglob("*")):
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES | FAQ_SUFFIXES or path.name.startswith("."):
            continue
        if not path.is_file():
            continue
        if not path.resolve().is_relative_to(inside):
            log.warning("%s links outside %s: skipped", path, folder)
            continue
        files.append(path)
        if len(files) > MAX_FILES:
            raise KnowledgeBaseError(
                f"{folder} holds more than {MAX_FILES} documents: split it into several "
                "knowledge bases (`chatbot kb ingest PATH --kb NAME`)"
            )
    return files


def read_text_file(path: Path) -> str | None:
    """The text of a document: UTF-8 (with or without a BOM), UTF-16 with a BOM, else
    Windows-1252 / Latin-1 (with a warning). None for a file too large to be one."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            log.warning(
                "%s is %d MB, over the %d MB a document may have: skipped",
                path,
                size // 1_000_000,
                MAX_FILE_BYTES // 1_000_000,
            )
            return None
        data = path.read_bytes()
    except OSError as exc:
        raise KnowledgeBaseError(f"cannot read {path}: {exc}") from exc
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8: read as Windows-1252", path)
        return data.decode("cp1252", errors="replace")


def read_documents(folder: Path) -> Iterator[Document]:
    """The documents under `folder` (or the one file `folder` names), sorted by path."""
    if folder.is_file():
        if folder.suffix.lower() not in TEXT_SUFFIXES | FAQ_SUFFIXES:
            raise KnowledgeBaseError(
                f"{folder}: not a document this knowledge base reads "
                f"({', '.join(sorted(TEXT_SUFFIXES | FAQ_SUFFIXES))})"
            )
        files, root = [folder], folder.parent
    elif folder.is_dir():
        root = folder
        files = _files_under(folder)
    else:
        raise KnowledgeBaseError(f"{folder} does not exist")
    for path in files:
        doc_id = path.relative_to(root).as_posix()
        raw = read_text_file(path)
        if raw is None:
            continue
        suffix = path.suffix.lower()
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
