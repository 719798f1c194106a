"""Settings: one frozen pydantic-settings class per area, all prefixed ``EDGEBILL_``.

This is the only module that reads ``os.environ``. Everything else receives a
:class:`Settings` object (or one of its parts) explicitly.

``load_settings()`` builds every area, collects *all* validation problems and the
cross-area interlocks (see :func:`interlock_problems`), and raises one
:class:`~models.errors.ConfigError` listing them, so an operator fixes a config in one pass.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from models.billing import Authority
from models.cutover import CutoverState, is_explicit_shadow_value, parse_shadow
from models.cutover import interlock_problems as cutover_interlocks
from models.errors import ConfigError
from models.parity import SIGNATURE_TOLERANCE_SECONDS, AlertRule
from models.retention import DEFAULT_RETENTION_DAYS, retention_problem
from models.topics import TOPIC_ALERTS
from sinks.base import SEND_ATTEMPTS
from streams.config import WebhookConfig, WebLimits

__all__ = [
    "DEFAULT_EMBEDDED_KAFKA_PORT",
    "DEFAULT_LOCAL_STRIPE_PORT",
    "Authority",
    "BillingSettings",
    "DatabaseSettings",
    "KafkaSettings",
    "ParitySettings",
    "Settings",
    "StripeSettings",
    "WebSettings",
    "bootstrap_cutover",
    "child_env",
    "config_warnings",
    "interlock_problems",
    "is_loopback",
    "load_settings",
    "security_problems",
    "stripe_problems",
]

_W = WebLimits()  # the web server limits' defaults
_H = WebhookConfig(secret="")  # the webhook receiver's defaults

DEFAULT_EMBEDDED_KAFKA_PORT = 29092
DEFAULT_LOCAL_STRIPE_PORT = 12111
DEFAULT_VAR_DIR = Path("var")
DEFAULT_WEBHOOK_SECRET = "whsec_edgebill_local"  # noqa: S105 - a public local default, refused with live Stripe
DEFAULT_INTERNAL_SECRET = "edgebill-local-internal-secret"  # noqa: S105 - a loopback-only default, refused elsewhere
MIN_INTERNAL_SECRET_LENGTH = 32
_T = TypeVar("_T")
_DNS_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_])?$")


def _host_ok(host: str) -> bool:
    """A DNS name (letters, digits, '-', '_', '.') or an IP address (IPv6 with or without brackets)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return bare == host and bool(_DNS_NAME.match(host))
    return True


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); a name or 0.0.0.0 is not."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _port_problem(port: str) -> str | None:
    if not port.isascii() or not port.isdigit():
        return f"port {port!r} is not a number"
    if not 1 <= int(port) <= 65535:
        return f"port {port} is out of range (1-65535)"
    return None


def _bootstrap_problem(value: str) -> str | None:
    """Why ``host:port[,host:port]`` is malformed, or None."""
    if not value.strip():
        return "is empty (unset it to use the embedded broker)"
    for item in value.split(","):
        item = item.strip()
        if "://" in item:
            return f"{item!r}: give host:port without a scheme"
        host, sep, port = item.rpartition(":")
        if not sep:
            return f"{item!r} has no port (expected host:port)"
        if not host:
            return f"{item!r} has no host (expected host:port)"
        if not _host_ok(host):
            return f"{item!r}: {host!r} is not a host name or address"
        problem = _port_problem(port)
        if problem:
            return f"{item!r}: {problem}"
    return None


