"""cluster.yaml passes the cluster launcher's own schema (what `ray up` runs first), so a
user's `ray up` does not fail on a typo of ours; and that check does catch typos."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def _validate(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))  # defaults filled, as `ray up` does


def test_cluster_yaml_is_a_valid_launcher_config():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate(config)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_the_local_autoscaling_cluster_config_is_valid():
    # scripts/local_cluster.yaml (local_cluster.sh): the fake multi-node provider's
    # defaults file is not in the wheel, so it is validated as written, every field present
    config = yaml.safe_load((ROOT / "scripts" / "local_cluster.yaml").read_text())
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("typo", ["min_worker", "resource"])
def test_a_typo_in_a_node_type_is_refused(typo):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    node = config["available_node_types"]["cpu_pool"]
    real = "min_workers" if typo == "min_worker" else "resources"
    node[typo] = node.pop(real)
    with pytest.raises(jsonschema.ValidationError):
        _validate(config)
