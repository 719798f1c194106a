"""Child processes the CLI, the demo, the benchmarks and the tests start (workers, the local Stripe)."""

from __future__ import annotations

import signal
import subprocess

__all__ = ["terminate"]


def terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Stop ``proc`` as an operator would: SIGTERM (the worker finishes its batch, commits and leaves its
    group), up to ``grace`` seconds to exit, then SIGKILL. Returns once it is gone; nothing if it already
    exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
