"""The run directory: where every stage's artifacts live, and how a stage knows they are current.

One owner, as torchtune's checkpointer owns its output_dir: stages ask `RunDir` for paths and
never spell one. Layout (relative to `run_dir` in the config, a local or shared path):

  augmented/conversations.parquet   the knowledge trees (augment)
  augmented/failures.parquet, summary.json, cache/
  covariance/                       the retention covariance store (covariance)
  covariance.partials/              actors' saved sums while covariance runs (then removed)
  init/<method>/                    the initialised trainable model (init)
  train/<method>/run.json, done.json, metrics.jsonl   (train)
  checkpoints/<run name>/           Ray Train's checkpoints (train)
  adapter/<method>/                 the trained model as a plain LoRA (train, export)
  eval/results.json, report.md, predictions.parquet, adaptation_retention.png,
       training_loss.png                                (evaluate)
  mlruns/                           MLflow's local store (evaluate; tracking.uri unset)
  continual/...                     `kore continual`'s versions (ContinualDir)

Every artifact directory is written whole or not at all (`atomic_directory`), and carries a
record (a JSON dict of what made it: model fingerprint, settings, data fingerprints). A stage
is skipped when its stored record holds the one it would write now (`is_current`): the one
"up to date?" check every stage uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from kore_ray.errors import InputError

MANIFEST = "manifest.json"  # what an artifact directory is (kind, version, fingerprints)
STAGE_RECORD = "stage.json"  # what an init was made from
RUN_RECORD = "run.json"  # a training run's settings: its checkpoints resume only under them
DONE_RECORD = "done.json"  # written once the adapter is exported: a re-run skips training
METRICS = "metrics.jsonl"  # one line per training step


class RunDir:
    """The paths of one run directory (nothing is created until a stage writes)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # augment
    @property
    def augmented(self) -> Path:
        return self.root / "augmented"

    @property
    def conversations(self) -> Path:
        return self.augmented / "conversations.parquet"

    @property
    def failures(self) -> Path:
        return self.augmented / "failures.parquet"

    @property
    def augment_summary(self) -> Path:
        return self.augmented / "summary.json"

    @property
    def augment_cache(self) -> Path:
        return self.augmented / "cache"

    @property
    def no_adapters(self) -> Path:
        """An empty adapter folder: the self generator serves the bare base model."""
        return self.augmented / "no-adapters"

    # covariance, init
    @property
    def covariance(self) -> Path:
        return self.root / "covariance"

    @property
    def covariance_partials(self) -> Path:
        return self.root / "covariance.partials"

    def init(self, method: str) -> Path:
        return self.root / "init" / method

    # train, export
    def train(self, method: str) -> Path:
        return self.root / "train" / method

    def train_metrics(self, method: str) -> list[dict]:
        """The method's training steps, one dict each, from its metrics.jsonl ([] if none)."""
        path = self.train(method) / METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_run(self, method: str, name: str | None = None) -> Path:
        """Ray Train's folder of `method`'s run (train.run_name, or the default `run_name`)."""
        return self.checkpoints / run_name(self.root, method, name)

    @property
    def adapters(self) -> Path:
        return self.root / "adapter"

    def adapter(self, method: str) -> Path:
        return self.adapters / method

    # evaluate
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def results(self) -> Path:
        return self.eval / "results.json"

    @property
    def report(self) -> Path:
        return self.eval / "report.md"

    @property
    def predictions(self) -> Path:
        return self.eval / "predictions.parquet"

    @property
    def plot(self) -> Path:
        return self.eval / "adaptation_retention.png"

    @property
    def loss_plot(self) -> Path:
        return self.eval / "training_loss.png"


class ContinualDir:
    """The paths of `kore continual` (kore_ray/continual/) under a run directory:

      continual/batches/b<k>/            batch k's augmentation (a RunDir), shared by tracks
      continual/<track>/v<k>/            version k's stages (a RunDir), model/ = base + stack_k
      continual/adapters/<track>-v<k>/   stack_k: the LoRA of version k for the unmodified base
      continual/published/<track>-v<k>/  the versions that passed the gate: serve this
      continual/eval/results.json (the matrix), report.md, adaptation_by_version.png
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / "continual"

    def batch(self, k: int) -> Path:
        return self.root / "batches" / f"b{k}"

    def version(self, track: str, k: int) -> Path:
        return self.root / track / f"v{k}"

    def model(self, track: str, k: int) -> Path:
        return self.version(track, k) / "model"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    def adapter(self, track: str, k: int) -> Path:
        return self.adapters / f"{track}-v{k}"

    @property
    def published(self) -> Path:
        return self.root / "published"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def matrix(self) -> Path:
        return self.eval / "results.json"

    @property
    def report(self) -> Path:
        return self.eval / "report.md"

    @property
    def plot(self) -> Path:
        return self.eval / "adaptation_by_version.png"


def run_name(run_dir: str | os.PathLike, method: str, name: str | None = None) -> str:
    """A training run's name: train.run_name, else "<run_dir name>-<method>" (so a re-run of
    the same run directory resumes its checkpoints)."""
    return name or f"{Path(run_dir).resolve().name}-{method}"


# --- records: what made an artifact ----------------------------------------------------------


def read_record(path: str | os.PathLike) -> dict | None:
    """A JSON record, or None when it is missing or unreadable (the stage then runs again)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def file_digest(path: str | os.PathLike) -> str:
    """A file's content fingerprint (sha256, 16 hex digits), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def is_current(path: str | os.PathLike, record: dict) -> bool:
    """Whether the artifact whose record is at `path` was made from `record`: every entry of
    `record` is in the stored one with the same value (a manifest also says other things)."""
    stored = read_record(path)
    return isinstance(stored, dict) and all(k in stored and stored[k] == v for k, v in record.items())


def write_record(path: str | os.PathLike, record: dict) -> None:
    atomic_write(path, json.dumps(record, indent=2, sort_keys=True).encode())


# --- atomic writes -----------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one (a crash mid-write included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


# --- fingerprints --------------------------------------------------------------------------------

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
