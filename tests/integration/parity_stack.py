"""A worker process on the session broker for the parity tests: unique topics and group, a SQLite ledger in
the test's tmp dir, shadow mode (no Stripe call is ever made), a fast parity refresh, a known internal secret.

Processes are started and stopped by PID; every one left running is stopped at teardown.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from infra.devkit.broker import free_port
from infra.devkit.procs import terminate
from infra.devkit.simulator import Fleet
from infra.kafka_io import publish_sync
from infra.settings import child_env
from models.parity import sign_request
from models.policy import OrgPolicy
from sinks.ledger import Ledger
from sinks.parity import ParityStore
from sinks.schema import make_engine, migrate

SECRET = "parity-test-secret"
H = 3600


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class ParityStack:
    bootstrap: str
    prefix: str
    env: dict[str, str]
    ledger: Ledger
    store: ParityStore
    web_port: int
    logdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"worker-{len(self.procs)}.log").open("wb")
        p = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(p)
        return p

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"worker exited with {p.returncode}:\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; counters={self.ledger.counters()}\n{self.logs()}")

    def logs(self, lines: int = 40) -> str:
        out = []
        for f in sorted(self.logdir.glob("worker-*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def log_text(self) -> str:
        return "\n".join(f.read_text(errors="replace") for f in sorted(self.logdir.glob("worker-*.log")))

    # -- publishing -----------------------------------------------------------------------------

    def publish_fleet(self, fleet: Fleet, ticks: list | None = None) -> int:  # type: ignore[type-arg]
        """Policies, ticks (``ticks`` or the fleet's) and the fleet's scale events; returns the scale messages."""
        from infra.devkit.simulator import encode_messages

        start = fleet.spec.start
        pols = [
            (
                o.org_id.encode(),
                OrgPolicy.model_validate(
                    {"org_id": o.org_id, "plan": o.plan, "billing_mode": o.billing_mode, "effective_at": start - 86400}
                ).to_json(),
            )
            for o in fleet.orgs
        ]
        publish_sync(self.bootstrap, self.topic("org-policy"), pols)
        publish_sync(self.bootstrap, self.topic("usage-ticks"), encode_messages(ticks or fleet.ticks, fleet.spec))
        scale = fleet.scale_messages()
        publish_sync(self.bootstrap, self.topic("sandbox-scale-events"), scale)
        return len(scale)

    def wait_parity(self, unique_ticks: int, scale_records: int, timeout: float = 60) -> None:
        """Until every tick and scale record is in the ledger and a refresh has run since."""
        marks: dict[str, int] = {}

        def ingested() -> bool:
            c = self.ledger.counters()
            if c.get("ticks.ingested", 0) >= unique_ticks and c.get("scale.read", 0) >= scale_records:
                marks["at"] = int(time.time() * 1000)
                return True
            return False

        self.wait(ingested, timeout, "ticks and scale events")
        self.wait(lambda: self.store.state().get("refreshed_ms", 0) > marks["at"], timeout, "a parity refresh")

    # -- http -----------------------------------------------------------------------------------

    def get(self, path_qs: str, headers: dict[str, str] | None = None) -> Response:
        req = urllib.request.Request(f"http://127.0.0.1:{self.web_port}{path_qs}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return Response(r.status, dict(r.headers.items()), r.read())
        except urllib.error.HTTPError as e:
            body = e.read()
            e.close()
            return Response(e.code, dict(e.headers.items()), body)

    def signed_get(self, path_qs: str, *, ts: int | None = None, secret: str = SECRET) -> Response:
        t = int(time.time()) if ts is None else ts
        return self.get(path_qs, {"X-Timestamp": str(t), "X-Signature": sign_request(secret.encode(), t, path_qs)})

    def web_up(self) -> bool:
        try:
            return self.get("/healthz").status == 200
        except OSError:
            return False


@contextmanager
def parity_stack(kafka_bootstrap: str, tmp_path: Path, **extra_env: str) -> Iterator[ParityStack]:
    prefix = f"p{uuid.uuid4().hex[:8]}."
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(db_url)
    migrate(engine)
    web_port = free_port()
    env = child_env(
        {
            "EDGEBILL_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "EDGEBILL_KAFKA_TOPIC_PREFIX": prefix,
            "EDGEBILL_KAFKA_GROUP_ID": f"g-{prefix}",
            "EDGEBILL_DATABASE_URL": db_url,
            "EDGEBILL_STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}",  # never called: shadow mode
            "EDGEBILL_WEB_PORT": str(web_port),
            "EDGEBILL_WEB_HOST": None,
            "EDGEBILL_WEB_INTERNAL_SECRET": SECRET,
            "EDGEBILL_SHADOW": None,
            "EDGEBILL_BILL_FROM": None,
            "EDGEBILL_PRO_BILLING_AUTHORITY": None,
            "EDGEBILL_PARITY_REFRESH_INTERVAL": "0.5",
            **extra_env,
        }
    )
    stack = ParityStack(
        kafka_bootstrap,
        prefix,
        env,
        Ledger(engine),
        ParityStore(engine, bucket_seconds=H),
        web_port,
        tmp_path,
    )
    try:
        yield stack
    finally:
        for p in stack.procs:
            terminate(p, grace=15)
        engine.dispose()
