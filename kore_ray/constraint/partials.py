"""A covariance actor: sums many tasks in memory, saves them to disk at intervals.

Plain Python (Ray wraps it in covariance_stage). The actor keeps one float64 sum per target
group across tasks, so a task ships nothing back but counts. At each `flush` it writes its
sums so far as a small store (a "partial") under the run directory: cumulative, so an
actor's newest partial supersedes its older ones (the driver deletes those), and the disk
holds one store's worth per actor, not one per interval. A partial's manifest lists the
tasks it holds: the driver counts a task once a partial holding it is on disk, and a lost
actor loses only what it had not flushed, which the driver re-queues. Each incarnation of
the actor (a restart, or a `reset`) has its own id, so work of a dead incarnation is told
apart from work of its replacement.
"""

from __future__ import annotations

import os
import resource
import uuid
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from kore_ray.constraint.covariance import CovarianceAccumulator, accumulate
from kore_ray.constraint.retention import RetentionItem, text_inputs, tokenize_texts, vlm_inputs
from kore_ray.constraint.store import store_manifest, write_store
from kore_ray.data.tokenize import pad_token_id
from kore_ray.models.loading import load_model
from kore_ray.run_dir import model_fingerprint


def task_table(batches: Sequence[Sequence[RetentionItem]]) -> pa.Table:
    """One task: one row per micro-batch (ids, texts, images), as the driver planned them."""
    return pa.table({
        "ids": pa.array([[i.id for i in b] for b in batches], pa.list_(pa.string())),
        "texts": pa.array([[i.text for i in b] for b in batches], pa.list_(pa.string())),
        "images": pa.array([[i.image for i in b] for b in batches], pa.list_(pa.string())),
    })


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CovarianceActor:
    """A model replica that sums every task it is given and saves the sums when told to."""

    def __init__(self, spec, keys: Sequence[str], normalize: str, max_length: int, device: str,
                 partials_dir: str):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one weight-loading bar per actor restart is noise
        self.spec, self.max_length = spec, max_length
        self.model, self.processor = load_model(spec.name_or_path, spec.dtype, device)
        self.pad_id = pad_token_id(self.processor)
        groups = [g for g in spec.groups if g.key in set(keys)]
        self.acc = CovarianceAccumulator(self.model, groups, normalize)
        self.partials_dir = Path(partials_dir)
        self.fingerprint = model_fingerprint(self.model)
        self._start()

    def _start(self) -> None:
        """Begin a new incarnation: zero sums, a new id."""
        self.acc.reset()
        self.id = uuid.uuid4().hex[:12]
        self.tasks: list[int] = []  # summed by this incarnation
        self.flushes = 0

    def incarnation(self) -> tuple[str, str]:
        """(this incarnation's id, the fingerprint of the model it loaded)."""
        return self.id, self.fingerprint

    def reset(self) -> dict:
        """Drop everything unsaved and begin a new incarnation; returns the old and new ids.

        The driver calls it on a restarted actor before giving it work: a call that failed
        while the actor restarted may still have run there, so that incarnation's unsaved
        work is dropped (its saved partials still count) and the driver redoes it.
        """
        old = self.id
        self._start()
        return {"previous": old, "incarnation": self.id, "fingerprint": self.fingerprint}

    def _batches(self, table: pa.Table):
        for row in table.to_pylist():
            if self.spec.vision:
                yield vlm_inputs(self.processor, row["texts"], row["images"], row["ids"],
                                 self.max_length, self.spec.image_token_id)
            else:
                ids = tokenize_texts(self.processor, row["texts"], self.max_length)
                yield text_inputs(ids, self.pad_id)

    def add(self, task: int, table: pa.Table) -> dict:
        """Add one task's micro-batches to the sums; returns its counts (nothing is saved yet)."""
        tokens, samples = self.acc.tokens[self.acc.groups[0].key], self.acc.samples
        accumulate(self.acc, self._batches(table))
        self.tasks.append(task)
        return {
            "incarnation": self.id, "task": task,
            "sequences": self.acc.samples - samples,
            "tokens": self.acc.tokens[self.acc.groups[0].key] - tokens,
        }

    def flush(self) -> dict | None:
        """Save the sums so far (every task of this incarnation) as a partial; None if empty.

        Written atomically, manifest last, under a new name each time: a partial on disk is
        whole, holds exactly the tasks its manifest lists, and an older one stays valid
        until the driver, told of the newer, deletes it.
        """
        if not self.tasks:
            return None
        acc = self.acc
        modules = {g.key: self.spec.modules[g.key] for g in acc.groups}
        manifest = {**store_manifest(self.fingerprint, acc.normalize, acc.samples, acc.tokens, modules),
                    "tasks": list(self.tasks), "incarnation": self.id}
        path = self.partials_dir / f"{self.id}-{self.flushes:04d}"
        acc.check_every_group()
        write_store(path, manifest, acc.sums)  # the sums stay on the model's device(s)
        self.flushes += 1
        return {"incarnation": self.id, "path": str(path), "tasks": list(self.tasks),
                "bytes": sum(f.stat().st_size for f in path.iterdir()),
                "peak_rss": peak_rss_bytes(), "pid": os.getpid()}
