"""Shared fixtures. The embedded Gemma is converted once per machine (cached in ~/.cache/kore-ray)."""

import os
import socket
import subprocess
import sys
import time

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


@pytest.fixture
def s3(monkeypatch):
    """A real S3 API (moto) on loopback: (boto3 client, pyarrow.fs URI query, server process)."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    yield boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}"), \
        f"?endpoint_override=127.0.0.1:{port}&scheme=http", proc
    proc.terminate()
    proc.wait(timeout=10)


def pytest_collection_modifyitems(config, items):
    """Cluster tests first: starting and stopping the local multi-node cluster runs
    `ray stop --force`, which would also stop the session's `ray_local` Ray."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)
