"""The zombie rule's one table of cases, run through the rule (``models.zombie.is_zombie``) and through the
closer, which applies it by way of ``models.usage.Pricer`` as replay does.

``MIGRATION``: sb1 is owned by w-a for 20 minutes, migrates to w-b, which stops it at :40; sb2 runs on
w-a. ``EDGES``: the slack boundaries to the millisecond, for several tick intervals. Each case is
``name -> (sandbox, worker, ts_ms, interval_s, zombie)``.
"""

from __future__ import annotations

from models.zombie import ZOMBIE_SLACK_MS, Interval

H = 3600
B0 = 1_790_000_000 // H * H  # a bucket start (unix s)

Case = tuple[str, str, int, int, bool]

MIGRATION_INTERVALS: list[Interval] = [
    ("sb1", "w-a", B0 * 1000, (B0 + 1200) * 1000),
    ("sb1", "w-b", (B0 + 1200) * 1000, (B0 + 2400) * 1000),
    ("sb2", "w-a", B0 * 1000, None),
]

MIGRATION: dict[str, Case] = {
    "ok-owner-a": ("sb1", "w-a", (B0 + 600) * 1000, 20, False),
    "ok-final-flush-a": ("sb1", "w-a", (B0 + 1210) * 1000, 20, False),  # a last slice after migrating: in slack
    "zombie-not-owner": ("sb1", "w-a", (B0 + 1800) * 1000, 20, True),  # w-a keeps ticking after the migration
    "ok-owner-b": ("sb1", "w-b", (B0 + 1800) * 1000, 20, False),
    "zombie-after-stop": ("sb1", "w-b", (B0 + 3000) * 1000, 20, True),  # the sandbox ended at :40
    "zombie-other-worker": ("sb2", "w-b", (B0 + 100) * 1000, 20, True),
    "ok-open-interval": ("sb2", "w-a", (B0 + 3500) * 1000, 20, False),
    "ok-unknown-sandbox": ("sb3", "w-z", (B0 + 100) * 1000, 20, False),  # no cell data: allowed
    "ok-no-worker-id": ("sb1", "", (B0 + 3000) * 1000, 20, False),  # an old producer without worker id
    "ok-before-known": ("sb1", "w-z", (B0 - 3600) * 1000, 20, False),  # the cell knew nothing of sb1 yet
}

# e1: w0 owns it for 10 minutes, then w1 for 10 minutes.  e2: w2 from K on, open.  e3: w4, with a gap.
E = (B0 + 2 * H) * 1000
K = (B0 + 3 * H) * 1000
G = (B0 + 4 * H) * 1000
EDGE_INTERVALS: list[Interval] = [
    ("e1", "w0", E - 600_000, E),
    ("e1", "w1", E, E + 600_000),
    ("e2", "w2", K, None),
    ("e3", "w4", G, G + 100_000),
    ("e3", "w4", G + 1_000_000, None),
]


def _slack(interval_s: int) -> int:
    return interval_s * 1000 + ZOMBIE_SLACK_MS


EDGES: dict[str, Case] = {
    # The start of w1's interval, less the slack: covered up to the millisecond.
    "start-slack": ("e1", "w1", E - _slack(20), 20, False),
    "start-slack-1ms": ("e1", "w1", E - _slack(20) - 1, 20, True),  # w0 owned it then
    # The end of w1's interval, plus the slack, for several tick lengths.
    "end-slack-20s": ("e1", "w1", E + 600_000 + _slack(20), 20, False),
    "end-slack-20s+1ms": ("e1", "w1", E + 600_000 + _slack(20) + 1, 20, True),
    "end-slack-60s": ("e1", "w1", E + 600_000 + _slack(60), 60, False),
    "end-slack-60s+1ms": ("e1", "w1", E + 600_000 + _slack(60) + 1, 60, True),
    "end-slack-0s": ("e1", "w1", E + 600_000 + _slack(0), 0, False),
    "end-slack-0s+1ms": ("e1", "w1", E + 600_000 + _slack(0) + 1, 0, True),
    "previous-owner-in-slack": ("e1", "w0", E + _slack(20), 20, False),
    "previous-owner-after-slack": ("e1", "w0", E + _slack(20) + 1, 20, True),
    # When the sandbox counts as known: its first interval starts within the slack after the tick.
    "known-at-slack": ("e2", "w3", K - _slack(20), 20, True),
    "unknown-before-slack": ("e2", "w3", K - _slack(20) - 1, 20, False),
    "open-interval-far-later": ("e2", "w2", K + 10 * 86_400_000, 20, False),
    "no-worker-id-while-known": ("e2", "", K + 1000, 20, False),
    # Two intervals of one worker with a gap between them.
    "gap-between-intervals": ("e3", "w4", G + 500_000, 20, True),
    "first-interval-end-slack": ("e3", "w4", G + 100_000 + _slack(20), 20, False),
    "second-interval-start-slack": ("e3", "w4", G + 1_000_000 - _slack(20), 20, False),
}

INTERVALS: list[Interval] = MIGRATION_INTERVALS + EDGE_INTERVALS
CASES: dict[str, Case] = {**MIGRATION, **EDGES}
