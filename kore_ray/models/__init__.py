"""Models: loading (local, object store, embedded Gemma), tiny test models, target layers."""

from kore_ray.models.loading import load_model, resolve_model_path

__all__ = ["load_model", "resolve_model_path"]
