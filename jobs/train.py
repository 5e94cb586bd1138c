"""`ray job submit --working-dir . -- python jobs/train.py --config CONFIG.yaml`: same as `kore train`."""

from _entry import run

if __name__ == "__main__":
    run("train")
