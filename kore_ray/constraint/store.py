"""The covariance store: per-group sums of x x^T on disk, with what made them.

Layout of a store directory:
  manifest.json          version, model fingerprint, normalisation, dtype, sample count,
                         data fingerprints, and per group: file, modules with their
                         weight shapes, in_features, token count
  <group key>.safetensors  one float64 tensor "sum" (d_in x d_in)

Stores hold sums, not means, so two stores of the same model add up exactly
(more data, or partial sums from several workers). A store is written to a
temporary directory and renamed into place: a crash leaves no half-written store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kore_ray.errors import InputError

FORMAT_VERSION = 1
NORMALIZATIONS = ("none", "sample_max")
MANIFEST = "manifest.json"

# Config entries that name where or how a checkpoint was loaded, not what it is.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_attn_implementation_internal",
    "use_cache",
}
_SAMPLES_PER_TENSOR = 64


def _stable_config(value):
    if isinstance(value, dict):
        return {
            k: _stable_config(v) for k, v in sorted(value.items()) if k not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def model_fingerprint(model: nn.Module) -> str:
    """A short stable hash that tells one model checkpoint from another.

    Covers: the architecture config (without load-time entries such as the path,
    dtype or attention implementation), every parameter's name and shape (so every
    target layer's shape), and a cheap checksum of 64 evenly spaced elements of each
    parameter, rounded to bfloat16 so a float32 and a bfloat16 copy of the same
    checkpoint agree. It detects a different checkpoint or fine-tune, not a single
    changed weight. Compute it on the unmodified model (not a PeftModel).
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(json.dumps(_stable_config(config.to_dict()), sort_keys=True, default=str).encode())
    else:
        h.update(type(model).__qualname__.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)};".encode())
            flat = p.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            # Integer spacing: a float32 linspace rounds past the end beyond 2^24 elements.
            idx = torch.arange(_SAMPLES_PER_TENSOR, device=flat.device) * (flat.numel() - 1)
            sample = flat[idx // (_SAMPLES_PER_TENSOR - 1)].to(torch.bfloat16).view(torch.int16).cpu()
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class CovarianceStore:
    """Per-group sums of x x^T (float64, on CPU) over the retention tokens.

    modules maps each group key to its modules' weight shapes (d_out, d_in): the
    init stage needs to know which modules share a covariance. samples counts
    sequences (CorDA's covariance is a per-sample mean).
    """

    sums: dict[str, torch.Tensor]
    tokens: dict[str, int]
    samples: int
    model_fingerprint: str
    normalize: str
    modules: dict[str, dict[str, list[int]]]
    data_fingerprints: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise InputError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if set(self.sums) != set(self.modules) or set(self.sums) != set(self.tokens):
            raise InputError("covariance store: sums, tokens and modules name different groups")

    def __add__(self, other: CovarianceStore) -> CovarianceStore:
        """The store of both datasets: sums and counts add; model and groups must agree."""
        if self.model_fingerprint != other.model_fingerprint:
            raise InputError(
                "cannot merge covariance stores of different models: "
                f"{self.model_fingerprint} vs {other.model_fingerprint}"
            )
        if self.normalize != other.normalize:
            raise InputError(
                f"cannot merge covariance stores normalised differently: "
                f"{self.normalize!r} vs {other.normalize!r}"
            )
        if self.modules != other.modules:
            raise InputError("cannot merge covariance stores over different target groups")
        return CovarianceStore(
            sums={k: self.sums[k] + other.sums[k] for k in self.sums},
            tokens={k: self.tokens[k] + other.tokens[k] for k in self.tokens},
            samples=self.samples + other.samples,
            model_fingerprint=self.model_fingerprint,
            normalize=self.normalize,
            modules=self.modules,
            data_fingerprints=self.data_fingerprints + other.data_fingerprints,
        )

    def manifest(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "normalize": self.normalize,
            "dtype": "float64",
            "samples": self.samples,
            "data_fingerprints": list(self.data_fingerprints),
            "groups": {
                key: {
                    "file": _file_name(key),
                    "in_features": self.sums[key].shape[0],
                    "tokens": self.tokens[key],
                    "modules": self.modules[key],
                }
                for key in sorted(self.sums)
            },
        }


def merge_stores(stores: Iterable[CovarianceStore]) -> CovarianceStore:
    """Sum of several stores of the same model (e.g. partial sums from workers)."""
    stores = list(stores)
    if not stores:
        raise InputError("no covariance stores to merge")
    total = stores[0]
    for s in stores[1:]:
        total = total + s
    return total


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".safetensors"


@contextmanager
def atomic_directory(directory: str | os.PathLike):
    """Yield a temporary directory that replaces `directory` only if the block succeeds.

    An existing `directory` is replaced only if it is empty or holds a manifest.json
    (a previous artifact), never an unrelated folder.
    """
    target = Path(directory)
    if (
        target.exists()
        and not (target / MANIFEST).is_file()
        and (not target.is_dir() or any(target.iterdir()))
    ):
        raise InputError(f"{target} exists and is not a kore-ray artifact; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_store(directory: str | os.PathLike, store: CovarianceStore) -> Path:
    """Write `store` to `directory` atomically; returns the directory."""
    manifest = store.manifest()
    names = [g["file"] for g in manifest["groups"].values()]
    if len(set(names)) != len(names):
        raise InputError("two target group keys map to the same file name")
    with atomic_directory(directory) as tmp:
        for key, entry in manifest["groups"].items():
            tensor = store.sums[key].to(torch.float64).contiguous()
            save_file({"sum": tensor}, str(tmp / entry["file"]), metadata={"group": key})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Path(directory)


def load_store(
    directory: str | os.PathLike, expected_fingerprint: str | None = None
) -> CovarianceStore:
    """Read a store; refuse one made for another model than `expected_fingerprint`."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(f"{directory} is not a covariance store: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: store format version {manifest.get('version')!r}, expected {FORMAT_VERSION}"
        )
    if expected_fingerprint is not None and manifest["model_fingerprint"] != expected_fingerprint:
        raise InputError(
            f"covariance store {directory} was made for model {manifest['model_fingerprint']}, "
            f"not for this model ({expected_fingerprint})"
        )
    sums, tokens, modules = {}, {}, {}
    for key, entry in manifest["groups"].items():
        file = directory / entry["file"]
        if not file.is_file():
            raise InputError(f"covariance store {directory}: missing {entry['file']} (group {key})")
        tensor = load_file(str(file))["sum"]
        d = entry["in_features"]
        if tensor.dtype != torch.float64 or tuple(tensor.shape) != (d, d):
            raise InputError(
                f"{file}: expected a float64 {d}x{d} sum, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        sums[key], tokens[key], modules[key] = tensor, entry["tokens"], entry["modules"]
    return CovarianceStore(
        sums=sums,
        tokens=tokens,
        samples=manifest["samples"],
        model_fingerprint=manifest["model_fingerprint"],
        normalize=manifest["normalize"],
        modules=modules,
        data_fingerprints=tuple(manifest["data_fingerprints"]),
    )
