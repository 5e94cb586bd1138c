"""`ray job submit --working-dir . -- python jobs/augment.py --config CONFIG.yaml`: same as `kore augment`."""

from _entry import run

if __name__ == "__main__":
    run("augment")
