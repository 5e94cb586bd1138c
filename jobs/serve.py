"""`ray job submit --working-dir . -- python jobs/serve.py --config CONFIG.yaml`: same as `kore serve`."""

from _entry import run

if __name__ == "__main__":
    run("serve")
