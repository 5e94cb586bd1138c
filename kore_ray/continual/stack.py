"""Versions as plain LoRAs on the UNMODIFIED base: stacking, re-compression, merging.

Version k is trained on model_{k-1} = W + sum_{j<k} B_j A_j, so its own export (B_k, A_k) is a
LoRA for model_{k-1}. For the base it is the stack of all of them, exactly:

    W + sum_j B_j A_j = W + [B_1 ... B_k] [A_1; ...; A_k]       (rank r_1 + ... + r_k)

so vLLM serves every version side by side on one base, and rollback is serving an earlier
name. vLLM allows one largest rank (serve.max_lora_rank, at most 512 in vLLM 0.32): a module
whose stacked rank exceeds it is re-compressed to the best rank-m approximation of its
update (Eckart-Young, through thin QRs of B and A^T and an SVD of their small r x r core),
and the relative Frobenius error of what was dropped is recorded per module.

Plain torch on PEFT-format directories: PEFT itself has no "concatenate adapters" for
serving (its add_weighted_adapter "cat" mixes adapters of ONE model into a new one, with
weights, in memory; the versions here are adapters of different models, and the result must
be a file vLLM reads).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from kore_ray.constraint.adapters import write_lora
from kore_ray.errors import InputError


def read_lora(directory: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} of a PEFT LoRA directory, its scaling (alpha / r) folded into B."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{directory}: not a LoRA adapter directory ({e})") from e
    if config.get("use_dora") or config.get("use_rslora"):
        raise InputError(f"{directory}: DoRA/rsLoRA adapters cannot be stacked")
    alphas = config.get("alpha_pattern") or {}
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        alpha = next((v for k, v in alphas.items() if module == k or module.endswith("." + k)),
                     config["lora_alpha"])
        out[module] = (a, b * (alpha / a.shape[0]))
    if not out:
        raise InputError(f"{directory}: no LoRA weights")
    return out


def compress(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A', B', error): the best rank-`rank` factors of B A and ||B A - B' A'||_F / ||B A||_F.

    B = Qb Rb and A^T = Qa Ra, so B A = Qb (Rb Ra^T) Qa^T and the SVD of the r x r core gives
    B A's singular values and vectors without forming the d_out x d_in product.
    """
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    qb, rb = torch.linalg.qr(b64)
    qa, ra = torch.linalg.qr(a64.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s[:rank].sqrt()
    b_new = (qb @ u[:, :rank]) * root
    a_new = root[:, None] * (vh[:rank] @ qa.T)
    total = s.square().sum()
    error = (s[rank:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return a_new.to(a.dtype), b_new.to(b.dtype), error


def stack_loras(
    directories: Sequence[str | Path],
    out: str | Path,
    base_model_name_or_path: str,
    max_rank: int | None = None,
    manifest: dict | None = None,
) -> dict:
    """Write the LoRA for the base that equals applying `directories` in order (each trained
    on the base plus the ones before it); return the manifest (ranks, re-compression errors).
    """
    parts = [read_lora(d) for d in directories]
    modules = sorted(set().union(*parts))
    tensors, ranks, errors = {}, {}, {}
    for module in modules:
        found = [p[module] for p in parts if module in p]
        a = torch.cat([x[0] for x in found])
        b = torch.cat([x[1] for x in found], dim=1)
        if max_rank is not None and a.shape[0] > max_rank:
            a, b, errors[module] = compress(a, b, max_rank)
        tensors[module] = (a, b)
        ranks[module] = a.shape[0]
    record = {
        **(manifest or {}),
        "kind": "lora-stack",
        "stacked": [str(Path(d)) for d in directories],
        "exported_rank": {"min": min(ranks.values()), "max": max(ranks.values())},
        "recompressed_modules": len(errors),
        "recompression_max_rel_error": max(errors.values(), default=0.0),
    }
    write_lora(tensors, out, base_model_name_or_path, record)
    return record


def merge_lora(base_model, directory: str | Path):
    """base_model with the LoRA of `directory` merged into its weights (in place, returned):
    the model the next version trains on."""
    for module, (a, b) in read_lora(directory).items():
        try:
            layer = base_model.get_submodule(module)
        except AttributeError as e:
            raise InputError(f"{directory}: module {module} is not in the model") from e
        w = layer.weight
        w.data = (w.data.to(torch.float64) + b.to(torch.float64) @ a.to(torch.float64)).to(w.dtype)
    return base_model
