"""`ray job submit --working-dir . -- python jobs/init.py --config CONFIG.yaml`: same as `kore init`."""

from _entry import run

if __name__ == "__main__":
    run("init")
