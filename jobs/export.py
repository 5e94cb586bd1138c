"""`ray job submit --working-dir . -- python jobs/export.py --config CONFIG.yaml`: same as `kore export`."""

from _entry import run

if __name__ == "__main__":
    run("export")
