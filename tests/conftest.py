"""Shared fixtures. The embedded Gemma is converted once per machine (cached in ~/.cache/kore-ray)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gemma_dir():
    from kore_ray.models.gemma import embedded_gemma_path

    return embedded_gemma_path()


@pytest.fixture(scope="session")
def gemma(gemma_dir):
    """(model, tokenizer) of the real embedded Gemma 3 270M in float32."""
    from kore_ray.models import load_model

    return load_model(str(gemma_dir))
