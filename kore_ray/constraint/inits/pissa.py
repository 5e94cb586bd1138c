"""PEFT's PiSSA: A and B start at the principal singular directions of each weight
(B0 A0 = U_r S_r V_r^T, W_res = W - B0 A0), both trained. It reads no retention data: the
baseline that adapts fastest where the weights are largest, the opposite of KORE's choice.
The rewritten base is captured as factors (adapters.capture_factors), so it saves, reloads and
exports like KORE (rank 2r: [B, -B0] [A; A0]). Randomised SVD (16 subspace iterations, seeded
by the init stage) keeps a 7B init to minutes; the exact SVD is PEFT's "pissa".
"""

from peft import get_peft_model

from kore_ray.constraint.adapters import _lora_config, _module_ranks, capture_factors
from kore_ray.run_dir import model_fingerprint


def build(model, method, groups, store, rank, match_kore=False):
    fingerprint = model_fingerprint(model)  # of the base, before PiSSA rewrites it
    config = _lora_config(_module_ranks(groups, rank), init_lora_weights="pissa_niter_16")
    return capture_factors(get_peft_model(model, config), method.name, fingerprint)
