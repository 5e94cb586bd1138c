"""`ray job submit --working-dir . -- python jobs/evaluate.py --config CONFIG.yaml`: same as `kore evaluate`."""

from _entry import run

if __name__ == "__main__":
    run("evaluate")
