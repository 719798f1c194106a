"""The SQL ledger's schema (SQLAlchemy 2 Core) and database set-up.

The schema is created and evolved only by the Alembic migrations in ``sinks/migrations``;
:data:`metadata` mirrors it for queries (a test checks that the two agree).

Times are integers: unix milliseconds (``*_ms``) for events, unix seconds for bucket bounds.
Usage is integers: MB-seconds and seconds. Meter values are decimal strings.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.schema import SchemaItem

__all__ = [
    "billing_prices",
    "cell_intervals",
    "close_runs",
    "closed_buckets",
    "counters",
    "current_revision",
    "cutover_acks",
    "cutover_log",
    "head_revision",
    "make_engine",
    "metadata",
    "meter_events",
    "meter_totals",
    "migrate",
    "org_policies",
    "org_provisioning",
    "parity_alerts",
    "parity_dirty",
    "parity_edge",
    "parity_state",
    "partition_progress",
    "provisioning_log",
    "reconcile_alerts",
    "reconcile_invoices",
    "reconcile_repairs",
    "reconcile_results",
    "reconcile_runs",
    "stripe_subscriptions",
    "tick_batches",
    "unbilled_usage",
    "usage_parity",
    "webhook_events",
    "webhook_policy_outbox",
    "webhook_receipts",
]

log = logging.getLogger(__name__)

metadata = MetaData()

# Every column is NOT NULL unless declared ``null=True``; each helper declares one column per name given.
# Ids and names are VARCHAR(255) unless ``n`` says otherwise; decimal strings are VARCHAR(40).
_Cols = list[Column[Any]]


def _cols(type_: Any, *names: str, null: bool = False, **kw: Any) -> _Cols:
    return [Column(name, type_, nullable=null, **kw) for name in names]


def _str(*names: str, n: int = 255, null: bool = False, **kw: Any) -> _Cols:
    return _cols(String(n), *names, null=null, **kw)


_dec = functools.partial(_str, n=40)
_big = functools.partial(_cols, BigInteger)
_int = functools.partial(_cols, Integer)
_text = functools.partial(_cols, Text)


def _serial(name: str = "id") -> _Cols:
    """An auto-incremented key: BIGINT, INTEGER on SQLite (whose AUTOINCREMENT takes only that)."""
    return [Column(name, BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)]


_BUCKET_KEY = {"primary_key": True, "autoincrement": False}  # bucket_start as the key: never generated


def _table(name: str, *parts: SchemaItem | _Cols, **kw: Any) -> Table:
    """A table of ``metadata``: its columns, constraints and indexes in the order given."""
    items = [i for p in parts for i in (p if isinstance(p, list) else [p])]
    return Table(name, metadata, *items, **kw)


def _named_values(name: str, n: int) -> Table:
    """A table of named integers (counters, cursors)."""
    return _table(name, _str("name", n=n, primary_key=True), _big("value"))


def _alerts(name: str, *columns: _Cols) -> Table:
    """An alert table: the dedup key, ``columns``, when it was recorded and published (NULL = not yet on the
    alerts topic), and the alert record (JSON)."""
    published = _big("published_ms", null=True)
    return _table(name, _str("id", primary_key=True), *columns, _big("created_ms"), published, _text("body"))


tick_batches = _table(
    "tick_batches",
    # Insertion order: the closer aggregates "batches of bucket B with seq above B's cursor"
    # (closed_buckets.seq) and the parity edge sums "batches above its cursor"; nothing is ever rewritten.
    # AUTOINCREMENT on SQLite: a seq is never handed out twice, even after the newest batch was deleted.
    _serial("seq"),
    _big("bucket_start"),
    _int("ticks"),  # how many ticks the batch holds (each id once in its bucket)
    Column("data", LargeBinary, nullable=False),  # sinks.ledger.batches' format
    # The only secondary index: closing, dedup, replay and retention read a bucket's batches by seq.
    Index("ix_tick_batches_bucket_seq", "bucket_start", "seq"),
    sqlite_autoincrement=True,
)

meter_events = _table(
    "meter_events",
    _str("id", primary_key=True),  # = Stripe identifier
    _str("org_id"),
    _big("bucket_start", "bucket_end"),
    _str("meter", n=100),
    _int("revision"),  # 0 = the bucket's row, n = correction r{n}
    _str("billing_mode", n=16),
    _dec("value"),  # decimal string sent to Stripe, fixed at creation
    _big("units"),  # exact units in this row (MB-s or s)
    _int("samples"),
    _str("state", n=32),
    _str("stripe_customer_id", null=True),
    _big("close_id", "created_ms", "updated_ms"),
    _big("sent_ms", null=True),
    _int("attempts", server_default="0"),
    _text("last_error", null=True),
    # Set on a row a reconciliation repair wrote to bill again a row Stripe lost (refused after the send, or
    # cancelled): the lost row's id. The pair is one billing decision: readers that count decisions count one.
    # On a credit row (taking back what Stripe held beyond what edgebill sent): ``stripe_excess:`` + its
    # repair key; it bills no usage (0 units) and counts as no decision either.
    _str("repair_of", null=True),
    Index("ix_meter_events_state", "state", "bucket_start"),
    Index("ix_meter_events_key", "org_id", "bucket_start", "meter"),
)

meter_totals = _table(
    "meter_totals",
    _str("org_id"),
    _str("meter", n=100),
    _str("stream", n=16),  # 'billed' | 'shadow': separate rounding carries
    _big("units"),
    _dec("assigned"),  # Σ values assigned to rows so far
    PrimaryKeyConstraint("org_id", "meter", "stream"),
)

org_policies = _table(
    "org_policies",
    _str("org_id"),
    _big("effective_ms"),
    _str("plan", "billing_mode", n=16),
    _str("stripe_customer_id", "stripe_subscription_id", null=True),
    _str("billing_provider", n=32),
    _int("src_partition"),
    _big("src_offset", "received_ms"),
    PrimaryKeyConstraint("org_id", "effective_ms"),
)

partition_progress = _table(
    "partition_progress",
    _str("topic"),
    _int("partition"),
    _big("committed_offset"),  # last offset written to the ledger
    _big("max_event_ms", null=True),  # newest event time written for this partition
    _big("highwater", null=True),  # log end as last seen by the owner
    _big("reported_ms", null=True),  # when the owner last reported
    _str("owner", null=True),
    PrimaryKeyConstraint("topic", "partition"),
)

closed_buckets = _table(
    "closed_buckets",
    _big("bucket_start", **_BUCKET_KEY),
    _big("closed_ms"),  # first closed
    _big("close_id"),  # last close run that aggregated samples of it
    _big("seq", server_default="0"),  # samples of it up to here are aggregated
    # The bucket's billing decision (models.cutover.Decision), made once at its first close from the cutover
    # state then in force; every later row of the bucket is placed from it. NULL: not decided yet (a bucket
    # closed before decisions were stored and without a row to read one from): the next close decides.
    _str("decision", n=32, null=True),
)

close_runs = _table(
    "close_runs",
    _serial(),
    _big("started_ms", "watermark_ms"),
    _int("samples", "rows"),
    # After this run, every sample with seq <= upto_seq in a bucket <= last_bucket is aggregated.
    _big("upto_seq", server_default="0"),
    _big("last_bucket", null=True),
)

unbilled_usage = _table(
    "unbilled_usage",
    _str("org_id"),
    _big("bucket_start"),
    _str("reason", n=64),
    _big("samples", "mb_seconds"),
    PrimaryKeyConstraint("org_id", "bucket_start", "reason"),
)

counters = _named_values("counters", 128)

# ------------------------------------------------------------------------------------------------ cutover
# The cutover's audit and state (also on the compacted billing-control topic, which a broker without
# compaction or retention cannot be trusted to keep): every change, plan, release and cancellation, and
# which worker has applied which state.

cutover_log = _table(
    "cutover_log",
    _serial("seq"),
    _str("change_id", n=64),  # the same change recorded twice is one entry
    _str("kind", n=16),  # state | plan | release | cancel
    # The state columns: of the new state (kind state), of the planned one (plan: bill_from = T).
    _int("shadow", null=True),
    _big("bill_from", "bill_until", null=True),
    _str("authority", n=16, null=True),
    _str("by"),
    _text("reason", "command"),
    _big("changed_ms"),  # when the change was made (its own changed_at)
    _big("recorded_ms"),  # when this ledger recorded it
    _big("published_ms", null=True),  # when it was seen on billing-control (state only)
    _text("details"),  # JSON: forced problems, rows moved, the source, ...
    UniqueConstraint("change_id", name="uq_cutover_log_change_id"),
    Index("ix_cutover_log_kind", "kind", "seq"),
)

cutover_acks = _table(
    "cutover_acks",
    _str("owner", primary_key=True),  # the worker (host:pid)
    _big("seq"),  # the state entry it applies (0: the environment's bootstrap)
    _big("acked_ms"),
)

billing_prices = _table(
    "billing_prices",
    _str("key", n=100, primary_key=True),
    _str("meter", n=100),
    _str("price_id"),
    _big("updated_ms"),
)

# ------------------------------------------------------------------------------------------------ parity
# The cell side (``sandbox-scale-events`` rows), the parity table, its bookkeeping and its alerts.
# Written by sinks.parity; cell_intervals is also read to tell whether a worker owned a sandbox at a time.

cell_intervals = _table(
    "cell_intervals",
    _str("id", primary_key=True),  # the cell row id (scale event id)
    _str("sandbox_id", "org_id", "cell_id"),
    _str("worker_id"),  # the worker that owns the sandbox during the interval
    _big("memory_mb"),
    _int("cpu_percent"),
    _big("disk_mb", "started_ms"),
    _big("ended_ms", null=True),  # NULL = open (counted up to now)
    _int("src_partition"),
    _big("src_offset", "updated_ms"),
    Index("ix_cell_intervals_sandbox", "sandbox_id", "started_ms"),
    Index("ix_cell_intervals_org", "org_id", "started_ms"),
)

usage_parity = _table(
    "usage_parity",
    _str("org_id"),
    _big("bucket_start"),
    _big("edge_mb_s"),  # Σ memory_mb × interval_s of the raw samples
    _big("samples"),
    _big("cell_mb_ms"),  # Σ memory_mb × clipped ms of the cell intervals
    _big("slack_mb_ms"),  # boundary slack (models.parity)
    _dec("drift"),  # (edge − cell) / cell, 6 decimals
    _str("status", n=16),  # ok | drift | edge_only | cell_only
    _big("updated_ms"),
    PrimaryKeyConstraint("org_id", "bucket_start"),
    Index("ix_usage_parity_bucket", "bucket_start"),
    Index("ix_usage_parity_status", "status", "bucket_start"),
)

parity_dirty = _table(
    "parity_dirty",
    _big("bucket_start", **_BUCKET_KEY),
    _big("version"),  # bumped on every new mark; cleared only if unchanged
)

# Dedup key: billing_drift:{first bucket of the episode}.
parity_alerts = _alerts("parity_alerts", _big("first_bucket", "fired_bucket"))

parity_edge = _table(
    "parity_edge",
    # The edge side of parity, kept incrementally: Σ over the samples with seq <= parity_state
    # "edge_upto_seq" (read under the writer lock, so no sample below it can still be uncommitted), per
    # bucket and org, every org. The refresher adds each sample once instead of rescanning whole hours.
    _big("bucket_start", **_BUCKET_KEY),
    _str("org_id", primary_key=True),
    _big("samples", "edge_mb_s"),
)

parity_state = _named_values("parity_state", 64)

# --------------------------------------------------------------------------- Stripe webhooks and provisioning
# Written by sinks.webhooks.store: the received events (the inbox the webhook agent applies, each once), one
# row per record read from ``stripe-webhook-events``, subscription state for the ordering guard, each org's
# provisioning and published plan, the plan records still to publish on ``org-policy``, and a log of every
# provisioning done (authority edge) or only described (authority cell).

webhook_events = _table(
    "webhook_events",
    _str("event_id", primary_key=True),  # Stripe's evt_… id: the exactly-once key
    _str("type", n=100),
    _str("object_id"),
    _str("org_id", null=True),
    _big("created_s"),  # Stripe's event time
    _str("outcome", n=32),  # models.webhooks.Outcome (never 'duplicate')
    _text("detail", null=True),
    _text("body"),  # the verified raw event JSON
    _int("deliveries"),
    _int("attempts", server_default="0"),  # apply attempts that failed transiently
    _big("next_ms"),  # a 'received' event is (re)applied from then on
    _big("first_ms", "updated_ms"),
    Index("ix_webhook_events_pending", "outcome", "next_ms"),
)

webhook_receipts = _table(
    "webhook_receipts",
    _serial(),
    _str("topic"),
    _int("partition"),
    _big("offset"),
    _str("event_id"),
    _int("duplicate"),  # 1: the event was already final when this record came
    _big("received_ms"),
    UniqueConstraint("topic", "partition", "offset", name="uq_webhook_receipts_source"),
    Index("ix_webhook_receipts_event", "event_id"),
)

stripe_subscriptions = _table(
    "stripe_subscriptions",
    _str("subscription_id", primary_key=True),
    _str("org_id"),
    _str("customer_id", null=True),
    _str("status", n=64),
    _big("event_created_s"),  # created of the event that set the status
    _str("event_id"),
    _int("provisioned"),  # 1: created by edgebill's provisioning
    _big("updated_ms"),
    Index("ix_stripe_subscriptions_org", "org_id"),
    Index("ix_stripe_subscriptions_customer", "customer_id"),
)

org_provisioning = _table(
    "org_provisioning",
    _str("org_id", primary_key=True),
    _str("customer_id", null=True),
    _str("subscription_id", null=True),  # the last one provisioned
    _int("generation"),  # subscriptions provisioned so far (idempotency key suffix)
    _str("credit_txn_id", null=True),  # the sign-up credit, once applied
    _str("plan", n=16, null=True),  # models.webhooks.PlanState
    _big("plan_since_s", "plan_last_s", "plan_floor_s", null=True),
    _big("updated_ms"),
    Index("ix_org_provisioning_customer", "customer_id"),
)

webhook_policy_outbox = _table(
    "webhook_policy_outbox",
    _serial(),
    _str("org_id"),
    _big("effective_ms"),
    _text("body"),  # the org-policy record (JSON)
    _str("event_id"),
    _big("created_ms"),
    _big("published_ms", null=True),  # NULL = not yet on org-policy
    Index("ix_webhook_policy_outbox_pending", "published_ms", "id"),
)

provisioning_log = _table(
    "provisioning_log",
    _serial(),
    _str("event_id", "org_id", "customer_id"),
    _str("mode", n=16),  # 'edge': done; 'shadow': what would have been done
    _str("subscription_id", "credit_txn_id", null=True),
    _text("detail"),  # JSON: idempotency keys, prices, credit, plan
    _big("created_ms"),
    Index("ix_provisioning_log_org", "org_id"),
)


# ---------------------------------------------------------------------------------- reconciliation with Stripe
# Written by sinks.reconcile.store: each scheduled run, the latest result per (org, customer, meter, window) with
# how many runs in a row it has differed, the alerts (the dedup), the repairs done (each with its evidence) and
# the latest invoice-preview check per subscription line.

reconcile_runs = _table(
    "reconcile_runs",
    _serial(),
    _big("started_ms", "finished_ms"),
    _big("window_lo", "window_hi"),  # the range compared, unix s
    _str("grouping", n=8),  # Stripe's value_grouping_window: day | hour
    _int("compared", "differences"),
    _int("unsettled"),  # windows not closed, not sent, or sent too recently
    _int("requests"),  # Stripe requests made
    _int("throttled"),  # of which answered 429
    _int("invoice_lines", "invoice_differences"),
    _text("error", null=True),  # why the run could not compare (Stripe unreachable, ...)
    _text("summary"),  # JSON: windows by label
)

reconcile_results = _table(
    "reconcile_results",
    _str("org_id", "customer_id"),
    _str("meter", n=100),
    _big("window_start"),
    _str("grouping", n=8),
    _str("label", n=32),  # models.reconcile.Label
    _dec("ledger_value"),  # what Stripe should hold
    _dec("stripe_value", null=True),  # what it holds (NULL: it could not say)
    _dec("lost_value"),
    _text("causes"),  # JSON
    _int("streak"),  # consecutive runs with a difference (0 when ok)
    _big("first_run", null=True),  # the run the current difference was first seen in
    _big("run_id"),  # the run that wrote this result
    _big("checked_ms"),
    PrimaryKeyConstraint("org_id", "customer_id", "meter", "window_start", "grouping"),
    Index("ix_reconcile_results_run", "run_id"),
)

# Dedup key: models.reconcile.alert_id.
reconcile_alerts = _alerts(
    "reconcile_alerts",
    _str("org_id"),
    _str("meter", n=100),
    _big("window_start"),
    _str("label", n=32),
    _big("first_run", "fired_run"),
)

reconcile_repairs = _table(
    "reconcile_repairs",
    _serial(),
    _str("row_id"),  # the row Stripe does not hold
    _str("action", n=16),  # models.reconcile.RepairAction
    _str("new_row_id", null=True),  # the row billing it again (replace)
    _dec("value"),
    _str("cause", n=64),
    _text("evidence"),  # JSON: Stripe's and the ledger's values when it was decided
    _str("by"),
    _big("created_ms"),
    _text("reason", null=True),  # the operator's --reason
    # An over-billing repair's idempotency key (models.reconcile_over.over_key): one write per key, ever.
    _str("repair_key", n=100, null=True),
    Index("ix_reconcile_repairs_row", "row_id"),
    Index("ux_reconcile_repairs_key", "repair_key", unique=True),
)

reconcile_invoices = _table(
    "reconcile_invoices",
    _str("subscription_id", "price_id", "org_id", "customer_id"),
    _str("meter", n=100, null=True),  # NULL: a price edgebill's catalog does not have
    _big("period_start", "period_end"),
    _dec("stripe_quantity", "ledger_value", "pending_value"),
    _str("label", n=32),
    _text("detail"),
    _big("run_id", null=True),
    _big("checked_ms"),
    # Scheduled runs in a row this line differed (settled) in, and the run it was first seen in (alerts).
    _int("streak", server_default="0"),
    _big("first_run", null=True),
    PrimaryKeyConstraint("subscription_id", "price_id"),
    Index("ix_reconcile_invoices_org", "org_id"),
)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite files get their folder, WAL mode and a busy timeout."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, decide when transactions begin (see _sqlite_begin).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            # The tick-id primary key takes random inserts: keep its pages in memory (128 MiB cache,
            # 256 MiB mmap) or ingest slows down as the table grows past SQLite's 2 MiB default cache.
            cur.execute("PRAGMA cache_size=-131072")
            cur.execute("PRAGMA mmap_size=268435456")
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Writers take the write lock up front (BEGIN IMMEDIATE), so a read-then-write transaction
            # waits on busy_timeout instead of failing with "database is locked" on lock upgrade.
            write = conn.get_execution_options().get("sqlite_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


_ADVISORY_LOCK_MIGRATE = 0x6564676D6967  # "edgmig"


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with Alembic (idempotent; safe to run at every start).

    Safe when several workers start at once: the migration runs under a lock (PostgreSQL advisory lock;
    SQLite ``BEGIN IMMEDIATE``), so the second worker finds the schema already current.
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.execution_options(sqlite_write=True).begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_MIGRATE})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def head_revision() -> str:
    """The newest migration this code knows (what :func:`migrate` brings a database to)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(Path(__file__).parent / "migrations")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration a database is at; None when it has no ledger. Reads only (creates nothing)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
