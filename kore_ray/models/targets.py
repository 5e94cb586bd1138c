"""Which linear layers KORE constrains, grouped by the input tensor they read.

KORE's covariance C = sum x x^T depends only on a layer's input, so layers that read the same
tensor (q/k/v of one attention block, gate/up of one MLP) share one C and it is collected once.
Grouping is decided from structure: sibling `nn.Linear`s of one parent whose names are known to
share an input. q/k/v are assumed to be SELF-attention (true for the decoders supported here;
the tests prove it with forward hooks). Fused projections (`qkv_proj`, `gate_up_proj`) are single
linears and form groups of one.

Only the language model's decoder layers count: for multimodal models, `get_decoder()` (the HF
convention) selects the text decoder, which leaves out the vision tower, the projector and lm_head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from kore_ray.errors import ModelError

SHARED_INPUT: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)
_IN_NUMBERED_BLOCK = re.compile(r"(^|\.)\d+\.")


@dataclass(frozen=True)
class TargetGroup:
    """Linear layers that read one input tensor.

    `key` names that input: `<parent module>.<short names joined by "+">` in canonical order,
    e.g. `model.layers.0.self_attn.q_proj+k_proj+v_proj` or `model.layers.0.mlp.down_proj`.
    It only uses [A-Za-z0-9_.+], so it is filename-safe, and it does not change with `include`
    (a covariance saved under a key stays valid whichever subset of the group is trained).
    `modules` are full names as in `model.named_modules()`.
    """

    key: str
    modules: tuple[str, ...]
    in_features: int


def _decoder_prefix(model: nn.Module) -> tuple[str, nn.Module]:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else model
    for name, module in model.named_modules():
        if module is decoder:
            return name, decoder
    raise ModelError(f"{type(model).__name__}: get_decoder() returned a module outside the model")


def find_target_groups(model: nn.Module, include: list[str] | None = None) -> list[TargetGroup]:
    """Groups of the decoder's `*_proj` linears, ordered by layer then position in the layer.

    `include` restricts to short names (e.g. ["q_proj", "v_proj"]); the keys stay those of the
    full groups.
    """
    prefix, decoder = _decoder_prefix(model)
    linears = {
        name: module
        for name, module in decoder.named_modules(prefix=prefix)
        if isinstance(module, nn.Linear)
        and name.rpartition(".")[2].endswith("_proj")
        and _IN_NUMBERED_BLOCK.search(name)
    }
    if not linears:
        raise ModelError(
            f"{type(model).__name__}: no decoder linear layers named *_proj inside numbered "
            "layers; kore-ray cannot tell which layers to constrain"
        )
    valid = sorted({name.rpartition(".")[2] for name in linears})
    if include is not None:
        unknown = sorted(set(include) - set(valid))
        if unknown:
            raise ModelError(
                f"unknown target module name(s) {unknown} for {type(model).__name__}; "
                f"valid: {valid}"
            )

    groups: dict[str, list[str]] = {}  # key -> member names, in order of first appearance
    for name in linears:
        parent, _, short = name.rpartition(".")
        siblings = next((s for s in SHARED_INPUT if short in s), (short,))
        present = [s for s in siblings if f"{parent}.{s}" in linears]
        key = f"{parent}.{'+'.join(present)}"
        if include is None or short in include:
            groups.setdefault(key, []).append(name)

    result = []
    for key, names in groups.items():
        widths = {linears[name].in_features for name in names}
        if len(widths) != 1:
            raise ModelError(
                f"{type(model).__name__}: {names} are grouped as sharing one input but have "
                f"different in_features {sorted(widths)}"
            )
        result.append(TargetGroup(key, tuple(names), widths.pop()))
    return result


def target_module_names(groups: list[TargetGroup]) -> list[str]:
    """Full module names of all groups, flat: what PEFT's `target_modules` takes."""
    return [name for group in groups for name in group.modules]
