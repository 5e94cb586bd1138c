"""KORE adapters as PEFT models; export to a plain LoRA; the baselines behind one interface.

A KORE model is an ordinary PEFT LoRA (scaling 1: lora_alpha = r) whose factors start
at the null-space init (A0, B0) and whose base weights are W_res = W - B0 A0, so at
initialisation it computes exactly what the original model does. KORE trains B only;
"kore-v1" trains A as well.

Saving: PEFT's `save_pretrained` stores the adapter (lora_A, lora_B) but not the
residualised base. Rather than save full-size W_res layers, a KORE directory adds
`kore_init.safetensors` with every module's A0 and B0 (adapter-sized) and a manifest
with the base model's fingerprint; `load_kore_model` recomputes W_res = W - B0 A0
from the unmodified base with the same function that built it, so the reloaded model
is bit-identical to the saved one.

Export: W_res + B A0 = W + (B - B0) A0, a plain rank-r LoRA for the unmodified base
(for kore-v1, whose A has moved: W + [B, -B0] [A; A0], rank 2r), written in PEFT's
format with a minimal adapter_config.json that vLLM's multi-LoRA accepts.
"""

from __future__ import annotations

import importlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from kore_ray.constraint.merged import use_merged_forward
from kore_ray.constraint.nullspace import null_space, null_space_init, residual
from kore_ray.constraint.store import CovarianceStore
from kore_ray.errors import InputError, ModelError
from kore_ray.methods import method as lookup
from kore_ray.run_dir import MANIFEST, atomic_directory, model_fingerprint

ADAPTER = "default"
KORE_INIT = "kore_init.safetensors"
FORMAT_VERSION = 1

Rank = int | Mapping[str, int]


@dataclass(frozen=True)
class KoreInit:
    """The null-space factors of every target module, before they enter a model.

    factors: module name -> (A0 r x d_in, B0 d_out x r), float64.
    leaks: group key -> sum of the r smallest eigenvalues / trace of its covariance.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    leaks: dict[str, float]
    model_fingerprint: str

    @property
    def ranks(self) -> dict[str, int]:
        return {name: a0.shape[0] for name, (a0, _) in self.factors.items()}


def _group_ranks(groups: Sequence, rank: Rank) -> dict[str, int]:
    """Group key -> rank, from one rank for all or a per-group mapping."""
    if isinstance(rank, Mapping):
        missing = [g.key for g in groups if g.key not in rank]
        if missing:
            raise InputError(f"per-group ranks missing for target groups {missing}")
        return {g.key: rank[g.key] for g in groups}
    return {g.key: rank for g in groups}


def _module_ranks(groups: Sequence, rank: Rank) -> dict[str, int]:
    ranks = _group_ranks(groups, rank)
    return {m: ranks[g.key] for g in groups for m in g.modules}


def _check_store(model: nn.Module, store: CovarianceStore | None, groups: Sequence, method: str):
    if store is None:
        raise InputError(f"method {method!r} needs a covariance store")
    fingerprint = model_fingerprint(model)
    if store.model_fingerprint != fingerprint:
        raise InputError(
            f"covariance store was made for model {store.model_fingerprint}, "
            f"not for this model ({fingerprint})"
        )
    for g in groups:
        if g.key not in store.sums:
            raise InputError(f"covariance store has no target group {g.key}")
        # A covariance serves any subset of the modules that read its input.
        if not set(g.modules) <= set(store.modules[g.key]):
            raise InputError(
                f"target group {g.key}: modules {sorted(g.modules)} are not among the store's "
                f"{sorted(store.modules[g.key])}"
            )
    return fingerprint


def kore_init(model: nn.Module, store: CovarianceStore, groups: Sequence, rank: Rank) -> KoreInit:
    """Null-space factors for every module of `groups`: one eigh per group, one thin SVD per module.

    The maths runs in float64 on the device of each group's weights (eigh of an 11008-wide
    covariance takes seconds on a GPU, minutes on a CPU); the factors stay there.
    """
    fingerprint = _check_store(model, store, groups, "kore")
    ranks = _group_ranks(groups, rank)
    factors, leaks = {}, {}
    for g in groups:
        weights = [model.get_submodule(name).weight.detach() for name in g.modules]
        cov = store.sums[g.key].to(weights[0].device)
        ns = null_space(cov, ranks[g.key], name=f"target group {g.key}")
        leaks[g.key] = ns.leak
        for name, weight in zip(g.modules, weights):
            factors[name] = null_space_init(weight, ns.basis)
    return KoreInit(factors=factors, leaks=leaks, model_fingerprint=fingerprint)


def _lora_config(module_ranks: Mapping[str, int], **kwargs) -> LoraConfig:
    """LoRA on exactly these modules, scaling 1 (lora_alpha = r) and no dropout.

    Scaling 1 keeps KORE's B A0 = B0 A0 identity literal and makes learning rates
    comparable across methods and ranks. Per-module ranks go into rank_pattern
    (with an equal alpha_pattern), only where they differ from the commonest rank.
    """
    default = Counter(module_ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in module_ranks.items() if r != default}
    return LoraConfig(
        r=default,
        lora_alpha=default,
        target_modules=sorted(module_ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        **kwargs,
    )


def _lora_layers(peft_model: PeftModel):
    """(base module name, LoRA layer) for each adapted module."""
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


@torch.no_grad()
def _residualise(layer: LoraLayer, a0: torch.Tensor, b0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Base weight -> W - B0 A0; keep A0, B0 (in the adapter's dtype) on the layer for export.

    The factors in the adapter's dtype are THE factors: W_res, the saved init and the
    export all use them, so nothing depends on how float64 rounds to float32.
    """
    lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    a0 = a0.to(device=lora_a.device, dtype=lora_a.dtype)
    b0 = b0.to(device=lora_b.device, dtype=lora_b.dtype)
    base = layer.get_base_layer()
    base.weight.copy_(residual(base.weight, a0, b0))
    layer.register_buffer("kore_A0", a0.clone(), persistent=False)
    layer.register_buffer("kore_B0", b0.clone(), persistent=False)
    return a0, b0


