"""The covariance store: per-group sums of x x^T on disk, with what made them.

Layout of a store directory:
  manifest.json          version, model fingerprint, normalisation, dtype, sample count,
                         data fingerprints, and per group: file, modules with their
                         weight shapes, in_features, token count
  <group key>.safetensors  one float64 tensor "sum" (d_in x d_in)

Stores hold sums, not means, so two stores of the same model add up exactly
(more data, or partial sums from several workers). A store is written to a
temporary directory and renamed into place: a crash leaves no half-written store.
A loaded store reads a group's file when that group is asked for (`GroupSums`), so
init holds one group's matrix at a time, not the store (330 GB at 70B widths).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
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

    sums: Mapping[str, torch.Tensor]  # a dict, or GroupSums for a store on disk
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
        return store_manifest(self.model_fingerprint, self.normalize, self.samples, self.tokens,
                              self.modules, self.data_fingerprints)


def store_manifest(model_fingerprint: str, normalize: str, samples: int, tokens: dict[str, int],
                   modules: dict[str, dict[str, list[int]]], data_fingerprints=()) -> dict:
    """A store's manifest.json: what it was made from, and each group's file and counts."""
    return {
        "version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint,
        "normalize": normalize,
        "dtype": "float64",
        "samples": samples,
        "data_fingerprints": list(data_fingerprints),
        "groups": {
            key: {
                "file": group_file(key),
                "in_features": in_features(modules[key]),
                "tokens": tokens[key],
                "modules": modules[key],
            }
            for key in sorted(modules)
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


def group_file(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".safetensors"


def in_features(modules: Mapping[str, list[int]]) -> int:
    """The width of a group's input: every module's weight is (d_out, d_in)."""
    return next(iter(modules.values()))[1]


def write_group(directory: str | os.PathLike, key: str, tensor: torch.Tensor) -> None:
    """One group's sum as float64 on the host (a GPU sum comes over alone, then is freed)."""
    save_file({"sum": tensor.to("cpu", torch.float64).contiguous()},
              str(Path(directory) / group_file(key)), metadata={"group": key})


def read_group(directory: str | os.PathLike, key: str, d: int) -> torch.Tensor:
    file = Path(directory) / group_file(key)
    if not file.is_file():
        raise InputError(f"covariance store {directory}: missing {file.name} (group {key})")
    tensor = load_file(str(file))["sum"]
    if tensor.dtype != torch.float64 or tuple(tensor.shape) != (d, d):
        raise InputError(
            f"{file}: expected a float64 {d}x{d} sum, got {tensor.dtype} {tuple(tensor.shape)}"
        )
    return tensor


class GroupSums(Mapping):
    """The sums of a store on disk: each lookup reads that group's file (nothing is kept)."""

    def __init__(self, directory: Path, widths: dict[str, int]):
        self.directory, self.widths = directory, widths

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.widths:
            raise KeyError(key)
        return read_group(self.directory, key, self.widths[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.widths)

    def __len__(self) -> int:
        return len(self.widths)


def save_store(directory: str | os.PathLike, store: CovarianceStore) -> Path:
    """Write `store` to `directory` atomically; returns the directory."""
    return write_store(directory, store.manifest(), store.sums)


def write_store(directory: str | os.PathLike, manifest: dict, sums: Mapping[str, torch.Tensor]) -> Path:
    """A store directory, atomically: each group of `manifest` from `sums`, the manifest last."""
    with atomic_directory(directory) as tmp:
        for key in manifest["groups"]:
            write_group(tmp, key, sums[key])
        write_manifest(tmp, manifest)
    return Path(directory)


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """The manifest, written last: a directory without one is not a store."""
    names = [g["file"] for g in manifest["groups"].values()]
    if len(set(names)) != len(names):
        raise InputError("two target group keys map to the same file name")
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(directory: str | os.PathLike, expected_fingerprint: str | None = None) -> dict:
    """A store's manifest; refuses one made for another model than `expected_fingerprint`."""
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
    return manifest


def load_store(
    directory: str | os.PathLike, expected_fingerprint: str | None = None
) -> CovarianceStore:
    """A store on disk (its sums read group by group, on use); refuses one made for another
    model than `expected_fingerprint`."""
    directory = Path(directory)
    manifest = read_manifest(directory, expected_fingerprint)
    groups = manifest["groups"]
    for key, entry in groups.items():
        if entry["file"] != group_file(key) or not (directory / entry["file"]).is_file():
            raise InputError(f"covariance store {directory}: missing {entry['file']} (group {key})")
    return CovarianceStore(
        sums=GroupSums(directory, {k: e["in_features"] for k, e in groups.items()}),
        tokens={k: e["tokens"] for k, e in groups.items()},
        samples=manifest["samples"],
        model_fingerprint=manifest["model_fingerprint"],
        normalize=manifest["normalize"],
        modules={k: e["modules"] for k, e in groups.items()},
        data_fingerprints=tuple(manifest["data_fingerprints"]),
    )
