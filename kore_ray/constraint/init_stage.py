"""`kore init`: a method's trainable model from the base (and the covariance store), saved in
the run directory's init/<method>/ (kore_ray/run_dir.py); and loading it back for training.

Methods whose init rewrites base weights (the method table's `rewrites_base`: kore, kore-v1,
corda, pissa) are saved as their factors A0, B0 and re-residualised on load
(adapters.save_kore_model), so every artifact here is adapter-sized. A whole-model method
("full") has no init artifact beyond its manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from kore_ray.config import PipelineConfig
from kore_ray.constraint.adapters import build_method, load_kore_model, save_kore_model
from kore_ray.constraint.store import load_store
from kore_ray.errors import InputError
from kore_ray.methods import method as lookup
from kore_ray.models import load_model
from kore_ray.models.targets import find_target_groups
from kore_ray.run_dir import (
    MANIFEST,
    STAGE_RECORD,
    RunDir,
    atomic_directory,
    is_current,
    model_fingerprint,
    write_record,
)


def _ranks(cfg: PipelineConfig, groups) -> dict[str, int]:
    unknown = sorted(set(cfg.init.ranks) - {g.key for g in groups})
    if unknown:
        raise InputError(f"init.ranks names unknown target groups: {unknown}")
    return {g.key: cfg.init.ranks.get(g.key, cfg.init.rank) for g in groups}


def _stage_record(cfg: PipelineConfig, method: str, fingerprint: str, store) -> dict:
    return {
        "method": method,
        "model_fingerprint": fingerprint,
        **cfg.init.model_dump(include={"rank", "ranks", "target_modules"}),
        "seed": cfg.train.seed,
        "covariance": list(store.data_fingerprints) if store is not None else None,
    }


def run_init(cfg: PipelineConfig, method: str | None = None, force: bool = False) -> Path:
    """Build `method`'s trainable model from the base (and the covariance store) and save it."""
    method = method or cfg.init.method
    spec = lookup(method)
    run = RunDir(cfg.run_dir)
    out = run.init(method)
    model, _ = load_model(cfg.model.name_or_path, dtype="float32")  # init maths in fp32/fp64
    fingerprint = model_fingerprint(model)
    store = None
    if spec.needs_store:
        store = load_store(run.covariance, expected_fingerprint=fingerprint)
    record = _stage_record(cfg, method, fingerprint, store)
    if not force and is_current(out / STAGE_RECORD, record):
        print(f"kore init: {out} is up to date ({method}); skipping")
        return out
    groups = find_target_groups(model, include=cfg.init.target_modules)
    torch.manual_seed(cfg.train.seed)  # LoRA's random A, PiSSA's randomised SVD
    trainable = build_method(model, method, groups, store, rank=_ranks(cfg, groups), match_kore=True)
    if spec.rewrites_base:
        save_kore_model(trainable, out)
        write_record(out / STAGE_RECORD, record)
    else:
        with atomic_directory(out) as tmp:
            if spec.adapter:
                trainable.save_pretrained(tmp)
            kind = "lora-init" if spec.adapter else "full-init"
            (tmp / MANIFEST).write_text(json.dumps({"kind": kind, **record}, indent=2))
            write_record(tmp / STAGE_RECORD, record)
    leaks = getattr(trainable, "kore_meta", {}).get("leaks") or {}
    if leaks:
        worst = max(leaks, key=leaks.get)
        print(f"kore init: {method} rank {cfg.init.rank}: retention energy let through "
              f"mean {sum(leaks.values()) / len(leaks):.2e}, worst {leaks[worst]:.2e} ({worst})")
    print(f"kore init: wrote {out}")
    return out


def load_trainable(base_model, directory: str | Path, merged_forward: bool = True):
    """The model to train from an init directory, on the UNMODIFIED base (modified in place).
    merged_forward: KORE's merged-weight fast path (constraint/merged.py) where it applies."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{directory} is not an init directory (run `kore init`): {e}") from e
    kind = manifest.get("kind")
    if kind == "kore-adapter":
        return load_kore_model(base_model, directory, is_trainable=True,
                               merged_forward=merged_forward)
    if kind == "lora-init":
        return PeftModel.from_pretrained(base_model, directory, is_trainable=True)
    if kind == "full-init":
        for p in base_model.parameters():
            p.requires_grad_(True)
        return base_model
    raise InputError(f"{directory / MANIFEST}: unknown init kind {kind!r}")