def apply_kore(model: nn.Module, init: KoreInit, *, train_a: bool = False) -> PeftModel:
    """Wrap `model` (modified in place) as a KORE PeftModel; its outputs are unchanged.

    train_a=False is KORE: lora_A stays at A0, only lora_B trains. train_a=True is "kore-v1".
    """
    peft_model = get_peft_model(model, _lora_config(init.ranks, init_lora_weights=True))
    for name, layer in _lora_layers(peft_model):
        a0, b0 = _residualise(layer, *init.factors[name])
        with torch.no_grad():
            layer.lora_A[ADAPTER].weight.copy_(a0)
            layer.lora_B[ADAPTER].weight.copy_(b0)
        layer.lora_A[ADAPTER].weight.requires_grad_(train_a)
    use_merged_forward(peft_model)  # frozen A: one merged weight per step (constraint/merged.py)
    peft_model.kore_meta = {
        "method": "kore-v1" if train_a else "kore",
        "model_fingerprint": init.model_fingerprint,
        "leaks": dict(init.leaks),
    }
    return peft_model


def save_kore_model(peft_model: PeftModel, directory: str | os.PathLike) -> Path:
    """Write adapter (PEFT format) + kore_init.safetensors (A0, B0) + manifest.json, atomically."""
    meta = getattr(peft_model, "kore_meta", None)
    if meta is None:
        raise InputError("not a KORE model: build it with apply_kore or load_kore_model")
    factors = {}
    for name, layer in _lora_layers(peft_model):
        factors[f"{name}.A0"] = layer.kore_A0.contiguous().cpu()
        factors[f"{name}.B0"] = layer.kore_B0.contiguous().cpu()
    with atomic_directory(directory) as tmp:
        peft_model.save_pretrained(tmp)
        save_file(factors, str(tmp / KORE_INIT))
        manifest = {"version": FORMAT_VERSION, "kind": "kore-adapter", **meta}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Path(directory)


