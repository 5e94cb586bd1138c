"""scripts/gpu_check.sh without a GPU: its argument parsing and the dry-run plan.

The GPU steps themselves need a CUDA machine (README, "GPU readiness"); here the script must
refuse cleanly without one, and its dry-run must build every step's config as it would run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_dry_run_plans_every_step_on_gpus(tmp_path):
    out = tmp_path / "plan.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--run-dir", str(tmp_path / "run")]) == 0
    plan = json.loads(out.read_text())
    assert list(plan["steps"]) == list(gpu_check.STEPS) and plan["dry_run"]
    ddp = plan["steps"]["train_ddp"]["config"]["train_ddp"]["train"]
    assert ddp["use_gpu"] and ddp["strategy"] == "ddp" and ddp["learning_rate"] == 1e-3
    fsdp = plan["steps"]["train_fsdp"]["config"]["train_fsdp"]["train"]
    assert fsdp["strategy"] == "fsdp" and fsdp["run_name"] == "gpu-check-fsdp"
    assert plan["steps"]["covariance"]["config"]["covariance"]["covariance"]["use_gpu"] is True
    assert plan["steps"]["covariance"]["config"]["covariance_cpu"]["covariance"]["use_gpu"] is False
    assert plan["steps"]["serve"]["config"]["serve"]["serve"]["use_gpu"] is True


def test_only_selects_steps_and_unknown_steps_are_refused(tmp_path, capsys):
    out = tmp_path / "plan.json"
    gpu_check.main(["--dry-run", "--only", "env,serve", "--out", str(out)])
    assert list(json.loads(out.read_text())["steps"]) == ["env", "serve"]
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--only", "train,serve"])
    assert e.value.code == 2 and "unknown steps ['train']" in capsys.readouterr().err


def test_without_a_gpu_the_script_says_so_and_fails():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run scripts/gpu_check.sh itself")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--only", "env"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "no CUDA GPU" in done.stderr
