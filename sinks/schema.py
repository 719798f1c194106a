"""The SQL ledger's schema (SQLAlchemy 2 Core) and database set-up.

The schema is created and evolved only by the Alembic migrations in ``sinks/migrations``;
:data:`metadata` mirrors it for queries (a test checks that the two agree).

Times are integers: unix milliseconds (``*_ms``) for events, unix seconds for bucket bounds.
Usage is integers: MB-seconds and seconds. Meter values are decimal strings.
"""

from __future__ import annotations

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

tick_batches = Table(
    "tick_batches",
    metadata,
    # Insertion order: the closer aggregates "batches of bucket B with seq above B's cursor"
    # (closed_buckets.seq) and the parity edge sums "batches above its cursor"; nothing is ever rewritten.
    # AUTOINCREMENT on SQLite: a seq is never handed out twice, even after the newest batch was deleted.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("bucket_start", BigInteger, nullable=False),
    Column("ticks", Integer, nullable=False),  # how many ticks the batch holds (each id once in its bucket)
    Column("data", LargeBinary, nullable=False),  # sinks.ledger.batches' format
    # The only secondary index: closing, dedup, replay and retention read a bucket's batches by seq.
    Index("ix_tick_batches_bucket_seq", "bucket_start", "seq"),
    sqlite_autoincrement=True,
)

