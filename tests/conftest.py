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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (starting Ray costs seconds).

    4 logical CPUs on a 2-core machine: actor pools and Serve need more slots than cores, and
    the tests' work is small.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
