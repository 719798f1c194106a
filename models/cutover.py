"""The cutover: which side bills Pro usage, from which bucket on, and whether the edge sends at all.

The state (``shadow``, ``bill_from`` T, ``bill_until`` R, ``authority``) changes only by operator commands,
kept as a history on ``billing-control`` and in the ledger. A bucket's billing decision is made once, at
its first close, from the state in force then; every later correction inherits it, so a bucket is billed by
the edge in full or not at all. Pure functions; no I/O.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.billing import Authority

__all__ = [
    "CONTROL_KEY",
    "CutoverState",
    "Decision",
    "armed_state",
    "decide",
    "decision_from_row_states",
    "interlock_problems",
    "is_explicit_shadow_value",
    "parse_shadow",
    "plan_problems",
    "rollback_problems",
    "rolled_back_state",
]

CONTROL_KEY: Final = "cutover"


class Decision(StrEnum):
    """What the edge does with one bucket's usage, decided once at the bucket's first close."""

    BILLED = "billed"  # rows are sent to Stripe (state pending -> sent)
    SHADOW = "shadow"  # rows are kept, never sent unless the bucket is released by an operator
    SKIPPED_BEFORE_BILL_FROM = "skipped_before_bill_from"  # the cell bills it (before T)
    SKIPPED_ROLLED_BACK = "skipped_rolled_back"  # the cell bills it again (at or after a rollback R)


def parse_shadow(value: object) -> bool:
    """``SHADOW`` is off only for an explicit false; anything else keeps the edge in shadow.

    A typo must never start billing: ``0``, ``no``, ``off``, an empty string or ``flase`` all mean shadow.
    Accepted as false: the boolean ``False`` and the text ``false`` in any case, with surrounding blanks.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() != "false"
    return True


def is_explicit_shadow_value(value: object) -> bool:
    """True when ``value`` is an unambiguous true or false (``check-config`` warns about anything else)."""
    if isinstance(value, bool):
        return True
    return isinstance(value, str) and value.strip().lower() in ("true", "false")


