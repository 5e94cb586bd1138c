"""`ray job submit --working-dir . -- python jobs/continual.py --config CONFIG.yaml`: same as `kore continual`."""

from _entry import run

if __name__ == "__main__":
    run("continual")
