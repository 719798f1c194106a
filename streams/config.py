"""The worker's configuration, as small frozen objects built at the application edge.

Nothing in ``streams/`` reads settings or the environment: :func:`infra.runtime.worker_config` turns the
``EDGEBILL_*`` settings into a :class:`WorkerConfig` and passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from models.billing import Authority
from models.topics import (
    TOPIC_CONTROL,
    TOPIC_DLQ,
    TOPIC_POLICY,
    TOPIC_POLICY_DLQ,
    TOPIC_SCALE_DLQ,
    TOPIC_SCALE_EVENTS,
    TOPIC_TICKS,
    TOPIC_WEBHOOKS,
)
from sinks.ledger import CloseConfig
from sinks.parity import ParityConfig
from sinks.reconcile.run import ReconcileConfig

__all__ = ["KafkaConfig", "Topics", "WebConfig", "WebLimits", "WebhookConfig", "WorkerConfig"]

_BODY_TIMEOUT_S = 10.0  # seconds a body a route reads has to arrive (the web server's and the webhook receiver's)


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic names in use, with the prefix applied."""

    ticks: str
    dlq: str
    policy: str
    policy_dlq: str
    scale: str
    scale_dlq: str
    alerts: str
    webhooks: str
    control: str

    @classmethod
    def with_prefix(cls, prefix: str, alerts: str) -> Topics:
        return cls(
            ticks=prefix + TOPIC_TICKS,
            dlq=prefix + TOPIC_DLQ,
            policy=prefix + TOPIC_POLICY,
            policy_dlq=prefix + TOPIC_POLICY_DLQ,
            scale=prefix + TOPIC_SCALE_EVENTS,
            scale_dlq=prefix + TOPIC_SCALE_DLQ,
            alerts=prefix + alerts,
            webhooks=prefix + TOPIC_WEBHOOKS,
            control=prefix + TOPIC_CONTROL,
        )


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    """How the worker talks to Kafka (timings in seconds)."""

    servers: str
    group_id: str
    partitions: int
    replication_factor: int
    session_timeout: float
    heartbeat_interval: float
    rebalance_timeout: float
    request_timeout: float
    max_fetch_bytes: int


@dataclass(frozen=True, slots=True)
class WebLimits:
    """What one client may cost the worker's HTTP server (:mod:`streams.web_server` enforces them).

    ``max_line_bytes``: the request line; ``max_field_bytes``: one header's name or value; ``max_headers``:
    headers per request (each over: 400). ``idle_timeout_s``: a connection must send a complete request head
    within this long of opening or of its last answer, else it is closed (a slow or silent client).
    ``body_timeout_s``: a body a route reads must arrive within this long of its head (else 408).
    ``body_bytes``: the largest body per path (a body declared larger, or any body on another path: 413).
    ``max_connections``: open connections; a new one beyond it closes the longest-idle connections back
    below it, or is answered 503 when every connection has a request in progress. ``metrics_per_org``:
    ``/metrics`` series per org (their ids and differences); off, ``/metrics`` names no org and its series
    are bounded.
    """

    max_line_bytes: int = 8190
    max_field_bytes: int = 8190
    max_headers: int = 64
    idle_timeout_s: float = 15.0
    body_timeout_s: float = _BODY_TIMEOUT_S
    body_bytes: tuple[tuple[str, int], ...] = ()
    max_connections: int = 256
    metrics_per_org: bool = False

    def body_limit(self, path: str) -> int:
        """The largest body a request to ``path`` may carry (0: none)."""
        return dict(self.body_bytes).get(path, 0)


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The worker's web server and what its pages need."""

    host: str
    port: int
    internal_secret: bytes  # signs /internal/* requests and dashboard links
    signature_tolerance_s: int
    dashboard_token_ttl_s: int
    gate_hours: Decimal  # clean parity hours the cutover asks for (the gate shown on the dashboard)
    limits: WebLimits = field(default_factory=WebLimits)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """The Stripe webhook receiver and agent.

    ``secret``: the endpoint's signing secret (``whsec_…``); ``tolerance_s``: how old a signature may be;
    ``max_body_bytes``: larger bodies are refused unread; ``body_timeout_s``: the body must arrive within this
    long (else 408: a slow client holds no receiver); ``append_timeout_s``: how long the receiver waits for
    the topic to acknowledge an event before answering 503; ``retry_interval_s``: how often events not yet
    applied (a transient failure, a crash) are tried again.
    """

    secret: str = field(repr=False)
    tolerance_s: int = 300
    max_body_bytes: int = 256 * 1024
    body_timeout_s: float = _BODY_TIMEOUT_S
    append_timeout_s: float = 10.0
    retry_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything the worker's agents, timers and pages need, explicitly."""

    kafka: KafkaConfig
    topics: Topics
    close: CloseConfig
    parity: ParityConfig
    web: WebConfig
    webhooks: WebhookConfig
    authority: Authority
    close_interval_s: float
    send_interval_s: float
    parity_refresh_interval_s: float
    progress_stale_after_ms: int
    # The scheduled reconciliation with Stripe (leader; never in shadow): its rules' settings and how often.
    reconcile: ReconcileConfig | None = None
    reconcile_interval_s: float = 0.0
    # Retention (leader): days a settled bucket keeps its per-tick data (0 = off), and how often it runs.
    retention_days: int = 0
    retention_interval_s: float = 600.0

    @property
    def bucket_seconds(self) -> int:
        return self.close.bucket_seconds

    @property
    def shadow(self) -> bool:
        """The environment's bootstrap SHADOW (the state in force may differ: ``Deps.cutover``)."""
        return self.close.shadow