class CutoverState(BaseModel):
    """One cutover state, as carried on the control topic and recorded in the ledger."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    shadow: bool = True
    bill_from: int = Field(default=0, ge=0)
    bill_until: int | None = Field(default=None, ge=0)
    authority: Authority = Authority.CELL
    changed_at_ms: int = Field(default=0, ge=0, alias="changed_at")
    by: str = Field(default="", max_length=255)
    reason: str = Field(default="", max_length=2000)
    command: str = Field(default="", max_length=2000)

    @field_validator("shadow", mode="before")
    @classmethod
    def _shadow(cls, v: Any) -> bool:
        return parse_shadow(v)

    @field_validator("changed_at_ms", mode="before")
    @classmethod
    def _ms(cls, v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError("changed_at must be unix milliseconds or an RFC 3339 timestamp")
        if isinstance(v, int):
            return v
        if isinstance(v, str):
            try:
                dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError as exc:
                raise ValueError("changed_at must be unix milliseconds or an RFC 3339 timestamp") from exc
            if dt.tzinfo is None:
                raise ValueError("changed_at needs a UTC offset")
            return int(dt.timestamp() * 1000)
        raise ValueError("changed_at must be unix milliseconds or an RFC 3339 timestamp")

    @property
    def change_id(self) -> str:
        """A stable id of this change (the same record read twice is one change)."""
        return hashlib.sha256(self.to_json()).hexdigest()[:24]

    @property
    def live(self) -> bool:
        """The edge sends rows to Stripe."""
        return not self.shadow

    def flags(self) -> tuple[bool, int, int | None, Authority]:
        """The fields that decide billing (two states with the same flags bill the same)."""
        return (self.shadow, self.bill_from, self.bill_until, self.authority)

    def to_wire(self) -> dict[str, Any]:
        return {
            "shadow": self.shadow,
            "bill_from": self.bill_from,
            "bill_until": self.bill_until,
            "authority": self.authority.value,
            "changed_at": datetime.fromtimestamp(self.changed_at_ms / 1000, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "by": self.by,
            "reason": self.reason,
            "command": self.command,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_wire(), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, raw: bytes) -> CutoverState:
        return cls.model_validate(orjson.loads(raw))


def decide(state: CutoverState, bucket_start: int) -> Decision:
    """The edge's decision for a bucket closing now under ``state``.

    Order matters: the cutover boundaries first (the cell bills those buckets, so nothing the edge
    computes for them may ever be sent), then shadow, then billed.
    """
    if bucket_start < state.bill_from:
        return Decision.SKIPPED_BEFORE_BILL_FROM
    if state.bill_until is not None and bucket_start >= state.bill_until:
        return Decision.SKIPPED_ROLLED_BACK
    if state.shadow:
        return Decision.SHADOW
    return Decision.BILLED


def interlock_problems(state: CutoverState, bucket_seconds: int) -> list[str]:
    """States that could bill the same usage twice or leave usage billed by nobody, with the reason.

    The same rules hold for the environment's bootstrap state (``check-config``) and for every state a
    cutover command would publish.
    """
    problems: list[str] = []
    if not state.shadow:
        if state.authority is not Authority.EDGE and state.bill_until is None:
            problems.append(
                "live sending (SHADOW=false) requires authority edge (PRO_BILLING_AUTHORITY=edge; or, after a "
                "rollback, a bill_until boundary): with the cell authoritative for every hour both sides would "
                "bill the same usage"
            )
        if state.bill_from <= 0:
            problems.append(
                "live sending (SHADOW=false) requires a cutover boundary bill_from > 0 (BILL_FROM > 0): without "
                "it the edge would bill hours the cell already billed"
            )
    for name, value in (("bill_from", state.bill_from), ("bill_until", state.bill_until)):
        if value and value % bucket_seconds:
            lower = value - value % bucket_seconds
            problems.append(
                f"{name}={value} is not aligned to the bucket size {bucket_seconds}: the straddling bucket "
                f"would be billed by neither side or by both (use {lower} or {lower + bucket_seconds})"
            )
    if state.bill_until is not None and state.bill_until < state.bill_from:
        problems.append(f"bill_until={state.bill_until} is before bill_from={state.bill_from}")
    if state.authority is Authority.EDGE and state.shadow:
        problems.append(
            "authority edge with shadow on (PRO_BILLING_AUTHORITY=edge, SHADOW on): the cell stops billing but "
            "the edge does not send, so usage from now on would be billed by nobody"
        )
    if state.authority is Authority.EDGE and state.bill_until is not None:
        problems.append("authority edge with a rollback boundary bill_until: the cell bills from bill_until on")
    return problems


def decision_from_row_states(states: set[str]) -> Decision | None:
    """The decision a bucket closed before decisions were stored was billed under, read from the states of
    its rows: any ``shadow`` row -> shadow (its first row decided it), any skipped row -> skipped, any other
    row -> billed; no row at all -> None (nothing was decided that a later row must follow)."""
    if not states:
        return None
    if "shadow" in states:
        return Decision.SHADOW
    if "skipped_before_bill_from" in states:
        return Decision.SKIPPED_BEFORE_BILL_FROM
    if "skipped_rolled_back" in states:
        return Decision.SKIPPED_ROLLED_BACK
    return Decision.BILLED


def _iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_problems(
    at: int, *, now_s: int, bucket_seconds: int, clean_hours: Decimal, required_hours: Decimal
) -> list[str]:
    """Why a cutover at ``at`` (T) should not be planned now (empty: it may).

    * T must be a bucket boundary: otherwise the straddling bucket is billed by neither side or by both;
    * T must be in the future: the cell bills every hour up to the moment it is told to stop, and a bucket
      at or after T that closes before the plan is armed is decided in shadow (a gap);
    * the parity soak must have proved the numbers: ``clean_hours`` (settled hours with usage on both sides
      since the last flagged one) at least ``required_hours``.
    """
    problems: list[str] = []
    if at % bucket_seconds:
        lower = at - at % bucket_seconds
        problems.append(
            f"T={at} ({_iso(at)}) is not on a bucket boundary of {bucket_seconds} s "
            f"(use {lower} or {lower + bucket_seconds})"
        )
    if at <= now_s:
        problems.append(f"T={at} ({_iso(at)}) is not in the future (now {_iso(now_s)})")
    if clean_hours < required_hours:
        problems.append(
            f"parity has {clean_hours:g} consecutive clean hour(s) with usage on both sides; the cutover needs "
            f"{required_hours:g} (EDGEBILL_CUTOVER_CLEAN_HOURS)"
        )
    return problems


def armed_state(at: int, *, changed_at_ms: int, by: str, reason: str, command: str) -> CutoverState:
    """The live state a plan at T becomes: the edge sends, bills buckets from T, and is authoritative (the
    cell side stops billing when it reads it)."""
    return CutoverState.model_validate(
        {
            "shadow": False,
            "bill_from": at,
            "bill_until": None,
            "authority": Authority.EDGE,
            "changed_at": changed_at_ms,
            "by": by,
            "reason": reason,
            "command": command,
        }
    )


def rollback_problems(current: CutoverState, until: int, bucket_seconds: int) -> list[str]:
    """Why a rollback to the cell from ``until`` (R) cannot be made from ``current`` (empty: it can)."""
    problems: list[str] = []
    if current.bill_from <= 0 or current.shadow:
        problems.append("nothing to roll back: the edge is not billing (no armed cutover is in force)")
    if until % bucket_seconds:
        lower = until - until % bucket_seconds
        problems.append(f"R={until} is not on a bucket boundary (use {lower} or {lower + bucket_seconds})")
    if current.bill_from and until < current.bill_from:
        problems.append(f"R={until} ({_iso(until)}) is before T={current.bill_from} ({_iso(current.bill_from)})")
    if current.bill_until is not None and until > current.bill_until:
        problems.append(
            f"R={until} is after the rollback already in force (R={current.bill_until}): buckets from "
            f"{current.bill_until} are billed by the cell"
        )
    return problems


def rolled_back_state(
    current: CutoverState, until: int, *, changed_at_ms: int, by: str, reason: str, command: str
) -> CutoverState:
    """The state after a rollback at R: the cell is authoritative again and bills from R; the edge keeps
    sending the buckets in [T, R) (shadow stays off), so no hour is billed by neither side."""
    return CutoverState.model_validate(
        {
            "shadow": False,
            "bill_from": current.bill_from,
            "bill_until": until,
            "authority": Authority.CELL,
            "changed_at": changed_at_ms,
            "by": by,
            "reason": reason,
            "command": command,
        }
    )
