"""The dev kit's worker harness, driven with a stand-in worker (a few lines of Python: no broker needed).

The stand-in serves ``/healthz`` on its ``EDGEBILL_WEB_PORT``, prints the ``EDGEBILL_*`` part of its
environment as one JSON line, exits with ``FAKE_EXIT`` at once when that is set, and answers SIGTERM with
exit code ``FAKE_TERM_CODE`` (0 by default, as the real worker does after a clean shutdown).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.devkit.stack import Child, WaitTimeout, WorkerExited, WorkerStack, wait_until

FAKE_WORKER = r"""
import http.server, json, os, signal, sys, threading
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith("EDGEBILL_")}), flush=True)
if os.environ.get("FAKE_EXIT"):
    sys.exit(int(os.environ["FAKE_EXIT"]))
signal.signal(signal.SIGTERM, lambda *_: os._exit(int(os.environ.get("FAKE_TERM_CODE", "0"))))

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

srv = http.server.HTTPServer(("127.0.0.1", int(os.environ["EDGEBILL_WEB_PORT"])), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
print("fake worker up", flush=True)
signal.pause()
"""


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[WorkerStack]:
    with WorkerStack(
        bootstrap="127.0.0.1:9",
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        logdir=tmp_path / "logs",
        topic_prefix="h1.",
        env={"EDGEBILL_SHADOW": "true", "EDGEBILL_WEB_HOST": None},
        argv=[sys.executable, "-c", FAKE_WORKER],
        stop_grace=5,
    ) as stack:
        yield stack


def _env_of(worker: Child) -> dict[str, str]:
    wait_until(lambda: worker.text().startswith("{"), 10, f"{worker.name} to print its environment", step=0.05)
    env: dict[str, str] = json.loads(worker.text().splitlines()[0])
    return env


def test_workers_get_the_stacks_settings_their_overrides_and_their_own_web_ports(harness: WorkerStack) -> None:
    first = harness.start_worker()
    second = harness.start_worker({"EDGEBILL_GRACE_SECONDS": "7", "EDGEBILL_SHADOW": None})
    harness.wait(lambda: harness.healthy(first) and harness.healthy(second), 20, "both web servers")
    assert first.port == harness.web_port and second.port not in (None, harness.web_port)
    env = _env_of(first)
    kafka = {k: v for k, v in env.items() if k.startswith("EDGEBILL_KAFKA_")}
    assert kafka == {
        "EDGEBILL_KAFKA_BOOTSTRAP": "127.0.0.1:9",
        "EDGEBILL_KAFKA_TOPIC_PREFIX": "h1.",
        "EDGEBILL_KAFKA_GROUP_ID": "g-h1.",
    }
    assert env["EDGEBILL_DATABASE_URL"] == harness.database_url and env["EDGEBILL_SHADOW"] == "true"
    assert env["EDGEBILL_WEB_PORT"] == str(harness.web_port) and "EDGEBILL_GRACE_SECONDS" not in env
    env2 = _env_of(second)
    assert env2["EDGEBILL_GRACE_SECONDS"] == "7" and "EDGEBILL_SHADOW" not in env2
    assert env2["EDGEBILL_WEB_PORT"] == str(second.port)
    assert harness.topic("usage-ticks") == "h1.usage-ticks"
    assert harness.alive() == [first, second] and harness.procs == [first, second]


def test_killed_and_stopped_workers_are_expected_but_an_exit_nobody_asked_for_fails_the_wait(
    harness: WorkerStack,
) -> None:
    a, b = harness.start_worker(), harness.start_worker()
    harness.wait(lambda: harness.healthy(a) and harness.healthy(b), 20, "both web servers")
    harness.kill9(a)
    harness.stop(b)
    assert (a.ended, b.ended, a.returncode, b.returncode) == ("killed", "stopped", -9, 0)
    assert harness.crashed() == [] and harness.alive() == []
    assert harness.wait(lambda: True, 1, "nothing") > 0
    # A caller's own SIGKILL is a simulated crash too, not a worker dying by itself.
    c = harness.start_worker()
    harness.wait(lambda: harness.healthy(c), 20, "the third web server")
    os.kill(c.pid, signal.SIGKILL)
    assert c.wait(timeout=10) == -signal.SIGKILL and harness.crashed() == []

    harness.start_worker({"FAKE_EXIT": "3"})
    with pytest.raises(WorkerExited, match=r"worker-3 exited with 3 while waiting for godot") as err:
        harness.wait(lambda: False, 20, "godot")
    assert "--- worker-3.log" in str(err.value) and "EDGEBILL_KAFKA_BOOTSTRAP" in str(err.value)
    # A caller that restarts workers itself can wait on regardless.
    with pytest.raises(WaitTimeout):
        harness.wait(lambda: False, 0.3, "godot", fail_on_exit=False)


def test_a_worker_that_crashes_while_being_stopped_is_reported(harness: WorkerStack) -> None:
    w = harness.start_worker({"FAKE_TERM_CODE": "2"})
    harness.wait(lambda: harness.healthy(w), 20, "the web server")
    harness.stop(w)
    assert w.returncode == 2 and harness.crashed() == [w]


def test_a_timeout_names_the_reason_with_the_ledger_counters_and_the_log_tails(harness: WorkerStack) -> None:
    w = harness.start_worker()
    harness.wait(lambda: "fake worker up" in w.text(), 20, "the stand-in to come up")
    with pytest.raises(WaitTimeout) as err:
        harness.wait(lambda: False, 0.3, "the moon", step=0.05)
    text = str(err.value)
    assert "waiting for the moon; counters={}" in text
    assert "--- worker-0.log" in text and "fake worker up" in text
    assert "fake worker up" in harness.log_text() and harness.logs(1).endswith("fake worker up")


def test_restart_keeps_the_web_port_and_an_exit_it_replaced_is_handled(harness: WorkerStack) -> None:
    w = harness.start_worker()
    harness.wait(lambda: harness.healthy(w), 20, "the web server")
    w2 = harness.restart(w)  # SIGKILL, then the same port again
    assert w.ended == "killed" and w2.port == w.port == harness.web_port
    harness.wait(lambda: harness.healthy(w2), 20, "the restarted web server")

    dead = harness.start_worker({"FAKE_EXIT": "1"})
    wait_until(lambda: dead.poll() is not None, 10, "the stand-in to exit")
    assert harness.crashed() == [dead]
    again = harness.restart(dead)
    assert dead.ended == "replaced" and harness.crashed() == [] and again.port == dead.port
    harness.stop(again)


def test_close_stops_every_worker_still_running(tmp_path: Path) -> None:
    stack = WorkerStack(
        bootstrap="127.0.0.1:9",
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        logdir=tmp_path,
        argv=[sys.executable, "-c", FAKE_WORKER],
    )
    workers = [stack.start_worker(), stack.start_worker()]
    stack.wait(lambda: all(stack.healthy(w) for w in workers), 20, "both web servers")
    assert "EDGEBILL_KAFKA_TOPIC_PREFIX" not in stack.env and "EDGEBILL_KAFKA_GROUP_ID" not in stack.env
    stack.close(grace=5)
    assert [w.returncode for w in workers] == [0, 0] and stack.crashed() == []


def test_wait_until_returns_the_moment_and_names_what_timed_out() -> None:
    assert wait_until(lambda: True, 1, "now") > 0
    with pytest.raises(WaitTimeout, match=r"timed out after 0s waiting for never"):
        wait_until(lambda: False, 0.2, "never", step=0.05)
