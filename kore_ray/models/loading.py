"""Load a model and its tokenizer/processor from a name, a local HF directory or an object-store URI."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from kore_ray.errors import ModelError
from kore_ray.models import gemma

EMBEDDED = {gemma.NAME: gemma.embedded_gemma_path}
_DTYPES = ("float32", "bfloat16", "float16")


def _fetch_uri(uri: str) -> Path:
    """Copy a model directory from an object store (s3://, gs://, ...) into the local cache once."""
    import pyarrow.fs as pafs

    dest = gemma.cache_root() / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / "config.json").is_file():
        return dest
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(root)
        if info.type != pafs.FileType.Directory:
            raise ModelError(f"model URI {uri} is not a directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch.", dir=dest.parent))
        pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"could not fetch model from {uri}: {e}") from e
    if not (tmp / "config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"model URI {uri} has no config.json: not a Hugging Face model directory")
    os.replace(tmp, dest)
    return dest


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local directory holding config.json for an embedded name, URI or path."""
    spec = str(name_or_path)
    if spec in EMBEDDED:
        return EMBEDDED[spec]()
    if "://" in spec and not spec.startswith("file://"):
        return _fetch_uri(spec)
    path = Path(spec.removeprefix("file://")).expanduser()
    if not path.exists():
        raise ModelError(
            f"model path does not exist: {path} (expected a Hugging Face model directory, "
            f"an object-store URI, or one of: {', '.join(EMBEDDED)})"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory: no config.json")
    return path


def is_vision_language(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_model(name_or_path: str | os.PathLike, dtype: str = "float32", device: str = "cpu"):
    """Return (model, tokenizer_or_processor) in eval mode; vision-language models get a processor.

    device "auto" splits the model over every visible GPU, layer by layer (accelerate's
    device_map), for a model that one device cannot hold; on a machine without GPUs it is CPU.
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    if dtype not in _DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}; choose one of {_DTYPES}")
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
        split = {"device_map": "auto"} if device == "auto" else {}
        if is_vision_language(config):
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype), **split)
            tok = AutoProcessor.from_pretrained(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **split)
            tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"could not load model from {path}: {type(e).__name__}: {e}") from e
    return (model if split else model.to(device)).eval(), tok
