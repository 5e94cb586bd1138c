"""`ray job submit --working-dir . -- python jobs/covariance.py --config CONFIG.yaml`: same as `kore covariance`."""

from _entry import run

if __name__ == "__main__":
    run("covariance")
