"""Fine-tuning from the KORE-CONSTRAINT initialisation on Ray Train V2.

  steps.py       the functional core: assistant-token loss, optimizer, LR schedule, one step
  data.py        conversations -> fixed step schedule -> per-rank shards -> (micro-)batches
  checkpoint.py  trainable weights + optimizer/schedule state, for any strategy and worker count
  loop.py        the per-worker recipe (train_loop_per_worker)
  train_stage.py the driver: run_train(cfg, method) -> adapter directory (Ray Train)
  export_stage.py  `kore export`: a checkpoint as the adapter the server loads

Ray 2.60 enables Train V2 by default (RAY_TRAIN_V2_ENABLED); it is pinned here, before
anything imports ray.train, so a stray environment cannot switch this package to the V1 API.
"""

import os

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

__all__ = ["run_train"]


def __getattr__(name: str):  # the driver pulls in Ray Train: only on first use
    if name == "run_train":
        from kore_ray.train.train_stage import run_train

        return run_train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
