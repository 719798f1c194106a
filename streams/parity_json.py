"""The one JSON form of parity figures, shared by ``/internal/usage-parity``, the dashboard and the CLI.

Numbers: every GB-s figure and every drift is a JSON number with at most 6 decimals. The ledger's values
are exact decimals; quantized to 6 decimals they have at most 15 significant digits for any realistic
usage (below a billion GB-s per org and hour), so the number's text round-trips exactly through a double
and a reader may parse it as a decimal without loss. Counts are integers, times unix seconds.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

from models.parity import gb_seconds_of_mb_ms
from sinks.parity import GateStatus, ParityRow, WindowOrg

__all__ = ["gate_json", "number", "row_json", "window_org_json"]

_Q6: Final = Decimal("0.000001")


def number(d: Decimal) -> float:
    """A 6-decimal JSON number (its text is exact: ≤ 15 significant digits round-trip through a float)."""
    return float(d.quantize(_Q6))


def row_json(r: ParityRow) -> dict[str, Any]:
    """One (org, bucket) row of the parity table."""
    return {
        "org_id": r.org_id,
        "bucket_start": r.bucket_start,
        "gb_seconds": number(r.edge_gb_s),
        "samples": r.samples,
        "cell_gb_seconds": number(r.cell_gb_s),
        "slack_gb_seconds": number(gb_seconds_of_mb_ms(r.slack_mb_ms)),
        "drift": number(r.drift),
        "status": r.status.value,
    }


def window_org_json(o: WindowOrg) -> dict[str, Any]:
    """One org over a whole window (the ``/internal/usage-parity`` shape)."""
    return {
        "org_id": o.org_id,
        "gb_seconds": number(o.measure.edge_gb_s),
        "samples": o.measure.samples,
        "cell_gb_seconds": number(o.measure.cell_gb_s),
        "drift": number(o.drift),
        "status": o.status.value,
    }


def gate_json(gate: GateStatus, required_hours: Decimal) -> dict[str, Any]:
    """The cutover gate: consecutive clean settled hours against the hours required."""
    return {
        "clean_buckets": gate.clean_buckets,
        "clean_hours": number(gate.clean_hours),
        "required_hours": number(required_hours),
        "open": gate.clean_hours >= required_hours,
        "last_settled": gate.last_settled,
        "last_flagged": gate.last_flagged,
    }
