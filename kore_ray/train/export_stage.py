"""`kore export`: a trained checkpoint as the artifact the server loads.

Adapter methods become a plain LoRA for the unmodified base (adapters.export_lora; its
manifest records the exported ranks); a whole-model method ("full") is saved whole. Written
to the run directory's adapter/<method>/ unless another destination is given.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from kore_ray.config import PipelineConfig
from kore_ray.constraint.adapters import export_lora
from kore_ray.constraint.init_stage import load_trainable
from kore_ray.errors import InputError
from kore_ray.models.loading import load_model
from kore_ray.run_dir import RunDir, atomic_directory
from kore_ray.train.checkpoint import INFO_FILE, checkpoint_step, load_weights, read_weights


def export_trained(model, directory: str | Path, base_model_name_or_path: str) -> Path:
    """Adapter methods: a plain LoRA for the unmodified base. full: the whole model."""
    if isinstance(model, PeftModel):
        return export_lora(model, directory, base_model_name_or_path)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
    return Path(directory)


def export_checkpoint(cfg: PipelineConfig, method: str, checkpoint: str | Path,
                      dest: str | Path | None = None, dtype: str = "float32") -> Path:
    """A trained checkpoint of `method`, exported (see `export_trained`) to `dest`
    (default the run directory's adapter/<method>)."""
    base, _ = load_model(cfg.model.name_or_path, dtype)
    model = load_trainable(base, RunDir(cfg.run_dir).init(method))
    load_weights(model, read_weights(checkpoint))
    return export_trained(model, dest or RunDir(cfg.run_dir).adapter(method), cfg.model.name_or_path)


def checkpoints(cfg: PipelineConfig, method: str) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint `method`'s run kept, in step order."""
    run = RunDir(cfg.run_dir).checkpoint_run(method, cfg.train.run_name)
    found = ((checkpoint_step(d), d) for d in run.glob("*"))
    return sorted((step, d) for step, d in found if step is not None)  # Ray Train's files sit beside


def run_export(cfg: PipelineConfig, method: str, checkpoint: str | Path | None = None) -> Path:
    """`kore export`: the latest (or the given) checkpoint of `method` as its adapter."""
    if checkpoint is None:
        found = checkpoints(cfg, method)
        if not found:
            raise InputError(f"no checkpoints of {method!r} under {RunDir(cfg.run_dir).checkpoints} "
                             f"(run `kore train --method {method}`)")
        checkpoint = found[-1][1]
    elif checkpoint_step(checkpoint) is None:
        raise InputError(f"{checkpoint}: not a kore train checkpoint (no {INFO_FILE})")
    out = export_checkpoint(cfg, method, checkpoint)
    print(f"kore export: {checkpoint} -> {out}")
    return out
