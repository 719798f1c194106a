"""A worker process on the session broker for the parity tests: unique topics and group, a SQLite ledger in
the test's tmp dir, shadow mode (no Stripe call is ever made), a fast parity refresh, a known internal secret.

Processes run under the dev kit's worker harness: started and stopped by PID; every one left running is
stopped at teardown.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.devkit.broker import free_port
from infra.devkit.simulator import Fleet
from infra.devkit.stack import WorkerStack
from infra.kafka_io import publish_sync
from models.parity import sign_request
from models.policy import OrgPolicy
from sinks.parity import ParityStore

SECRET = "parity-test-secret"
H = 3600


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class ParityStack(WorkerStack):
    """The worker harness plus the parity store on the stack's ledger, fleet publishing and HTTP helpers."""

    def __init__(self, **harness: Any) -> None:
        super().__init__(**harness)
        self.store = ParityStore(self.engine, bucket_seconds=H)

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
        return self.healthy()


@contextmanager
def parity_stack(kafka_bootstrap: str, tmp_path: Path, **extra_env: str) -> Iterator[ParityStack]:
    prefix = f"p{uuid.uuid4().hex[:8]}."
    with ParityStack(
        bootstrap=kafka_bootstrap,
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        logdir=tmp_path,
        topic_prefix=prefix,
        env={
            "EDGEBILL_STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}",  # never called: shadow mode
            "EDGEBILL_WEB_HOST": None,
            "EDGEBILL_WEB_INTERNAL_SECRET": SECRET,
            "EDGEBILL_SHADOW": None,
            "EDGEBILL_BILL_FROM": None,
            "EDGEBILL_PRO_BILLING_AUTHORITY": None,
            "EDGEBILL_PARITY_REFRESH_INTERVAL": "0.5",
            **extra_env,
        },
    ) as stack:
        yield stack
