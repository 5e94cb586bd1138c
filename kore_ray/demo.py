"""`kore demo`: the whole injection on the embedded default, as `kore inject configs/demo.yaml`.

Gemma 3 270M (from the package registry), a local Ray, the shipped demo data: 60 fictional
knowledge items to inject, 123 facts the model knows to keep. Data paths in the demo config
are relative to the repository, so the demo runs from any directory; the run directory is
relative to where it is started.
"""

from __future__ import annotations

from pathlib import Path

from kore_ray.config import load_config
from kore_ray.errors import InputError
from kore_ray.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def _repo_paths(config_path: Path) -> list[str]:
    """Overrides that anchor the config's relative data paths at the repository."""
    cfg = load_config(config_path)
    out = []
    for field, value in cfg.data.model_dump().items():
        if value and not Path(value).is_absolute() and not Path(value).exists() and (REPO / value).exists():
            out.append(f"data.{field}={REPO / value}")
    return out


def run_demo(config_path=None, overrides=()) -> int:
    from kore_ray.pipeline import run_inject

    path = Path(config_path or DEMO_CONFIG)
    if not path.is_file():
        raise InputError(f"demo config not found: {path} (run from a checkout of kore-ray, or pass --config)")
    cfg = load_config(path, [*_repo_paths(path), *overrides])
    results = run_inject(cfg)
    report = RunDir(cfg.run_dir).report
    base = results["base"]
    print(f"\nkore demo: {len(results['methods'])} methods, "
          f"{base['counts']['retention_known']} known facts measured for retention.")
    print(f"kore demo: report at {report.resolve()}")
    return 0