meter_events = Table(
    "meter_events",
    metadata,
    Column("id", String(255), primary_key=True),  # = Stripe identifier
    Column("org_id", String(255), nullable=False),
    Column("bucket_start", BigInteger, nullable=False),
    Column("bucket_end", BigInteger, nullable=False),
    Column("meter", String(100), nullable=False),
    Column("revision", Integer, nullable=False),  # 0 = the bucket's row, n = correction r{n}
    Column("billing_mode", String(16), nullable=False),
    Column("value", String(40), nullable=False),  # decimal string sent to Stripe, fixed at creation
    Column("units", BigInteger, nullable=False),  # exact units in this row (MB-s or s)
    Column("samples", Integer, nullable=False),
    Column("state", String(32), nullable=False),
    Column("stripe_customer_id", String(255), nullable=True),
    Column("close_id", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("sent_ms", BigInteger, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    # Set on a row a reconciliation repair wrote to bill again a row Stripe lost (refused after the send, or
    # cancelled): the lost row's id. The pair is one billing decision: readers that count decisions count one.
    # On a credit row (taking back what Stripe held beyond what edgebill sent): ``stripe_excess:`` + its
    # repair key; it bills no usage (0 units) and counts as no decision either.
    Column("repair_of", String(255), nullable=True),
    Index("ix_meter_events_state", "state", "bucket_start"),
    Index("ix_meter_events_key", "org_id", "bucket_start", "meter"),
)

meter_totals = Table(
    "meter_totals",
    metadata,
    Column("org_id", String(255), nullable=False),
    Column("meter", String(100), nullable=False),
    Column("stream", String(16), nullable=False),  # 'billed' | 'shadow': separate rounding carries
    Column("units", BigInteger, nullable=False),
    Column("assigned", String(40), nullable=False),  # Σ values assigned to rows so far
    PrimaryKeyConstraint("org_id", "meter", "stream"),
)

org_policies = Table(
    "org_policies",
    metadata,
    Column("org_id", String(255), nullable=False),
    Column("effective_ms", BigInteger, nullable=False),
    Column("plan", String(16), nullable=False),
    Column("billing_mode", String(16), nullable=False),
    Column("stripe_customer_id", String(255), nullable=True),
    Column("stripe_subscription_id", String(255), nullable=True),
    Column("billing_provider", String(32), nullable=False),
    Column("src_partition", Integer, nullable=False),
    Column("src_offset", BigInteger, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("org_id", "effective_ms"),
)

partition_progress = Table(
    "partition_progress",
    metadata,
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("committed_offset", BigInteger, nullable=False),  # last offset written to the ledger
    Column("max_event_ms", BigInteger, nullable=True),  # newest event time written for this partition
    Column("highwater", BigInteger, nullable=True),  # log end as last seen by the owner
    Column("reported_ms", BigInteger, nullable=True),  # when the owner last reported
    Column("owner", String(255), nullable=True),
    PrimaryKeyConstraint("topic", "partition"),
)

closed_buckets = Table(
    "closed_buckets",
    metadata,
    Column("bucket_start", BigInteger, primary_key=True, autoincrement=False),
    Column("closed_ms", BigInteger, nullable=False),  # first closed
    Column("close_id", BigInteger, nullable=False),  # last close run that aggregated samples of it
    Column("seq", BigInteger, nullable=False, server_default="0"),  # samples of it up to here are aggregated
    # The bucket's billing decision (models.cutover.Decision), made once at its first close from the cutover
    # state then in force; every later row of the bucket is placed from it. NULL: not decided yet (a bucket
    # closed before decisions were stored and without a row to read one from): the next close decides.
    Column("decision", String(32), nullable=True),
)

close_runs = Table(
    "close_runs",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("started_ms", BigInteger, nullable=False),
    Column("watermark_ms", BigInteger, nullable=False),
    Column("samples", Integer, nullable=False),
    Column("rows", Integer, nullable=False),
    # After this run, every sample with seq <= upto_seq in a bucket <= last_bucket is aggregated.
    Column("upto_seq", BigInteger, nullable=False, server_default="0"),
    Column("last_bucket", BigInteger, nullable=True),
)

unbilled_usage = Table(
    "unbilled_usage",
    metadata,
    Column("org_id", String(255), nullable=False),
    Column("bucket_start", BigInteger, nullable=False),
    Column("reason", String(64), nullable=False),
    Column("samples", BigInteger, nullable=False),
    Column("mb_seconds", BigInteger, nullable=False),
    PrimaryKeyConstraint("org_id", "bucket_start", "reason"),
)

counters = Table(
    "counters",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# ------------------------------------------------------------------------------------------------ cutover
# The cutover's audit and state (also on the compacted billing-control topic, which a broker without
# compaction or retention cannot be trusted to keep): every change, plan, release and cancellation, and
# which worker has applied which state.

cutover_log = Table(
    "cutover_log",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("change_id", String(64), nullable=False),  # the same change recorded twice is one entry
    Column("kind", String(16), nullable=False),  # state | plan | release | cancel
    # The state columns: of the new state (kind state), of the planned one (plan: bill_from = T).
    Column("shadow", Integer, nullable=True),
    Column("bill_from", BigInteger, nullable=True),
    Column("bill_until", BigInteger, nullable=True),
    Column("authority", String(16), nullable=True),
    Column("by", String(255), nullable=False),
    Column("reason", Text, nullable=False),
    Column("command", Text, nullable=False),
    Column("changed_ms", BigInteger, nullable=False),  # when the change was made (its own changed_at)
    Column("recorded_ms", BigInteger, nullable=False),  # when this ledger recorded it
    Column("published_ms", BigInteger, nullable=True),  # when it was seen on billing-control (state only)
    Column("details", Text, nullable=False),  # JSON: forced problems, rows moved, the source, ...
    UniqueConstraint("change_id", name="uq_cutover_log_change_id"),
    Index("ix_cutover_log_kind", "kind", "seq"),
)

cutover_acks = Table(
    "cutover_acks",
    metadata,
    Column("owner", String(255), primary_key=True),  # the worker (host:pid)
    Column("seq", BigInteger, nullable=False),  # the state entry it applies (0: the environment's bootstrap)
    Column("acked_ms", BigInteger, nullable=False),
)

billing_prices = Table(
    "billing_prices",
    metadata,
    Column("key", String(100), primary_key=True),
    Column("meter", String(100), nullable=False),
    Column("price_id", String(255), nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

# ------------------------------------------------------------------------------------------------ parity
# The cell side (``sandbox-scale-events`` rows), the parity table, its bookkeeping and its alerts.
# Written by sinks.parity; cell_intervals is also read to tell whether a worker owned a sandbox at a time.

cell_intervals = Table(
    "cell_intervals",
    metadata,
    Column("id", String(255), primary_key=True),  # the cell row id (scale event id)
    Column("sandbox_id", String(255), nullable=False),
    Column("org_id", String(255), nullable=False),
    Column("cell_id", String(255), nullable=False),
    Column("worker_id", String(255), nullable=False),  # the worker that owns the sandbox during the interval
    Column("memory_mb", BigInteger, nullable=False),
    Column("cpu_percent", Integer, nullable=False),
    Column("disk_mb", BigInteger, nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    Column("ended_ms", BigInteger, nullable=True),  # NULL = open (counted up to now)
    Column("src_partition", Integer, nullable=False),
    Column("src_offset", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Index("ix_cell_intervals_sandbox", "sandbox_id", "started_ms"),
    Index("ix_cell_intervals_org", "org_id", "started_ms"),
)

usage_parity = Table(
    "usage_parity",
    metadata,
    Column("org_id", String(255), nullable=False),
    Column("bucket_start", BigInteger, nullable=False),
    Column("edge_mb_s", BigInteger, nullable=False),  # Σ memory_mb × interval_s of the raw samples
    Column("samples", BigInteger, nullable=False),
    Column("cell_mb_ms", BigInteger, nullable=False),  # Σ memory_mb × clipped ms of the cell intervals
    Column("slack_mb_ms", BigInteger, nullable=False),  # boundary slack (models.parity)
    Column("drift", String(40), nullable=False),  # (edge − cell) / cell, 6 decimals
    Column("status", String(16), nullable=False),  # ok | drift | edge_only | cell_only
    Column("updated_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("org_id", "bucket_start"),
    Index("ix_usage_parity_bucket", "bucket_start"),
    Index("ix_usage_parity_status", "status", "bucket_start"),
)

parity_dirty = Table(
    "parity_dirty",
    metadata,
    Column("bucket_start", BigInteger, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),  # bumped on every new mark; cleared only if unchanged
)

parity_alerts = Table(
    "parity_alerts",
    metadata,
    Column("id", String(255), primary_key=True),  # dedup key: billing_drift:{first bucket of the episode}
    Column("first_bucket", BigInteger, nullable=False),
    Column("fired_bucket", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("published_ms", BigInteger, nullable=True),  # NULL = not yet on the alerts topic
    Column("body", Text, nullable=False),  # the alert record (JSON)
)

parity_edge = Table(
    "parity_edge",
    metadata,
    # The edge side of parity, kept incrementally: Σ over the samples with seq <= parity_state
    # "edge_upto_seq" (read under the writer lock, so no sample below it can still be uncommitted), per
    # bucket and org, every org. The refresher adds each sample once instead of rescanning whole hours.
    Column("bucket_start", BigInteger, primary_key=True, autoincrement=False),
    Column("org_id", String(255), primary_key=True),
    Column("samples", BigInteger, nullable=False),
    Column("edge_mb_s", BigInteger, nullable=False),
)

parity_state = Table(
    "parity_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# --------------------------------------------------------------------------- Stripe webhooks and provisioning
# Written by sinks.webhooks.store: the received events (the inbox the webhook agent applies, each once), one
# row per record read from ``stripe-webhook-events``, subscription state for the ordering guard, each org's
# provisioning and published plan, the plan records still to publish on ``org-policy``, and a log of every
# provisioning done (authority edge) or only described (authority cell).

webhook_events = Table(
    "webhook_events",
    metadata,
    Column("event_id", String(255), primary_key=True),  # Stripe's evt_… id: the exactly-once key
    Column("type", String(100), nullable=False),
    Column("object_id", String(255), nullable=False),
    Column("org_id", String(255), nullable=True),
    Column("created_s", BigInteger, nullable=False),  # Stripe's event time
    Column("outcome", String(32), nullable=False),  # models.webhooks.Outcome (never 'duplicate')
    Column("detail", Text, nullable=True),
    Column("body", Text, nullable=False),  # the verified raw event JSON
    Column("deliveries", Integer, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),  # apply attempts that failed transiently
    Column("next_ms", BigInteger, nullable=False),  # a 'received' event is (re)applied from then on
    Column("first_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Index("ix_webhook_events_pending", "outcome", "next_ms"),
)

webhook_receipts = Table(
    "webhook_receipts",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("duplicate", Integer, nullable=False),  # 1: the event was already final when this record came
    Column("received_ms", BigInteger, nullable=False),
    UniqueConstraint("topic", "partition", "offset", name="uq_webhook_receipts_source"),
    Index("ix_webhook_receipts_event", "event_id"),
)

stripe_subscriptions = Table(
    "stripe_subscriptions",
    metadata,
    Column("subscription_id", String(255), primary_key=True),
    Column("org_id", String(255), nullable=False),
    Column("customer_id", String(255), nullable=True),
    Column("status", String(64), nullable=False),
    Column("event_created_s", BigInteger, nullable=False),  # created of the event that set the status
    Column("event_id", String(255), nullable=False),
    Column("provisioned", Integer, nullable=False),  # 1: created by edgebill's provisioning
    Column("updated_ms", BigInteger, nullable=False),
    Index("ix_stripe_subscriptions_org", "org_id"),
    Index("ix_stripe_subscriptions_customer", "customer_id"),
)

org_provisioning = Table(
    "org_provisioning",
    metadata,
    Column("org_id", String(255), primary_key=True),
    Column("customer_id", String(255), nullable=True),
    Column("subscription_id", String(255), nullable=True),  # the last one provisioned
    Column("generation", Integer, nullable=False),  # subscriptions provisioned so far (idempotency key suffix)
    Column("credit_txn_id", String(255), nullable=True),  # the sign-up credit, once applied
    Column("plan", String(16), nullable=True),  # models.webhooks.PlanState
    Column("plan_since_s", BigInteger, nullable=True),
    Column("plan_last_s", BigInteger, nullable=True),
    Column("plan_floor_s", BigInteger, nullable=True),
    Column("updated_ms", BigInteger, nullable=False),
    Index("ix_org_provisioning_customer", "customer_id"),
)

webhook_policy_outbox = Table(
    "webhook_policy_outbox",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("org_id", String(255), nullable=False),
    Column("effective_ms", BigInteger, nullable=False),
    Column("body", Text, nullable=False),  # the org-policy record (JSON)
    Column("event_id", String(255), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("published_ms", BigInteger, nullable=True),  # NULL = not yet on org-policy
    Index("ix_webhook_policy_outbox_pending", "published_ms", "id"),
)

provisioning_log = Table(
    "provisioning_log",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("event_id", String(255), nullable=False),
    Column("org_id", String(255), nullable=False),
    Column("customer_id", String(255), nullable=False),
    Column("mode", String(16), nullable=False),  # 'edge': done; 'shadow': what would have been done
    Column("subscription_id", String(255), nullable=True),
    Column("credit_txn_id", String(255), nullable=True),
    Column("detail", Text, nullable=False),  # JSON: idempotency keys, prices, credit, plan
    Column("created_ms", BigInteger, nullable=False),
    Index("ix_provisioning_log_org", "org_id"),
)


# ---------------------------------------------------------------------------------- reconciliation with Stripe
# Written by sinks.reconcile.store: each scheduled run, the latest result per (org, customer, meter, window) with
# how many runs in a row it has differed, the alerts (the dedup), the repairs done (each with its evidence) and
# the latest invoice-preview check per subscription line.

reconcile_runs = Table(
    "reconcile_runs",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("started_ms", BigInteger, nullable=False),
    Column("finished_ms", BigInteger, nullable=False),
    Column("window_lo", BigInteger, nullable=False),  # the range compared, unix s
    Column("window_hi", BigInteger, nullable=False),
    Column("grouping", String(8), nullable=False),  # Stripe's value_grouping_window: day | hour
    Column("compared", Integer, nullable=False),
    Column("differences", Integer, nullable=False),
    Column("unsettled", Integer, nullable=False),  # windows not closed, not sent, or sent too recently
    Column("requests", Integer, nullable=False),  # Stripe requests made
    Column("throttled", Integer, nullable=False),  # of which answered 429
    Column("invoice_lines", Integer, nullable=False),
    Column("invoice_differences", Integer, nullable=False),
    Column("error", Text, nullable=True),  # why the run could not compare (Stripe unreachable, ...)
    Column("summary", Text, nullable=False),  # JSON: windows by label
)

reconcile_results = Table(
    "reconcile_results",
    metadata,
    Column("org_id", String(255), nullable=False),
    Column("customer_id", String(255), nullable=False),
    Column("meter", String(100), nullable=False),
    Column("window_start", BigInteger, nullable=False),
    Column("grouping", String(8), nullable=False),
    Column("label", String(32), nullable=False),  # models.reconcile.Label
    Column("ledger_value", String(40), nullable=False),  # what Stripe should hold
    Column("stripe_value", String(40), nullable=True),  # what it holds (NULL: it could not say)
    Column("lost_value", String(40), nullable=False),
    Column("causes", Text, nullable=False),  # JSON
    Column("streak", Integer, nullable=False),  # consecutive runs with a difference (0 when ok)
    Column("first_run", BigInteger, nullable=True),  # the run the current difference was first seen in
    Column("run_id", BigInteger, nullable=False),  # the run that wrote this result
    Column("checked_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("org_id", "customer_id", "meter", "window_start", "grouping"),
    Index("ix_reconcile_results_run", "run_id"),
)

reconcile_alerts = Table(
    "reconcile_alerts",
    metadata,
    Column("id", String(255), primary_key=True),  # dedup key: models.reconcile.alert_id
    Column("org_id", String(255), nullable=False),
    Column("meter", String(100), nullable=False),
    Column("window_start", BigInteger, nullable=False),
    Column("label", String(32), nullable=False),
    Column("first_run", BigInteger, nullable=False),
    Column("fired_run", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("published_ms", BigInteger, nullable=True),  # NULL = not yet on the alerts topic
    Column("body", Text, nullable=False),  # the alert record (JSON)
)

reconcile_repairs = Table(
    "reconcile_repairs",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("row_id", String(255), nullable=False),  # the row Stripe does not hold
    Column("action", String(16), nullable=False),  # models.reconcile.RepairAction
    Column("new_row_id", String(255), nullable=True),  # the row billing it again (replace)
    Column("value", String(40), nullable=False),
    Column("cause", String(64), nullable=False),
    Column("evidence", Text, nullable=False),  # JSON: Stripe's and the ledger's values when it was decided
    Column("by", String(255), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("reason", Text, nullable=True),  # the operator's --reason
    # An over-billing repair's idempotency key (models.reconcile_over.over_key): one write per key, ever.
    Column("repair_key", String(100), nullable=True),
    Index("ix_reconcile_repairs_row", "row_id"),
    Index("ux_reconcile_repairs_key", "repair_key", unique=True),
)

reconcile_invoices = Table(
    "reconcile_invoices",
    metadata,
    Column("subscription_id", String(255), nullable=False),
    Column("price_id", String(255), nullable=False),
    Column("org_id", String(255), nullable=False),
    Column("customer_id", String(255), nullable=False),
    Column("meter", String(100), nullable=True),  # NULL: a price edgebill's catalog does not have
    Column("period_start", BigInteger, nullable=False),
    Column("period_end", BigInteger, nullable=False),
    Column("stripe_quantity", String(40), nullable=False),
    Column("ledger_value", String(40), nullable=False),
    Column("pending_value", String(40), nullable=False),
    Column("label", String(32), nullable=False),
    Column("detail", Text, nullable=False),
    Column("run_id", BigInteger, nullable=True),
    Column("checked_ms", BigInteger, nullable=False),
    # Scheduled runs in a row this line differed (settled) in, and the run it was first seen in (alerts).
    Column("streak", Integer, nullable=False, server_default="0"),
    Column("first_run", BigInteger, nullable=True),
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
