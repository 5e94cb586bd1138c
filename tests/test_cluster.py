"""The pipeline's distributed stages on a real multi-raylet, autoscaling cluster on one machine.

Runs benchmarks/cluster.py (its own process: it is a driver of the local cluster that
scripts/local_cluster.sh starts) on a tiny Llama: covariance actors on 2 nodes, 2 training
workers on 2 nodes, and a node lost mid-training. The augmentation autoscaling, `ray job
submit` and 1-worker comparison checks of the same script take ~10 more minutes and are left
to the benchmark (tests/test_train_ray.py compares 2 workers with 1 on one node). Select with `-m cluster`; conftest runs these tests first, since the
cluster's start and stop (`ray stop --force`) would take down the session's local Ray.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]


def test_covariance_training_and_a_lost_node_on_a_multi_node_cluster():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cluster.py"),
         "--checks", "covariance,train,node_loss"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["covariance_nodes"] == 2 and result["covariance_rel_err"] < 1e-10
    assert result["train_nodes"] == 2 and result["train_steps"] == 6  # gloo across two raylets
    assert result["resumed_after_node_loss"] and result["node_replaced"]
    assert result["steps_lost_or_repeated"] == 0
    assert result["adapter_rel_diff"] < 1e-4, result["adapter_rel_diff"]
