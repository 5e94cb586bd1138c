"""Shared by the job scripts: make the working directory importable and run one `kore` stage."""

import sys
from pathlib import Path


def run(stage: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kore_ray.cli import main

    sys.exit(main([stage, *sys.argv[1:]]))
