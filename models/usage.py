"""Usage priced: ticks grouped as billing groups them and priced with the rules of :mod:`models.pricing` and
:mod:`models.zombie`. The one home of that grouping: the closer prices the ticks it aggregates through
:class:`Pricer`, and replay prices the ticks it re-derives from the topic through it, so the two cannot
disagree on how a tick is billed.

Grouping: ticks of one (org, bucket, memory size) are priced together (pricing is additive per tick, so a
group's price is the sum of its ticks' prices); ticks of an (org, bucket) with a policy change strictly inside
the bucket are priced one by one with the policy in force at each tick's time; zombie ticks are set aside as
unbilled usage.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import TypeVar

from models.billing import BillingMode, bucket_start, mb_seconds
from models.policy import OrgPolicy, PolicyHistory
from models.pricing import ZOMBIE, Priced, Unbilled, price_usage
from models.ticks import Tick, TickColumns
from models.zombie import Interval, is_zombie, ownership_by_sandbox

__all__ = ["Aggregates", "Groups", "Key", "Pricer"]

# Key of a priced aggregate: (org, bucket start, meter) for billable units, (org, bucket, reason) unbilled.
Key = tuple[str, int, str]
_K = TypeVar("_K", bound=tuple[str, int, str | int])


@dataclass(slots=True)
class Aggregates:
    """Priced usage: billable ``(org, bucket, meter) -> [units, samples]``, unbilled
    ``(org, bucket, reason) -> [samples, mb_seconds]``."""

    billable: dict[Key, list[int]] = field(default_factory=dict)
    unbilled: dict[Key, list[int]] = field(default_factory=dict)
    modes: dict[Key, BillingMode] = field(default_factory=dict)  # billable key -> the mode it was priced under

    def merge(self, other: Aggregates, sign: int = 1) -> None:
        """Add (``sign=-1``: subtract) ``other``; pricing is additive per tick, so this is exact."""
        for src, dst in ((other.billable, self.billable), (other.unbilled, self.unbilled)):
            for k, (a, b) in src.items():
                slot = dst.get(k)
                if slot is None:
                    dst[k] = [sign * a, sign * b]
                else:
                    slot[0] += sign * a
                    slot[1] += sign * b
        self.modes.update(other.modes)


@dataclass(slots=True)
class Groups:
    """Ticks grouped for pricing: (org, bucket start, memory_mb) -> [n, seconds]; ticks to price one by one;
    zombie usage (org, bucket, "zombie") -> [n, mb_seconds]."""

    groups: dict[tuple[str, int, int], list[int]] = field(default_factory=dict)
    singles: list[Tick] = field(default_factory=list)
    zombies: dict[Key, list[int]] = field(default_factory=dict)


class Pricer:
    """Prices ticks: the closer, replay and the reports price through this one class. Pure."""

    def __init__(
        self,
        policies: Mapping[str, Sequence[OrgPolicy]],
        intervals: Iterable[Interval],
        bucket_seconds: int,
    ) -> None:
        """``intervals``: (sandbox, worker, started_ms, ended_ms or None) rows of the cell side's ownership."""
        self.bucket_seconds = bucket_seconds
        self.histories = {org: PolicyHistory(list(pols)) for org, pols in policies.items()}
        # (org, bucket) pairs with a policy change strictly inside: priced per tick, as the closer does.
        size_ms = bucket_seconds * 1000
        self.split: set[tuple[str, int]] = set()
        for org, pols in policies.items():
            for p in pols:
                if p.effective_at_ms % size_ms:
                    self.split.add((org, bucket_start(p.effective_at_ms, bucket_seconds)))
        self.cells = ownership_by_sandbox(intervals)

    def is_zombie(self, sandbox: str, worker: str, ts_ms: int, interval_s: int) -> bool:
        """:func:`models.zombie.is_zombie` for a tick of ``sandbox``, with the ownership this pricer holds."""
        return is_zombie(self.cells.get(sandbox), worker, ts_ms, interval_s)

    def price(self, ticks: Iterable[Tick], out: Aggregates | None = None) -> Aggregates:
        """Add the priced usage of ``ticks`` (unique ticks) to ``out`` and return it."""
        groups = Groups()
        self.collect(ticks, groups)
        return self.finish(groups, out)

    def collect(self, ticks: Iterable[Tick], into: Groups) -> None:
        """The hot loop: group ``ticks`` by (org, bucket, memory size) — the closer's grouping — with the
        zombie test only for sandboxes the cell side knows; ticks of a bucket with a policy change are set
        aside to be priced one by one. Nothing is priced yet (see :meth:`finish`)."""
        size = self.bucket_seconds
        bs = bucket_start
        owners = self.cells
        zombie = is_zombie
        split = self.split
        groups = into.groups
        singles = into.singles
        unbilled = into.zombies
        b, lo_ms, hi_ms = 0, 0, -1  # the last tick's bucket and its bounds: ticks come mostly bucket by bucket
        for t in ticks:
            _, org, sandbox, worker, _, mem, _, secs, ts = t  # one unpack: cheaper than six attribute reads
            if not lo_ms <= ts < hi_ms:
                b = bs(ts, size)
                lo_ms, hi_ms = b * 1000, (b + size) * 1000
            if owners and sandbox in owners and zombie(owners[sandbox], worker, ts, secs):
                _add(unbilled, (org, b, ZOMBIE), 1, mb_seconds(mem, secs))
                continue
            if split and (org, b) in split:
                singles.append(t)
                continue
            key = (org, b, mem)
            g = groups.get(key)
            if g is None:
                groups[key] = [1, secs]
            else:
                g[0] += 1
                g[1] += secs

    def collect_columns(self, bucket: int, cols: TickColumns, into: Groups) -> None:
        """:meth:`collect` for ticks given as columns, all of bucket ``bucket`` (a stored batch): the same
        groups, in bulk. Ticks of a sandbox the cell side knows (the zombie test) and of an org whose policy
        changes inside the bucket (priced one by one) take :meth:`collect`'s per-tick path; the others are
        counted per (org, memory size, interval) in C and summed per group from those counts."""
        names = cols.org_names
        split_org = [(name, bucket) in self.split for name in names] if self.split else []
        special: list[bool] | None = [split_org[o] for o in cols.org] if any(split_org) else None
        if self.cells:
            owners = self.cells
            known = [sb in owners for sb in cols.sandbox_id]
            special = known if special is None else [a or b for a, b in zip(special, known, strict=True)]
        keep: list[bool] | None = None
        if special is not None and any(special):
            self.collect((cols.tick(i) for i in compress(range(len(special)), special)), into)
            keep = [not f for f in special]
        counted = zip(cols.org, cols.memory_mb, cols.interval_s, strict=True)
        groups = into.groups
        for (o, mem, secs), n in Counter(counted if keep is None else compress(counted, keep)).items():
            _add(groups, (names[o], bucket, mem), n, n * secs)

    def finish(self, collected: Groups, out: Aggregates | None = None) -> Aggregates:
        """Price what :meth:`collect` grouped (a group's MB-s: its memory size times its seconds)."""
        acc = Aggregates() if out is None else out
        size = self.bucket_seconds
        hist = self.histories
        for key, (n, mbs) in collected.zombies.items():
            _add(acc.unbilled, key, n, mbs)
        for (org, b, mem), (n, secs) in collected.groups.items():
            h = hist.get(org)
            mbs = mb_seconds(mem, secs)
            _book(acc, price_usage(h.as_of(b * 1000) if h else None, mem, secs, mbs), org, b, n, mbs)
        for t in collected.singles:
            h = hist.get(t.org_id)
            mbs = mb_seconds(t.memory_mb, t.interval_s)
            price = price_usage(h.as_of(t.ts_ms) if h else None, t.memory_mb, t.interval_s, mbs)
            _book(acc, price, t.org_id, bucket_start(t.ts_ms, size), 1, mbs)
        return acc


def _book(acc: Aggregates, price: Priced | Unbilled, org: str, b: int, n: int, mbs: int) -> None:
    """Add ``n`` ticks priced as ``price`` to the billable or unbilled aggregates."""
    if isinstance(price, Priced):
        key = (org, b, price.meter)
        _add(acc.billable, key, price.units, n)
        acc.modes[key] = price.mode
    else:
        _add(acc.unbilled, (org, b, price.reason), n, mbs)


def _add(d: dict[_K, list[int]], key: _K, a: int, b: int) -> None:
    slot = d.get(key)
    if slot is None:
        d[key] = [a, b]
    else:
        slot[0] += a
        slot[1] += b