def load_kore_model(
    base_model: nn.Module, directory: str | os.PathLike, *, is_trainable: bool = False,
    merged_forward: bool = True,
) -> PeftModel:
    """Re-create a saved KORE model on the UNMODIFIED base (modified in place).
    merged_forward=False keeps PeftModel's own forward (FSDP: no whole weight to merge)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{directory} is not a saved KORE model: {e}") from e
    if meta.get("kind") != "kore-adapter" or meta.get("version") != FORMAT_VERSION:
        raise InputError(f"{directory / MANIFEST}: not a version-{FORMAT_VERSION} KORE adapter")
    fingerprint = model_fingerprint(base_model)
    if meta["model_fingerprint"] != fingerprint:
        raise ModelError(
            f"KORE adapter {directory} was made for model {meta['model_fingerprint']}, "
            f"not for this model ({fingerprint})"
        )
    factors = load_file(str(directory / KORE_INIT))
    peft_model = PeftModel.from_pretrained(base_model, directory, is_trainable=is_trainable)
    for name, layer in _lora_layers(peft_model):
        _residualise(layer, factors[f"{name}.A0"], factors[f"{name}.B0"])
        # KORE freezes A at A0; kore-v1, CorDA and PiSSA (saved this way) train it.
        layer.lora_A[ADAPTER].weight.requires_grad_(is_trainable and lookup(meta["method"]).trains_a)
    use_merged_forward(peft_model, merged_forward)
    peft_model.kore_meta = {k: meta[k] for k in ("method", "model_fingerprint", "leaks")}
    return peft_model


def export_lora(
    peft_model: PeftModel, directory: str | os.PathLike, base_model_name_or_path: str
) -> Path:
    """Write a plain LoRA (PEFT format, scaling 1) for the UNMODIFIED base model.

    KORE: lora_A = A0, lora_B = B - B0 (rank r). kore-v1: lora_A = [A; A0],
    lora_B = [B, -B0] (rank 2r). A plain LoRA (default init) is exported as is, with
    its scaling folded into lora_B. Inits that rewrote the base weights in ways this
    module did not record (CorDA, PiSSA, ...) are refused.
    """
    init = peft_model.peft_config[ADAPTER].init_lora_weights
    factors = {}
    for name, layer in _lora_layers(peft_model):
        a = layer.lora_A[ADAPTER].weight.detach()
        b = layer.lora_B[ADAPTER].weight.detach() * layer.scaling[ADAPTER]
        if hasattr(layer, "kore_A0"):
            a0, b0 = layer.kore_A0, layer.kore_B0
            if torch.equal(a, a0):
                a_out, b_out = a0, (b.double() - b0.double()).to(b.dtype)
            else:
                a_out, b_out = torch.cat([a, a0]), torch.cat([b, -b0], dim=1)
        elif init in (True, "gaussian"):
            a_out, b_out = a, b
        else:
            raise InputError(
                f"cannot export a LoRA initialised with {init!r}: its base weights were modified"
            )
        factors[name] = (a_out, b_out)
    meta = getattr(peft_model, "kore_meta", {"method": "lora"})
    return write_lora(factors, directory, base_model_name_or_path, {
        "method": meta["method"], "model_fingerprint": meta.get("model_fingerprint")})


def write_lora(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], directory: str | os.PathLike,
    base_model_name_or_path: str, manifest: dict,
) -> Path:
    """A plain PEFT LoRA directory, scaling 1, from {module: (A, B)}; ranks may differ per
    module (rank_pattern). `manifest` joins the written manifest.json."""
    if not factors:
        raise InputError("model has no LoRA layers to export")
    tensors, ranks = {}, {}
    for name, (a, b) in factors.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous().cpu()
        ranks[name] = a.shape[0]
    default = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in sorted(ranks.items()) if r != default}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": default,
        "lora_alpha": default,
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if pattern:  # scaling stays 1 per module: alpha follows rank
        config["rank_pattern"], config["alpha_pattern"] = pattern, dict(pattern)
    record = {
        "version": FORMAT_VERSION,
        "kind": "lora-export",
        "method": "lora",
        "base_model_name_or_path": str(base_model_name_or_path),
        **manifest,
        # What the server must allow (serve.max_lora_rank >= max); modules differ for matched
        # per-group LoRA ranks.
        "exported_rank": {"min": min(ranks.values()), "max": max(ranks.values())},
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True))
    return Path(directory)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _shapes(model: nn.Module, modules: Sequence[str]) -> list[tuple[int, int]]:
    return [tuple(model.get_submodule(m).weight.shape) for m in modules]


def matched_lora_rank(model: nn.Module, groups: Sequence, kore_rank: int) -> int:
    """The LoRA rank whose trainable-parameter count is closest to KORE's at `kore_rank`.

    KORE trains B only: r * sum(d_out). LoRA trains both: r' * sum(d_in + d_out).
    (The KORE paper's r = 235 on LLaVA-v1.5-7B matches a rank-128 LoRA this way.)
    """
    shapes = _shapes(model, [m for g in groups for m in g.modules])
    kore = kore_rank * sum(d_out for d_out, _ in shapes)
    return max(1, round(kore / sum(d_out + d_in for d_out, d_in in shapes)))


def capture_factors(peft_model: PeftModel, method: str, fingerprint: str) -> PeftModel:
    """Record an init that rewrote the base (CorDA, PiSSA) as KORE-style factors, so it saves,
    reloads and exports like KORE: W_res = W - B0 A0, trained layer W + B A - B0 A0."""
    for _, layer in _lora_layers(peft_model):
        layer.register_buffer("kore_A0", layer.lora_A[ADAPTER].weight.detach().clone(), persistent=False)
        layer.register_buffer("kore_B0", layer.lora_B[ADAPTER].weight.detach().clone(), persistent=False)
    config = peft_model.peft_config[ADAPTER]
    config.init_lora_weights, config.corda_config = True, None  # a reload must not re-run it
    peft_model.kore_meta = {"method": method, "model_fingerprint": fingerprint, "leaks": {}}
    return peft_model


def build_method(
    model: nn.Module,
    method: str,
    groups: Sequence,
    store: CovarianceStore | None = None,
    *,
    rank: Rank = 16,
    match_kore: bool = False,
) -> nn.Module:
    """The model to train for `method` (modified in place), on the modules of `groups`: the
    one dispatch, through the method table to the method's module in constraint/inits/.

    rank: one rank or a per-group mapping; with match_kore=True a matched-rank method (LoRA)
    reads it as a KORE rank. All adapters use scaling 1 and no dropout.
    """
    spec = lookup(method)
    if spec.needs_store and store is None:
        raise InputError(f"method {method!r} needs a covariance store")
    init = importlib.import_module(f"kore_ray.constraint.inits.{spec.init}")
    return init.build(model, spec, groups, store, rank, match_kore=match_kore)