def _url_problem(value: str) -> str | None:
    """Why an http(s) base URL is malformed (no host, bad port, query or fragment), or None."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname or not _host_ok(parts.hostname):
        return "has no valid host (expected e.g. https://api.stripe.com)"
    if port is not None and not 1 <= port <= 65535:
        return f"port {port} is out of range (1-65535)"
    if parts.query or parts.fragment or parts.username is not None:
        return "must be a plain base URL (no credentials, query or fragment)"
    return None


def _cfg(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, frozen=True, extra="ignore", case_sensitive=False)


class KafkaSettings(BaseSettings):
    """Kafka / broker. ``EDGEBILL_KAFKA_BOOTSTRAP`` unset means the embedded broker on 127.0.0.1."""

    model_config = _cfg("EDGEBILL_KAFKA_")

    bootstrap: str | None = Field(
        default=None, description="host:port[,host:port]; unset = embedded broker on 127.0.0.1"
    )
    embedded_port: int = Field(default=DEFAULT_EMBEDDED_KAFKA_PORT, ge=1, le=65535)
    topic_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$")
    partitions: int = Field(default=4, ge=1, le=1024, description="partitions for topics edgebill creates")
    replication_factor: int = Field(default=1, ge=1, le=16, description="replicas for topics edgebill creates")
    group_id: str = Field(default="edgebill", min_length=1)
    # Faust timings (seconds). Tansu's join phase lasts ~session_timeout/2; 3/0.3/3 gives a ~4 s start.
    session_timeout: float = Field(default=3.0, gt=0)
    heartbeat_interval: float = Field(default=0.3, gt=0)
    rebalance_timeout: float = Field(default=3.0, gt=0)
    request_timeout: float = Field(default=30.0, gt=0)
    max_fetch_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)

    @field_validator("bootstrap")
    @classmethod
    def _host_ports(cls, v: str | None) -> str | None:
        problem = None if v is None else _bootstrap_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @property
    def embedded(self) -> bool:
        return self.bootstrap is None

    @property
    def servers(self) -> str:
        """Bootstrap servers as ``host:port[,…]``."""
        return self.bootstrap or f"127.0.0.1:{self.embedded_port}"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


class DatabaseSettings(BaseSettings):
    """SQL ledger. ``EDGEBILL_DATABASE_URL`` unset means a SQLite file under ``./var/``."""

    model_config = _cfg("EDGEBILL_DATABASE_")

    url: str | None = None
    var_dir: Path = DEFAULT_VAR_DIR

    @property
    def resolved_url(self) -> str:
        if self.url:
            return self.url
        return f"sqlite:///{(self.var_dir / 'edgebill.db').as_posix()}"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://")):
            raise ValueError("must start with sqlite:// or postgresql+psycopg://")
        if v is not None:
            try:
                url = make_url(v)
            except (ArgumentError, ValueError) as exc:
                raise ValueError(f"is not a database URL ({exc})") from None
            if url.port is not None and not 1 <= url.port <= 65535:
                raise ValueError(f"port {url.port} is out of range (1-65535)")
            if url.get_backend_name() == "sqlite" and not url.database:
                raise ValueError("names no SQLite file (e.g. sqlite:////srv/edgebill/ledger.db)")
        if v is not None and v.startswith("postgresql://"):
            return "postgresql+psycopg://" + v.removeprefix("postgresql://")
        return v


class StripeSettings(BaseSettings):
    """Stripe. ``EDGEBILL_STRIPE_API_BASE`` unset means the local Stripe-compatible server."""

    model_config = _cfg("EDGEBILL_STRIPE_")

    api_base: str | None = None
    api_key: SecretStr = SecretStr("sk_test_edgebill_local")
    webhook_secret: SecretStr = Field(
        default=SecretStr(DEFAULT_WEBHOOK_SECRET),
        description="signing secret of the webhook endpoint (whsec_…; `edgebill stripe setup` prints it once)",
    )
    webhook_tolerance: int = Field(
        default=_H.tolerance_s, ge=1, le=3600, description="seconds a webhook signature stays valid"
    )
    webhook_max_body: int = Field(
        default=_H.max_body_bytes, ge=1024, le=16 * 1024 * 1024, description="larger webhook bodies are refused (413)"
    )
    webhook_append_timeout: float = Field(
        default=_H.append_timeout_s,
        gt=0,
        le=60,
        description="seconds to wait for the topic to store an event before a 503",
    )
    webhook_retry_interval: float = Field(
        default=_H.retry_interval_s,
        gt=0,
        description="seconds between retries of webhook events not yet applied (leader)",
    )
    webhook_url: str | None = Field(
        default=None,
        description="public URL of POST /webhooks/stripe for `edgebill stripe setup`; unset: the worker's own",
    )
    local_port: int = Field(default=DEFAULT_LOCAL_STRIPE_PORT, ge=1, le=65535)
    mode: Literal["v1", "v2"] = Field(
        default="v1",
        description="v1: POST /v1/billing/meter_events; v2: the meter-event stream (sessions, 100/request)",
    )
    meter_events_base: str | None = Field(
        default=None,
        description="v2 stream host; unset: meter-events.stripe.com for api.stripe.com, else the API base",
    )
    send_batch: int | None = Field(
        default=None, ge=1, le=10_000, description="outbox rows per send batch; unset: 500 (v1), 2,000 (v2)"
    )
    concurrency: int = Field(default=8, ge=1, le=256, description="Stripe requests in flight at once")
    max_attempts: int = Field(default=SEND_ATTEMPTS, ge=1, le=50, description="attempts per row per send cycle")
    send_interval: float = Field(default=1.0, gt=0, description="seconds between send cycles")
    timeout: float = Field(default=20.0, gt=0)
    v1_max_calls_per_s: float = Field(
        default=900.0, ge=0, description="client-side pacing of v1 calls (Stripe live limit: 1,000/s); 0 = off"
    )
    session_refresh_margin: float = Field(
        default=60.0, ge=0, le=450, description="renew a v2 session this many seconds before it expires"
    )
    reconcile_interval: float = Field(
        default=30.0, gt=0, description="seconds between reads of Stripe's v2 error reports"
    )
    # The reconciliation with Stripe (`edgebill reconcile`, and its scheduled run on the leader).
    audit_interval: float = Field(
        default=900.0, ge=0, description="seconds between scheduled reconciliations with Stripe (leader); 0 = off"
    )
    audit_lookback_days: int = Field(
        default=7, ge=1, le=35, description="days (UTC) a reconciliation compares by default, today included"
    )
    audit_settle: int = Field(
        default=600,
        ge=0,
        le=86_400,
        description="seconds after its newest send before a window is compared (Stripe's summaries lag)",
    )
    audit_reads_per_s: float = Field(
        default=5.0,
        gt=0,
        le=25,
        description="Stripe requests a second the reconciliation may make (Stripe allows 25 reads/s per endpoint)",
    )
    audit_alert_runs: int = Field(
        default=2, ge=1, le=100, description="scheduled runs in a row a difference must persist for to alert"
    )
    audit_invoice_ahead_hours: int = Field(
        default=72, ge=1, le=24 * 31, description="check a subscription's upcoming invoice this long before its end"
    )

    @property
    def base(self) -> str:
        return (self.api_base or f"http://127.0.0.1:{self.local_port}").rstrip("/")

    @property
    def batch_rows(self) -> int:
        """Rows per send batch: ``send_batch``, or the mode's default (v2 requests carry 100 events)."""
        if self.send_batch is not None:
            return self.send_batch
        return 2000 if self.mode == "v2" else 500

    @property
    def live(self) -> bool:
        """True when the base is Stripe itself or any https host but this machine (real money)."""
        host = (urlsplit(self.base).hostname or "").lower()
        return (
            host == "stripe.com"
            or host.endswith(".stripe.com")
            or (self.base.startswith("https://") and not is_loopback(host))
        )

    @field_validator("api_base", "meter_events_base", "webhook_url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        problem = None if v is None else _url_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class BillingSettings(BaseSettings):
    """Bucketing, closing, and the cutover flags (``SHADOW``, ``BILL_FROM``, ``PRO_BILLING_AUTHORITY``)."""

    model_config = _cfg("EDGEBILL_")

    shadow: bool = Field(
        default=True, description="compute rows but never send them (state=shadow); only 'false' turns it off"
    )
    bill_from: int = Field(default=0, ge=0, description="cutover boundary on bucket start, unix s; 0=off")
    pro_billing_authority: Authority = Authority.CELL
    bucket_seconds: int = Field(default=3600, ge=60, le=86400)
    grace_seconds: int = Field(default=600, ge=0, le=7 * 86400)
    close_interval: float = Field(default=1.0, gt=0, description="seconds between closer runs")
    progress_stale_after: float = Field(
        default=15.0, gt=0, description="a partition whose progress report is older is treated as lagging"
    )

    cutover_clean_hours: Decimal = Field(
        default=Decimal(24),
        ge=0,
        description="clean parity hours (usage on both sides) `edgebill cutover plan` asks for before T",
    )
    # Retention (models.retention): the per-tick data of a settled bucket goes once it ended this many days
    # ago; the default is one day past Stripe's 35-day window, beyond which no tick can change a bill.
    retention_days: int = Field(
        default=DEFAULT_RETENTION_DAYS,
        ge=0,
        description="days a settled bucket keeps its per-tick data (0 = keep every tick; else >= Stripe's 35)",
    )
    retention_interval: float = Field(
        default=600.0, gt=0, description="seconds between retention runs on the leader (each goes on until done)"
    )

    @field_validator("retention_days")
    @classmethod
    def _retention_covers_stripe(cls, v: int) -> int:
        problem = retention_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("shadow", mode="before")
    @classmethod
    def _explicit_false_only(cls, v: Any) -> bool:
        return parse_shadow(v)

    @field_validator("bucket_seconds")
    @classmethod
    def _divides_day(cls, v: int) -> int:
        if 86400 % v:
            raise ValueError("must divide 86400 so buckets align to UTC days")
        return v


class WebSettings(BaseSettings):
    """The worker's web server (webhooks, parity, dashboard, health, metrics)."""

    model_config = _cfg("EDGEBILL_WEB_")

    host: str = "127.0.0.1"
    port: int = Field(default=6066, ge=1, le=65535)
    internal_secret: SecretStr = SecretStr(DEFAULT_INTERNAL_SECRET)
    max_line: int = Field(
        default=_W.max_line_bytes, ge=256, le=65536, description="bytes of a request line (longer: 400)"
    )
    max_header: int = Field(
        default=_W.max_field_bytes, ge=256, le=65536, description="bytes of one header name or value (longer: 400)"
    )
    max_headers: int = Field(default=_W.max_headers, ge=8, le=1024, description="headers per request (more: 400)")
    idle_timeout: float = Field(
        default=_W.idle_timeout_s,
        gt=0,
        le=3600,
        description="seconds a connection has to send a complete request head after opening or its last answer",
    )
    body_timeout: float = Field(
        default=_W.body_timeout_s, gt=0, le=600, description="seconds a body a page reads has to arrive"
    )
    max_connections: int = Field(
        default=_W.max_connections,
        ge=8,
        le=65536,
        description="open connections (beyond: the longest-idle one is closed, or 503)",
    )
    metrics_per_org: bool = Field(
        default=_W.metrics_per_org,
        description="/metrics series per org (org ids and differences); off: none names an org",
    )


_RULE = AlertRule()  # the alert thresholds' defaults


class ParitySettings(BaseSettings):
    """The parity table, its alert rule and the dashboard (models.parity has the rules)."""

    model_config = _cfg("EDGEBILL_PARITY_")

    tolerance: Decimal = Field(default=Decimal("0.02"), ge=0, le=10, description="|drift| above this flags a row")
    boundary_slack_seconds: int = Field(
        default=40,
        ge=0,
        le=3600,
        description="one tick of slack per interval near a bucket boundary (2x the 20 s tick); 0 = no slack",
    )
    refresh_interval: float = Field(default=5.0, gt=0, description="seconds between parity refreshes (leader)")
    lookback_hours: int = Field(
        default=48, ge=1, le=35 * 24, description="rebuilt at start and on policy changes; alerts evaluated over it"
    )
    alert_org_min_gb_seconds: Decimal = Field(default=_RULE.org_min_gb_seconds, ge=0)
    alert_org_drift: Decimal = Field(default=_RULE.org_drift, ge=0)
    alert_min_orgs: int = Field(default=_RULE.min_orgs, ge=1)
    alert_aggregate_min_gb_seconds: Decimal = Field(default=_RULE.aggregate_min_gb_seconds, ge=0)
    alert_aggregate_drift: Decimal = Field(default=_RULE.aggregate_drift, ge=0)
    alert_consecutive_buckets: int = Field(default=_RULE.consecutive, ge=1, le=48)
    alerts_topic: str = Field(default=TOPIC_ALERTS, pattern=r"^[A-Za-z0-9._-]+$")
    signature_tolerance_seconds: int = Field(default=SIGNATURE_TOLERANCE_SECONDS, ge=1, le=3600)
    dashboard_token_ttl: int = Field(default=12 * 3600, ge=60, description="seconds a dashboard link stays valid")


class Settings:
    """All areas together. Built by :func:`load_settings`; immutable parts, passed explicitly."""

    __slots__ = ("billing", "db", "kafka", "parity", "stripe", "web")

    def __init__(
        self,
        *,
        kafka: KafkaSettings,
        db: DatabaseSettings,
        stripe: StripeSettings,
        billing: BillingSettings,
        web: WebSettings,
        parity: ParitySettings | None = None,
    ) -> None:
        self.kafka = kafka
        self.db = db
        self.stripe = stripe
        self.billing = billing
        self.web = web
        self.parity = parity if parity is not None else ParitySettings()

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every effective value, secrets masked (for ``check-config`` and logs)."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.__slots__:
            part: BaseSettings = getattr(self, name)
            out[name] = {
                k: ("**********" if isinstance(v, SecretStr) else (str(v) if isinstance(v, Path) else v))
                for k, v in part.model_dump().items()
            }
        if self.db.url:  # a database URL may carry a password
            out["db"]["url"] = make_url(self.db.url).render_as_string(hide_password=True)
        return out


_AREAS: dict[str, type[BaseSettings]] = {
    "kafka": KafkaSettings,
    "db": DatabaseSettings,
    "stripe": StripeSettings,
    "billing": BillingSettings,
    "web": WebSettings,
    "parity": ParitySettings,
}


def bootstrap_cutover(billing: BillingSettings) -> CutoverState:
    """The environment's cutover state: in force until the ledger records the first cutover change."""
    return CutoverState(shadow=billing.shadow, bill_from=billing.bill_from, authority=billing.pro_billing_authority)


def interlock_problems(billing: BillingSettings) -> list[str]:
    """Configurations that could double-bill or leave a gap at the cutover seam: the one rule of
    :func:`models.cutover.interlock_problems`, applied to the environment's bootstrap state."""
    return [
        f"EDGEBILL_SHADOW / EDGEBILL_BILL_FROM / EDGEBILL_PRO_BILLING_AUTHORITY: {p}"
        for p in cutover_interlocks(bootstrap_cutover(billing), billing.bucket_seconds)
    ]


def config_warnings(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """What is valid but probably not meant (``check-config`` prints it): a ``EDGEBILL_SHADOW`` that is
    neither true nor false keeps shadow on, since only an explicit false turns it off."""
    given = dict((overrides or {}).get("billing", {}))
    raw: object = given["shadow"] if "shadow" in given else os.environ.get("EDGEBILL_SHADOW")
    if raw is None or is_explicit_shadow_value(raw):
        return []
    return [
        f"EDGEBILL_SHADOW={raw!r} is neither true nor false: shadow stays ON (nothing is sent to Stripe); only "
        "an explicit false turns it off"
    ]


def stripe_problems(st: StripeSettings, billing: BillingSettings | None) -> list[str]:
    """Settings that would let anyone provision: authority ``edge`` against live Stripe (a live key or a live
    base) with the well-known local webhook secret, with which anyone could sign a checkout event."""
    if billing is None or billing.pro_billing_authority is not Authority.EDGE:
        return []
    live = st.live or st.api_key.get_secret_value().startswith(("sk_live_", "rk_live_"))
    if live and st.webhook_secret.get_secret_value() == DEFAULT_WEBHOOK_SECRET:
        return [
            "EDGEBILL_STRIPE_WEBHOOK_SECRET is the local default while this edge provisions on live Stripe: set it "
            "to the endpoint's signing secret (`edgebill stripe setup` prints it when it creates the endpoint)"
        ]
    return []


def security_problems(stripe: StripeSettings | None, web: WebSettings | None) -> list[str]:
    """Settings that would expose the worker, or send usage with the wrong credentials (None: area invalid)."""
    problems: list[str] = []
    if web is not None and not is_loopback(web.host):
        secret = web.internal_secret.get_secret_value()
        if secret == DEFAULT_INTERNAL_SECRET:
            problems.append(
                f"EDGEBILL_WEB_HOST={web.host} with the default EDGEBILL_WEB_INTERNAL_SECRET (it is in the source: "
                "anyone who can reach the port could sign dashboard links and internal calls): set a random "
                f"secret of at least {MIN_INTERNAL_SECRET_LENGTH} characters, or bind to 127.0.0.1"
            )
        elif len(secret) < MIN_INTERNAL_SECRET_LENGTH:
            problems.append(
                f"EDGEBILL_WEB_HOST={web.host} with a {len(secret)}-character EDGEBILL_WEB_INTERNAL_SECRET: use at "
                f"least {MIN_INTERNAL_SECRET_LENGTH} random characters (e.g. `openssl rand -hex 32`)"
            )
    if stripe is None:
        return problems
    key = stripe.api_key.get_secret_value().strip()
    if not key:
        problems.append("EDGEBILL_STRIPE_API_KEY is empty: set a secret key (sk_...) or a restricted key (rk_...)")
    elif key.startswith("pk_"):
        problems.append(
            "EDGEBILL_STRIPE_API_KEY is a publishable key (pk_...), which cannot send meter events: use a "
            "secret key (sk_...) or a restricted key (rk_...)"
        )
    elif stripe.live and key.startswith(("sk_test_", "rk_test_")):
        problems.append(
            f"EDGEBILL_STRIPE_API_KEY is a test key but EDGEBILL_STRIPE_API_BASE={stripe.base} is live Stripe: use "
            "the live key (sk_live_... / rk_live_...), or point the base at a test server on 127.0.0.1"
        )
    return problems


def load_settings(**overrides: Mapping[str, Any]) -> Settings:
    """Build all settings from the environment, raising one ConfigError that lists every problem.

    ``overrides`` maps an area name (``kafka``, ``db``, ``stripe``, ``billing``, ``web``, ``parity``) to field
    values that take precedence over the environment (used by tests and the demo).
    """
    problems: list[str] = []
    built: dict[str, BaseSettings] = {}
    # An area with an invalid field is rebuilt with that field at its default, so the checks across fields
    # (interlocks, security) still see the rest of it: every problem is reported in one pass.
    checked: dict[str, BaseSettings | None] = {}
    for area, cls in _AREAS.items():
        given = dict(overrides.get(area, {}))
        try:
            built[area] = checked[area] = cls(**given)
        except ValidationError as exc:
            prefix = str(cls.model_config.get("env_prefix", ""))
            failing: set[str] = set()
            for err in exc.errors():
                field = ".".join(str(p) for p in err["loc"]) or "?"
                msg = str(err["msg"]).removeprefix("Value error, ")
                problems.append(f"{prefix}{field.upper()}: {msg} (got {err.get('input')!r})")
                failing.add(str(err["loc"][0]) if err["loc"] else "")
            checked[area] = _rest_of(cls, given, failing)
    billing = checked.get("billing")
    if isinstance(billing, BillingSettings):
        problems.extend(interlock_problems(billing))
    stripe, web = checked.get("stripe"), checked.get("web")
    problems.extend(
        security_problems(
            stripe if isinstance(stripe, StripeSettings) else None, web if isinstance(web, WebSettings) else None
        )
    )
    if isinstance(stripe, StripeSettings):
        problems.extend(stripe_problems(stripe, billing if isinstance(billing, BillingSettings) else None))
    if problems:
        raise ConfigError(problems)
    return Settings(
        kafka=_as(built["kafka"], KafkaSettings),
        db=_as(built["db"], DatabaseSettings),
        stripe=_as(built["stripe"], StripeSettings),
        billing=_as(built["billing"], BillingSettings),
        web=_as(built["web"], WebSettings),
        parity=_as(built["parity"], ParitySettings),
    )


def _rest_of(cls: type[BaseSettings], given: dict[str, Any], failing: set[str]) -> BaseSettings | None:
    """``cls`` with its ``failing`` fields at their defaults (None if it is still invalid)."""
    defaults = {f: cls.model_fields[f].default for f in failing if f in cls.model_fields}
    try:
        return cls(**{**given, **defaults})
    except ValidationError:
        return None


def _as(value: object, cls: type[_T]) -> _T:
    assert isinstance(value, cls)
    return value


def child_env(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """The current environment with ``overrides`` applied (None removes), for child processes."""
    env = dict(os.environ)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env
