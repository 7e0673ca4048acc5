"""Put this folder on PYTHONPATH to make rank 1 of a dschat launch die abruptly (exit code 3, as on
a GPU fault or an out-of-memory kill) once the file named by DSCHAT_TEST_DIE_WHEN exists (e.g. the
run's metrics.jsonl: rank 0 has logged a training step). Runs at interpreter start in every process
of the launch; only the worker of rank 1 acts. Used by tests/integration/test_multirank.py and
benchmarks/gpu_multirank_check.sh."""
import os
import threading
import time

_cmdline = open("/proc/self/cmdline", "rb").read().replace(b"\0", b" ")  # argv: not set yet
if os.environ.get("RANK") == "1" and b"dschat_cli.worker" in _cmdline \
        and os.environ.get("DSCHAT_TEST_DIE_WHEN"):
    _target = os.environ["DSCHAT_TEST_DIE_WHEN"]

    def _die():
        while not os.path.exists(_target):
            time.sleep(0.05)
        os._exit(3)

    threading.Thread(target=_die, daemon=True).start()
