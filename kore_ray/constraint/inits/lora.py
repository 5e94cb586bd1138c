"""PEFT's default LoRA (A random, B zero). With match_kore, `rank` is a KORE rank and LoRA gets
the rank with the same trainable-parameter count (the KORE paper's comparison)."""

from collections.abc import Mapping

from peft import get_peft_model

from kore_ray.constraint.adapters import _lora_config, _module_ranks, matched_lora_rank


def build(model, method, groups, store, rank, match_kore=False):
    if match_kore and isinstance(rank, Mapping):  # per group, like the KORE ranks
        rank = {g.key: matched_lora_rank(model, [g], rank[g.key]) for g in groups}
    elif match_kore:  # one rank overall
        rank = matched_lora_rank(model, groups, rank)
    return get_peft_model(model, _lora_config(_module_ranks(groups, rank), init_lora_weights=True))
