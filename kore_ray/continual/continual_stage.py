"""`kore continual`: knowledge in ordered batches -> versions v1, v2, ... per track, each
protecting the ones before it, each served as one LoRA on the unmodified base, published only
if it passes the promotion gate.

A track is a way of training the sequence (TRACKS): KORE whose null space covers the original
retention data AND the earlier batches' conversations; the ablation without the earlier
batches; sequential LoRA. Version k of a track, top to bottom:

1. its run directory (a normal one: every stage runs as in `kore inject`) takes batch k's
   conversations (augmented once per batch, shared by the tracks), and model_{k-1}: the
   base with the track's stack_{k-1} merged in (the base itself for k = 1);
2. KORE tracks: the covariance of the original retention data AND (kore) the conversations
   of batches 1..k-1, all collected under model_{k-1}, the model being trained. Recollected,
   not added to the earlier store: a store is only exact for the model that produced its
   activations, and the retention part costs one forward pass over the retention data;
3. init + train as usual: the adapter is a LoRA for model_{k-1};
4. stack_k = [stack_{k-1}; adapter_k] (stack.py): the LoRA for the unmodified base, written to
   continual/adapters/<track>-v<k>; model_k = base + stack_k, for version k+1;
5. evaluation round k: every new version on every batch so far and the retention probes
   (Serve + vLLM over continual/adapters), then the gate; a version that passes is copied to
   continual/published/, the directory to serve (`serve.adapters`): the registry rescans it,
   so a running server picks a published version up without a restart.

Every step is skipped when its output is current, so a re-run (or a run after a crash) goes on
where it stopped. A failed version is kept and the next version still builds on it: the
lineage is the order the batches arrived in; the gate only decides what is published.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from kore_ray.config import ContinualBatch, PipelineConfig
from kore_ray.continual.stack import merge_lora, stack_loras
from kore_ray.errors import InputError
from kore_ray.run_dir import (
    STAGE_RECORD,
    ContinualDir,
    RunDir,
    atomic_directory,
    file_digest,
    is_current,
    write_record,
)


@dataclass(frozen=True)
class Track:
    method: str  # the init method (methods.METHODS)
    protect_earlier: bool  # earlier batches' conversations join the covariance


TRACKS = {
    "kore": Track("kore", protect_earlier=True),
    "kore_no_history": Track("kore", protect_earlier=False),  # the ablation
    "lora": Track("lora", protect_earlier=False),  # sequential LoRA
}


def _say(message: str) -> None:
    print(f"kore continual: {message}", flush=True)


def _with(cfg: PipelineConfig, **sections) -> PipelineConfig:
    """cfg with some sections' fields replaced: {"data": {...}, "model": {...}, "run_dir": x}."""
    update = {}
    for name, fields in sections.items():
        update[name] = fields if not isinstance(fields, dict) else \
            getattr(cfg, name).model_copy(update=fields)
    return cfg.model_copy(update=update)


def batch_config(cfg: PipelineConfig, cdir: ContinualDir, k: int, batch: ContinualBatch):
    """Augmentation of batch k, once for every track (the self generator uses the base)."""
    return _with(cfg, run_dir=str(cdir.batch(k)),
                 data={"knowledge": batch.knowledge, "eval_questions": batch.eval_questions})


def version_config(cfg: PipelineConfig, cdir: ContinualDir, track: str, k: int,
                   batch: ContinualBatch) -> PipelineConfig:
    mcfg = cfg.for_method(TRACKS[track].method)
    model = cfg.model.name_or_path if k == 1 else str(cdir.model(track, k - 1).resolve())
    return _with(mcfg, run_dir=str(cdir.version(track, k)), model={"name_or_path": model},
                 data={"knowledge": batch.knowledge, "eval_questions": batch.eval_questions})


