"""`serve run serving/config.yaml` (from the repository root): the Serve application builder.

The same app as `kore serve`; its settings come from a pipeline config plus overrides, given as
the application's `args` in the Serve config. Deployment options in the Serve config
(autoscaling, max_ongoing_requests) override the pipeline config's `serve` section.
"""

from kore_ray.config import load_config
from kore_ray.serve import build_app as _build


def build_app(args: dict):
    """args: {"config": pipeline YAML or null, "set": ["section.key=value", ...]}."""
    return _build(load_config(args.get("config"), args.get("set") or []))
