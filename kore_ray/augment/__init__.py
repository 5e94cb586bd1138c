"""KORE-AUGMENTATION: each knowledge item becomes its knowledge tree of training conversations.

`run_augment(cfg, progress=True) -> dict` is the stage (`kore augment`, `jobs/augment.py`);
`templates`, `extractive`, `spans`, `grounding`, `self_qa`, `llm` and `dedup` are its
functional core, `augment_stage` the Ray Data shell.
"""

from kore_ray.augment.augment_stage import run_augment

__all__ = ["run_augment"]
