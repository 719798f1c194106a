"""The closer prices stored batches as columns (:meth:`Pricer.collect_columns`); replay prices ticks one by one
(:meth:`Pricer.collect`). Both must bill every tick alike: zombie ticks, policy changes inside a bucket, unknown
orgs and every memory size and interval, in any mix."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from models.billing import bucket_start
from models.policy import OrgPolicy
from models.ticks import Tick, TickColumns
from models.usage import Groups, Pricer
from models.zombie import Interval

H = 3600
B0 = 1_790_000_000 // H * H
ORGS = ["a", "b", "c", "nobody"]
SANDBOXES = ["sb1", "sb2", "sb3"]
WORKERS = ["", "w-a", "w-b"]


def _pol(org: str, at_s: int, plan: str = "pro") -> OrgPolicy:
    return OrgPolicy.model_validate({"org_id": org, "plan": plan, "effective_at": at_s})


_tick = st.builds(
    lambda i, org, sb, w, mem, secs, off: Tick(f"t{i}", org, sb, w, "c", mem, 2, secs, (B0 + 2 * H) * 1000 + off),
    st.integers(0, 10**6),
    st.sampled_from(ORGS),
    st.sampled_from(SANDBOXES),
    st.sampled_from(WORKERS),
    st.sampled_from([512, 1024, 2048, 4096, 3000]),
    st.sampled_from([0, 1, 10, 20, 60]),
    st.integers(0, H * 1000 - 1),
)


def _columns(ticks: list[Tick]) -> TickColumns:
    names: dict[str, int] = {}
    org = [names.setdefault(t.org_id, len(names)) for t in ticks]
    return TickColumns(
        list(names),
        org,
        [t.sandbox_id for t in ticks],
        [t.worker_id for t in ticks],
        [t.memory_mb for t in ticks],
        [t.interval_s for t in ticks],
        [t.ts_ms for t in ticks],
    )


@settings(max_examples=300, deadline=None)
@given(
    ticks=st.lists(_tick, min_size=1, max_size=60),
    change_inside=st.booleans(),
    known_sandboxes=st.sets(st.sampled_from(SANDBOXES)),
)
def test_columns_and_ticks_price_alike(ticks: list[Tick], change_inside: bool, known_sandboxes: set[str]) -> None:
    b = B0 + 2 * H
    policies = {"a": [_pol("a", 0)], "b": [_pol("b", 0, plan="free")], "c": [_pol("c", 0)]}
    if change_inside:  # org a goes free at :30 of the bucket: its ticks are priced one by one
        policies["a"].append(_pol("a", b + 1800, plan="free"))
    intervals: list[Interval] = [(sb, "w-a", (b + 600) * 1000, (b + 1800) * 1000) for sb in sorted(known_sandboxes)]
    pricer = Pricer(policies, intervals, H)
    assert all(bucket_start(t.ts_ms, H) == b for t in ticks)

    by_tick = pricer.price(ticks)
    groups = Groups()
    pricer.collect_columns(b, _columns(ticks), groups)
    by_columns = pricer.finish(groups)

    assert by_columns.billable == by_tick.billable
    assert by_columns.unbilled == by_tick.unbilled
    assert by_columns.modes == by_tick.modes
    # And against a count of the ticks themselves: nothing lost, nothing twice.
    counted = sum(n for _, n in by_columns.billable.values()) + sum(n for n, _ in by_columns.unbilled.values())
    assert counted == len(ticks)