def _covariance(vcfg: PipelineConfig, cdir: ContinualDir, track: str, k: int) -> None:
    from kore_ray.constraint.covariance_stage import run_covariance

    if not (TRACKS[track].protect_earlier and k > 1):
        run_covariance(vcfg, progress=False)  # the original retention data, under model_{k-1}
        return
    retention = _with(vcfg, run_dir=str(cdir.version(track, k) / "retention"))
    run_covariance(retention, progress=False)
    earlier = cdir.version(track, k) / "earlier_conversations.parquet"
    tables = [pq.read_table(RunDir(cdir.batch(j)).conversations) for j in range(1, k)]
    pq.write_table(pa.concat_tables(tables, promote_options="default"), earlier)
    both = _with(vcfg, data={"retention": str(earlier)},
                 covariance={"add_to": str(RunDir(retention.run_dir).covariance)})
    run_covariance(both, progress=False)


def _stack_and_merge(cfg: PipelineConfig, cdir: ContinualDir, track: str, k: int) -> None:
    method = TRACKS[track].method
    parts = [RunDir(cdir.version(track, j)).adapter(method) for j in range(1, k + 1)]
    record = {"stacked": [str(p) for p in parts],
              "digests": [file_digest(p / "adapter_model.safetensors") for p in parts],
              "max_rank": cfg.serve.max_lora_rank}
    out = cdir.adapter(track, k)
    if not is_current(out / STAGE_RECORD, record):
        made = stack_loras(parts, out, cfg.model.name_or_path, cfg.serve.max_lora_rank,
                           manifest={"method": method, "track": track, "version": k})
        write_record(out / STAGE_RECORD, record)
        if made["recompressed_modules"]:
            _say(f"{track}-v{k}: stacked rank above serve.max_lora_rank "
                 f"({cfg.serve.max_lora_rank}) in {made['recompressed_modules']} modules: "
                 f"re-compressed, worst relative error {made['recompression_max_rel_error']:.2e}")
    model_dir = cdir.model(track, k)
    merged = {"stack": file_digest(out / "adapter_model.safetensors"), "base": cfg.model.name_or_path}
    if not is_current(model_dir / STAGE_RECORD, merged):
        from kore_ray.models.loading import load_model

        model, preprocessor = load_model(cfg.model.name_or_path, "float32")
        merge_lora(model, out)
        with atomic_directory(model_dir) as tmp:
            model.save_pretrained(tmp)
            preprocessor.save_pretrained(tmp)
            write_record(tmp / STAGE_RECORD, merged)


def train_version(cfg: PipelineConfig, cdir: ContinualDir, track: str, k: int,
                  batch: ContinualBatch, progress: bool = False) -> None:
    from kore_ray.constraint.init_stage import run_init
    from kore_ray.methods import METHODS
    from kore_ray.train.train_stage import run_train

    method = TRACKS[track].method
    vcfg = version_config(cfg, cdir, track, k, batch)
    conversations = RunDir(vcfg.run_dir).conversations
    source = RunDir(cdir.batch(k)).conversations
    if not conversations.is_file() or file_digest(conversations) != file_digest(source):
        conversations.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, conversations)
    if METHODS[method].needs_store:
        _covariance(vcfg, cdir, track, k)
    run_init(vcfg, method)
    run_train(vcfg, method, progress=progress)
    _stack_and_merge(cfg, cdir, track, k)


def run_continual(cfg: PipelineConfig, progress: bool = True) -> dict:
    """Every batch, every track, every evaluation round; returns the evaluation matrix."""
    from kore_ray.augment import run_augment
    from kore_ray.continual.evaluate import evaluate_round, write_report

    c = cfg.continual
    if not c.batches:
        raise InputError("continual.batches is empty: give the knowledge batches in order "
                         "(each: name, knowledge, eval_questions)")
    unknown = [t for t in c.tracks if t not in TRACKS]
    if unknown:
        raise InputError(f"continual.tracks: unknown {unknown}; valid: {sorted(TRACKS)}")
    cdir = ContinualDir(cfg.run_dir)
    for k, batch in enumerate(c.batches, start=1):
        _say(f"batch {k}/{len(c.batches)} ({batch.name}): augment")
        run_augment(batch_config(cfg, cdir, k, batch), progress=False)
        for track in c.tracks:
            _say(f"{track}-v{k}: covariance, init, train, stack")
            train_version(cfg, cdir, track, k, batch, progress=progress)
        evaluate_round(cfg, cdir, k)
    return write_report(cfg, cdir)
