"""``sinks.parity`` is a package split by job; every name callers import from it stays importable there."""

from __future__ import annotations

import importlib

import pytest

import sinks.parity

NAMES_BY_JOB = {
    "sinks.parity.base": ["ParityConfig"],
    "sinks.parity.cells": ["ScaleWriteResult", "SourcedScaleEvent"],
    "sinks.parity.edge": ["EDGE_UPTO"],
    "sinks.parity.refresh": ["PendingAlert", "RefreshResult", "RefreshState"],
    "sinks.parity.reads": ["GateStatus", "MetricsSnapshot", "ParityRow", "WindowOrg"],
}


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in NAMES_BY_JOB.items() for n in names])
def test_each_name_is_exported_from_the_package_and_defined_in_its_job_module(module: str, name: str) -> None:
    assert name in sinks.parity.__all__
    assert getattr(sinks.parity, name) is getattr(importlib.import_module(module), name)


def test_the_store_has_every_job_and_is_built_as_before() -> None:
    from sinks.parity import ParityStore
    from sinks.parity.cells import CellSide
    from sinks.parity.edge import EdgeSide
    from sinks.parity.reads import ParityReads
    from sinks.parity.refresh import Refresher

    assert all(issubclass(ParityStore, job) for job in (CellSide, EdgeSide, Refresher, ParityReads))
    public = {n for n in dir(ParityStore) if not n.startswith("_")}
    assert public >= {
        "write_scale_events",
        "record_progress",
        "intervals",
        "advance_edge",
        "refresh",
        "recompute_range",
        "mark_published",
        "window",
        "rows",
        "state",
        "alerts",
        "gate",
        "metrics",
    }
    assert set(sinks.parity.__all__) == {n for names in NAMES_BY_JOB.values() for n in names} | {"ParityStore"}
