"""`kore init` and `kore export`: the KORE-CONSTRAINT stages on a run directory.

  <run_dir>/covariance/        the retention covariance store (kore covariance)
  <run_dir>/init/<method>/     the initialised trainable model's adapter state
  <run_dir>/adapter/<method>/  the trained model as a plain LoRA for the unmodified base

Adapter methods whose init rewrites base weights (kore, kore-v1, corda) are saved as
their factors A0, B0 and re-residualised on load (adapters.save_kore_model), so every
artifact here is adapter-sized. "full" has no init artifact beyond its manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from kore_ray.config import PipelineConfig
from kore_ray.constraint.adapters import (
    ADAPTER,
    _lora_layers,
    build_method,
    export_lora,
    load_kore_model,
    save_kore_model,
)
from kore_ray.constraint.store import MANIFEST, atomic_directory, load_store, model_fingerprint
from kore_ray.errors import InputError
from kore_ray.models import load_model
from kore_ray.models.targets import find_target_groups

STAGE_FILE = "stage.json"  # what an init was made from; a re-run with the same inputs skips it
NEEDS_STORE = ("kore", "kore-v1", "corda")


def covariance_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "covariance"


def init_dir(run_dir: str | Path, method: str) -> Path:
    return Path(run_dir) / "init" / method


def adapter_dir(run_dir: str | Path, method: str) -> Path:
    return Path(run_dir) / "adapter" / method


def _ranks(cfg: PipelineConfig, groups) -> dict[str, int]:
    unknown = sorted(set(cfg.init.ranks) - {g.key for g in groups})
    if unknown:
        raise InputError(f"init.ranks names unknown target groups: {unknown}")
    return {g.key: cfg.init.ranks.get(g.key, cfg.init.rank) for g in groups}


def _stage_record(cfg: PipelineConfig, method: str, fingerprint: str, store) -> dict:
    return {
        "method": method,
        "model_fingerprint": fingerprint,
        "rank": cfg.init.rank,
        "ranks": dict(cfg.init.ranks),
        "target_modules": cfg.init.target_modules,
        "seed": cfg.train.seed,
        "covariance": list(store.data_fingerprints) if store is not None else None,
    }


def _capture_factors(peft_model: PeftModel, method: str, fingerprint: str) -> None:
    """Record an init that rewrote the base (CorDA) as KORE-style factors, so it saves,
    reloads and exports like KORE: W_res = W - B0 A0, trained layer W + B A - B0 A0."""
    for _, layer in _lora_layers(peft_model):
        layer.register_buffer("kore_A0", layer.lora_A[ADAPTER].weight.detach().clone(), persistent=False)
        layer.register_buffer("kore_B0", layer.lora_B[ADAPTER].weight.detach().clone(), persistent=False)
    config = peft_model.peft_config[ADAPTER]
    config.init_lora_weights, config.corda_config = True, None  # reload must not re-run CorDA
    peft_model.kore_meta = {"method": method, "model_fingerprint": fingerprint, "leaks": {}}


def run_init(cfg: PipelineConfig, method: str | None = None, force: bool = False) -> Path:
    """Build `method`'s trainable model from the base (and the covariance store) and save it."""
    method = method or cfg.init.method
    out = init_dir(cfg.run_dir, method)
    model, _ = load_model(cfg.model.name_or_path, dtype="float32")  # init maths in fp32/fp64
    fingerprint = model_fingerprint(model)
    store = None
    if method in NEEDS_STORE:
        store = load_store(covariance_dir(cfg.run_dir), expected_fingerprint=fingerprint)
    record = _stage_record(cfg, method, fingerprint, store)
    if not force and (out / STAGE_FILE).is_file() and json.loads((out / STAGE_FILE).read_text()) == record:
        print(f"kore init: {out} is up to date ({method}); skipping")
        return out
    groups = find_target_groups(model, include=cfg.init.target_modules)
    torch.manual_seed(cfg.train.seed)  # LoRA's random A
    trainable = build_method(model, method, groups, store, rank=_ranks(cfg, groups), match_kore=True)
    if method == "corda":
        _capture_factors(trainable, method, fingerprint)
    if method in NEEDS_STORE:
        save_kore_model(trainable, out)
        (out / STAGE_FILE).write_text(json.dumps(record, indent=2))
    else:
        with atomic_directory(out) as tmp:
            if method == "lora":
                trainable.save_pretrained(tmp)
            (tmp / MANIFEST).write_text(json.dumps({"kind": f"{method}-init", **record}, indent=2))
            (tmp / STAGE_FILE).write_text(json.dumps(record, indent=2))
    leaks = getattr(trainable, "kore_meta", {}).get("leaks") or {}
    if leaks:
        worst = max(leaks, key=leaks.get)
        print(f"kore init: {method} rank {cfg.init.rank}: retention energy let through "
              f"mean {sum(leaks.values()) / len(leaks):.2e}, worst {leaks[worst]:.2e} ({worst})")
    print(f"kore init: wrote {out}")
    return out


def load_trainable(base_model, directory: str | Path):
    """The model to train from an init directory, on the UNMODIFIED base (modified in place)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{directory} is not an init directory (run `kore init`): {e}") from e
    kind = manifest.get("kind")
    if kind == "kore-adapter":
        return load_kore_model(base_model, directory, is_trainable=True)
    if kind == "lora-init":
        return PeftModel.from_pretrained(base_model, directory, is_trainable=True)
    if kind == "full-init":
        for p in base_model.parameters():
            p.requires_grad_(True)
        return base_model
    raise InputError(f"{directory / MANIFEST}: unknown init kind {kind!r}")


def export_trained(model, directory: str | Path, base_model_name_or_path: str) -> Path:
    """Adapter methods: a plain LoRA for the unmodified base. full: the whole model."""
    if isinstance(model, PeftModel):
        return export_lora(model, directory, base_model_name_or_path)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
    return Path(directory)
