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

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kore_ray.errors import InputError
from kore_ray.run_dir import MANIFEST, atomic_directory

FORMAT_VERSION = 1
NORMALIZATIONS = ("none", "sample_max")

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
