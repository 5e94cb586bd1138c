"""The console: Ray's and vLLM's noise stays in Ray's log files, kore's own lines get through."""

import os
import subprocess
import sys
import textwrap

from kore_ray.logs import NOISE, forwarded_lines


def test_noise_lines_are_dropped_and_real_lines_kept():
    noise = [
        "[2026-12-06 13:37:02,340 E 2648 2648] core_worker.cc:2465: Actor with class name: "
        "'MapWorker(MapBatches(AskWorker))' and ID: 'f8' has constructor arguments in the object "
        "store and max_restarts > 0. If the arguments ...",
        "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
        "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:01<00:00,  1.80s/it]",
        "Task ServeController.graceful_shutdown failed. There are infinite retries remaining",
        "   ",
    ]
    real = [
        "kore train: step 3/60 loss 2.2002 lr 1.00e-03 110 tokens/s",
        "Traceback (most recent call last):",
        "RuntimeError: CUDA out of memory",
        "kore augment: 30 items -> 455 conversations",
    ]
    assert forwarded_lines(noise + real) == real
    assert all(NOISE.search(line) for line in noise)


def test_driver_console_after_quiet_driver():
    """A real local Ray: a worker's noise is not forwarded, its own line and error are; Serve's
    start-up INFO lines are not printed; --verbose (KORE_VERBOSE=1) shows everything."""
    script = textwrap.dedent("""
        import ray
        from kore_ray.logs import quiet_driver
        quiet_driver()
        ray.init(num_cpus=1, include_dashboard=False)

        @ray.remote
        def work():
            import sys
            print("Triton is installed, but doesn't include CPU backend. Disabling Triton.")
            print("kore work: done", flush=True)
            print("a real warning", file=sys.stderr, flush=True)

        ray.get(work.remote())
        import time; time.sleep(2)  # forwarded output arrives asynchronously
        from ray import serve
        serve.start()
        serve.shutdown()
        ray.shutdown()
    """)

    def run(verbose: bool) -> str:
        env = {k: v for k, v in os.environ.items() if k != "KORE_VERBOSE"}
        if verbose:
            env["KORE_VERBOSE"] = "1"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=240, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    quiet = run(verbose=False)
    assert "kore work: done" in quiet and "a real warning" in quiet
    assert "Triton is installed" not in quiet
    assert "Started Serve" not in quiet and "graceful_shutdown" not in quiet
    loud = run(verbose=True)
    assert "Triton is installed" in loud
