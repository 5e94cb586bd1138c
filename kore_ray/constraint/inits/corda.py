"""PEFT's CorDA in knowledge-preserved mode, fed with OUR covariance.

PEFT's preprocess_corda reads `covariance_file` ({module name: covariance}) when it exists
instead of running its own data pass, so the same retention covariance serves KORE and CorDA.
CorDA's covariance is a mean over forward passes; the store's sum over samples is divided by
its sample count to match (exactly PEFT's when batches hold one sample and
normalize="sample_max"). CorDA rewrites the base weights: its init is captured as factors
(adapters.capture_factors) so it saves, reloads and exports like KORE.
"""

import os
import tempfile

import torch
from peft import get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda

from kore_ray.constraint.adapters import _check_store, _lora_config, _module_ranks, capture_factors


def build(model, method, groups, store, rank, match_kore=False):
    fingerprint = _check_store(model, store, groups, method.name)
    with tempfile.TemporaryDirectory(prefix="kore-corda-") as tmp:
        cov_file = os.path.join(tmp, "covariance.pt")
        samples = max(store.samples, 1)
        torch.save({m: store.sums[g.key] / samples for g in groups for m in g.modules}, cov_file)
        config = _lora_config(
            _module_ranks(groups, rank),
            init_lora_weights="corda",
            corda_config=CordaConfig(covariance_file=cov_file, corda_method="kpm"),
        )
        preprocess_corda(model, config)
        peft_model = get_peft_model(model, config)
    return capture_factors(peft_model, method.name, fingerprint)
