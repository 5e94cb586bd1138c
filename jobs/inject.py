"""`ray job submit --working-dir . -- python jobs/inject.py --config CONFIG.yaml`: same as `kore inject`."""

from _entry import run

if __name__ == "__main__":
    run("inject")
