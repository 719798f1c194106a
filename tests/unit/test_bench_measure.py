"""The benchmarks' measuring parts: CPU clocks of processes, the median of several runs, ledger sizes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.devkit.bench import Metric, RawLimit, run_benchmarks, summarize
from infra.devkit.bench.cpu import CpuWindow, proc_cpu_seconds, stat_cpu_seconds
from infra.devkit.bench.ledger_bytes import sqlite_bytes, sqlite_bytes_and_retention
from infra.devkit.bench.pipeline import PgSchema
from infra.devkit.stack import WorkerStack
from models.ticks import Tick
from sinks.ledger import CloseConfig, SourcedTick

CLK = os.sysconf("SC_CLK_TCK")
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_stat_cpu_seconds_reads_utime_and_stime_after_the_command_whatever_it_holds() -> None:
    rest = " ".join(["S", *[str(i) for i in range(4, 14)], str(3 * CLK), str(2 * CLK), "0", "0", "20"])
    assert stat_cpu_seconds(f"42 (a) b ) c) {rest}".encode()) == 5.0
    assert stat_cpu_seconds(f"42 (worker) {rest}".encode()) == 5.0
    assert stat_cpu_seconds(b"42 (cut") is None
    assert stat_cpu_seconds(b"") is None


def test_proc_cpu_seconds_follows_this_process_and_is_none_for_a_gone_one() -> None:
    before, own_before = proc_cpu_seconds(os.getpid()), time.process_time()
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    after, own_after = proc_cpu_seconds(os.getpid()), time.process_time()
    assert before is not None and after is not None
    assert abs((after - before) - (own_after - own_before)) < 0.05
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    assert proc_cpu_seconds(int(gone.stdout)) is None


def test_cpu_window_counts_what_processes_spent_between_its_readings() -> None:
    busy = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.6) + "time.sleep(30)"])
    brief = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        window = CpuWindow(lambda: [p.pid for p in (busy, brief) if p.poll() is None]).start()
        brief.kill()
        brief.wait()
        time.sleep(1.5)  # the busy child burns its 0.6 s (less start-up already counted before start())
        spent = window.stop()
        assert spent is not None and 0.2 <= spent <= 1.0
        assert window.processes == 1 and window.lost == 1
    finally:
        for p in (busy, brief):
            p.kill()
            p.wait()
    assert CpuWindow(lambda: []).start().stop() is None


def test_raw_limit_cpu_ratio() -> None:
    raw = RawLimit(rate=100_000, cpu_us_per_tick=2.0)
    assert raw.cpu_ratio(8.0) == 0.25
    assert raw.cpu_ratio(None) is None and raw.cpu_ratio(0.0) is None


def test_summary_gives_the_median_of_what_varied_and_keeps_what_did_not() -> None:
    def run(value: float, ratio: float, cpu: float, exact: bool) -> list[Metric]:
        extra = {"ticks": 1000, "exact": exact, "seconds": value / 10}
        return [
            Metric("e2e", value, "ticks/s", ratio, extra, cpu, 2.0 / cpu),
            Metric("latency_s", 4.7, "s"),
        ]

    runs = [run(30.0, 0.10, 8.0, True), run(10.0, 0.05, 10.0, True), run(20.0, 0.20, 9.0, False)]
    runs[1] = runs[1][:1]  # run 2 lost its latency figure
    e2e, latency = summarize(runs)
    assert e2e["metric"] == "e2e" and e2e["summary"] is True and e2e["median_of"] == 3
    assert (e2e["value"], e2e["ratio_to_raw"], e2e["cpu_us_per_tick"], e2e["seconds"]) == (20.0, 0.1, 9.0, 2.0)
    assert e2e["cpu_ratio_to_raw"] == round(2.0 / 9.0, 4)
    assert e2e["unit"] == "ticks/s" and e2e["ticks"] == 1000  # the same in every run: kept as is
    assert e2e["exact"] is None and e2e["runs"]["exact"] == [True, True, False]  # varied, not a number
    assert e2e["runs"]["value"] == [30.0, 10.0, 20.0] and e2e["runs"]["ratio_to_raw"] == [0.1, 0.05, 0.2]
    assert "ticks" not in e2e["runs"] and "runs_missing" not in e2e
    assert latency["value"] == 4.7 and latency["median_of"] == 2 and latency["runs_missing"] == 1
    assert latency["runs"] == {}


def test_run_benchmarks_refuses_unknown_names_and_zero_runs() -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_benchmarks(["no-such-bench"], True, print)
    with pytest.raises(ValueError, match="at least 1"):
        run_benchmarks(["raw"], True, print, runs=0)


def test_sqlite_bytes_measures_the_ledger_file_and_wal_and_each_table(tmp_path: Path) -> None:
    with WorkerStack(bootstrap="127.0.0.1:9", database_url=f"sqlite:///{tmp_path / 'l.db'}", logdir=tmp_path) as st:
        ticks = [
            SourcedTick(Tick(f"t{i}", "org", "sb", "w", "c", 1024, 2, 20, 1_781_564_412_000 + i), 0, i)
            for i in range(5000)
        ]
        st.ledger.write_ticks("usage-ticks", ticks, bucket_seconds=3600, progress={0: (5000, None)})
        sizes = sqlite_bytes(st)
    assert sizes["checkpoint_complete"] is True and sizes["wal_bytes"] == 0
    assert sizes["db_bytes"] == (tmp_path / "l.db").stat().st_size
    assert sizes["before_checkpoint_bytes"] >= sizes["db_bytes"]
    tables = sizes["tables"]
    assert 0 < tables["tick_batches"] < 5000 * 24  # ticks as compressed batches, not a row per tick
    assert sum(tables.values()) == sizes["db_bytes"]  # dbstat accounts for every page of the file


def test_ledger_bytes_retires_every_tick_and_measures_what_is_left(tmp_path: Path) -> None:
    with WorkerStack(bootstrap="127.0.0.1:9", database_url=f"sqlite:///{tmp_path / 'l.db'}", logdir=tmp_path) as st:
        ts = (int(time.time()) // 3600 - 3) * 3600 * 1000
        ticks = [
            SourcedTick(Tick(f"t{i}", "org", f"sb{i % 500}", "w", "c", 1024, 2, 20, ts + i * 35), 0, i)
            for i in range(200_000)
        ]
        st.ledger.write_ticks("usage-ticks", ticks, bucket_seconds=3600, progress={0: (200_000, None)})
        st.ledger.close(int(time.time() * 1000), CloseConfig(3600, 600, shadow=True, bill_from=0))
        sizes = sqlite_bytes_and_retention(st)
    ret = sizes["retention"]
    assert (ret["samples_deleted"], ret["buckets"], ret["held"]) == (200_000, 2, {})
    assert ret["samples_bytes_before"] > 200_000 and ret["samples_bytes_after"] <= 0.05 * ret["samples_bytes_before"]
    assert ret["file_bytes_after"] == sizes["db_bytes"]  # the file keeps its size: its pages are reused
    assert ret["in_use_bytes_after"] <= sizes["db_bytes"] - 0.95 * ret["samples_bytes_before"]


def test_pg_schema_finds_the_backends_of_its_workers_and_sizes_its_tables(pg_base_url: str) -> None:
    import sqlalchemy

    with PgSchema(pg_base_url) as pg:
        worker = sqlalchemy.create_engine(pg.worker_url)
        try:
            with worker.begin() as c:
                c.exec_driver_sql("CREATE TABLE t (x bigint)")
                assert len(pg.backend_pids()) == 1, "the worker's backend is found by its application name"
                window = CpuWindow(pg.backend_pids).start()
                c.exec_driver_sql("INSERT INTO t SELECT g FROM generate_series(1, 300000) g")
            spent = window.stop()
            assert spent is not None and spent > 0 and window.processes == 1
            harness = sqlalchemy.create_engine(pg.url)
            with harness.connect() as c:
                c.exec_driver_sql("SELECT 1")
                assert len(pg.backend_pids()) == 1  # the harness's own connection is not the worker's
            harness.dispose()
            sizes = pg.relation_bytes()
            assert set(sizes) == {"t"} and sizes["t"] > 300_000 * 8
        finally:
            worker.dispose()
