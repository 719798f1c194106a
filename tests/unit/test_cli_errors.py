"""Commands that cannot run say why in one line and exit 2; read-only commands never create a ledger.

Each command runs as a real process (its exit code and stderr as an operator sees them). Nothing listens on the
ports used for "unreachable": a port is bound, released, and never served.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra.settings import child_env
from sinks.schema import make_engine, migrate


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**overrides: str | None) -> dict[str, str]:
    base: dict[str, str | None] = {k: None for k in child_env({}) if k.startswith("EDGEBILL_")}
    base.update(overrides)
    return child_env(base)


def _run(
    args: list[str], env: dict[str, str], cwd: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.devkit.cli", *args],
        env=env,
        cwd=cwd,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
    )


_INFO = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO ")  # the worker's start-up log lines


def _one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, no traceback, and one line on stderr (besides 'ledger: …' and INFO logs), naming the needles."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("ledger: ") and not _INFO.match(ln)]
    assert len(lines) == 1, p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    return url


# ----------------------------------------------------------------------------------- broker unreachable


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["produce", "--orgs", "2", "--hours", "1"], id="produce"),
        pytest.param(["org", "set", "org_1", "--plan", "pro"], id="org-set"),
        pytest.param(["replay"], id="replay"),
        pytest.param(["replay", "--apply"], id="replay-apply"),
        pytest.param(["dlq"], id="dlq"),
    ],
)
def test_broker_unreachable_is_one_line_and_exit_2(args: list[str], tmp_path: Path, ledger_url: str) -> None:
    bootstrap = f"127.0.0.1:{_closed_port()}"
    p = _run(args, _env(EDGEBILL_KAFKA_BOOTSTRAP=bootstrap, EDGEBILL_DATABASE_URL=ledger_url), tmp_path)
    _one_line_error(p, f"EDGEBILL_KAFKA_BOOTSTRAP={bootstrap}", "cannot reach a Kafka broker")


@pytest.mark.parametrize(
    "args",
    [pytest.param(["org", "set", "org_1", "--plan", "free"], id="org-set"), pytest.param(["worker"], id="worker")],
)
def test_embedded_broker_not_running_names_the_command_that_starts_it(args: list[str], tmp_path: Path) -> None:
    env = _env(EDGEBILL_KAFKA_EMBEDDED_PORT=str(_closed_port()))
    p = _run(args, env, tmp_path)
    line = _one_line_error(p, "EDGEBILL_KAFKA_BOOTSTRAP is unset", "`edgebill broker`")
    assert line.count("edgebill broker") == 1


# ---------------------------------------------------------------------------------- database unreachable


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["ledger"], id="ledger"),
        pytest.param(["ledger", "--summary"], id="ledger-summary"),
        pytest.param(["parity"], id="parity"),
        pytest.param(["org", "show"], id="org-show"),
        pytest.param(["replay"], id="replay"),
        pytest.param(["worker"], id="worker"),
        pytest.param(["reconcile"], id="reconcile"),
        pytest.param(["reconcile", "--invoice"], id="reconcile-invoice"),
    ],
)
def test_database_unreachable_is_one_line_and_exit_2(args: list[str], tmp_path: Path) -> None:
    url = f"postgresql+psycopg://edgebill@127.0.0.1:{_closed_port()}/ledger"
    # With an external bootstrap the worker opens the ledger before it talks to the broker.
    env = _env(EDGEBILL_DATABASE_URL=url, EDGEBILL_KAFKA_BOOTSTRAP=f"127.0.0.1:{_closed_port()}")
    p = _run(args, env, tmp_path)
    _one_line_error(p, "cannot open the ledger at postgresql+psycopg://edgebill@127.0.0.1", "EDGEBILL_DATABASE_URL")


# ------------------------------------------------------------------------------------ Stripe unreachable


def test_check_config_probe_names_each_unreachable_part(tmp_path: Path) -> None:
    stripe_base = f"http://127.0.0.1:{_closed_port()}"
    env = _env(
        EDGEBILL_KAFKA_BOOTSTRAP=f"127.0.0.1:{_closed_port()}",
        EDGEBILL_DATABASE_URL=f"postgresql+psycopg://edgebill@127.0.0.1:{_closed_port()}/ledger",
        EDGEBILL_STRIPE_API_BASE=stripe_base,
    )
    p = _run(["check-config", "--probe"], env, tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(errors) == 3, p.stderr
    assert "EDGEBILL_KAFKA_BOOTSTRAP" in errors[0]
    assert "EDGEBILL_DATABASE_URL" in errors[1]
    assert f"cannot reach Stripe at {stripe_base} (Connection refused)" in errors[2]
    assert "EDGEBILL_STRIPE_API_BASE" in errors[2]
    assert "probe stripe: FAILED" in p.stdout


def test_check_config_probe_stripe_alone_is_one_line(tmp_path: Path, ledger_url: str) -> None:
    stripe_base = f"http://127.0.0.1:{_closed_port()}"
    env = _env(EDGEBILL_STRIPE_API_BASE=stripe_base, EDGEBILL_DATABASE_URL=ledger_url)
    p = _run(["check-config", "--probe", "--json"], env, tmp_path)
    assert p.returncode == 2
    out = json.loads(p.stdout)
    probe = out["probe"]
    assert out["exit_code"] == 2 and out["error"].startswith("cannot reach: ") and "stripe" in out["error"]
    assert probe["database"] == {"ok": True, "error": None}
    assert probe["stripe"]["ok"] is False and stripe_base in probe["stripe"]["error"]


@pytest.mark.parametrize("args", [["reconcile"], ["reconcile", "--invoice", "--json"]], ids=["windows", "invoice"])
def test_reconcile_with_stripe_unreachable_is_one_line_and_exit_2(
    args: list[str], tmp_path: Path, ledger_url: str
) -> None:
    stripe_base = f"http://127.0.0.1:{_closed_port()}"
    p = _run(args, _env(EDGEBILL_STRIPE_API_BASE=stripe_base, EDGEBILL_DATABASE_URL=ledger_url), tmp_path)
    _one_line_error(p, f"cannot read Stripe at {stripe_base}", "unreachable", "EDGEBILL_STRIPE_API_BASE")


def test_reconcile_repair_in_shadow_is_refused(tmp_path: Path, ledger_url: str) -> None:
    env = _env(EDGEBILL_DATABASE_URL=ledger_url, EDGEBILL_SHADOW="true")
    p = _run(["reconcile", "--repair", "--apply"], env, tmp_path)
    _one_line_error(p, "--repair --apply while the cutover state in force is shadow", "sends nothing in shadow")


# ----------------------------------------------------------------------------- read-only, never creating


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["ledger"], id="ledger"),
        pytest.param(["ledger", "--summary", "--json"], id="ledger-summary"),
        pytest.param(["parity"], id="parity"),
        pytest.param(["parity", "--window", "--json"], id="parity-window"),
        pytest.param(["org", "show"], id="org-show"),
        pytest.param(["replay", "--dry-run"], id="replay-dry-run"),
        pytest.param(["reconcile", "--json"], id="reconcile"),
    ],
)
def test_read_only_commands_never_create_a_ledger(args: list[str], tmp_path: Path) -> None:
    p = _run(args, _env(EDGEBILL_KAFKA_BOOTSTRAP=f"127.0.0.1:{_closed_port()}"), tmp_path)
    line = _one_line_error(p, f"no ledger at sqlite:///{tmp_path.resolve()}/var/edgebill.db", "EDGEBILL_DATABASE_URL")
    assert str(tmp_path.resolve()) in line  # says which folder the default is relative to
    assert not (tmp_path / "var").exists()


def test_an_empty_database_is_no_ledger_and_stays_empty(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    db.touch()
    p = _run(["ledger"], _env(EDGEBILL_DATABASE_URL=f"sqlite:///{db}"), tmp_path)
    _one_line_error(p, "no ledger at", "has no edgebill tables")
    assert db.stat().st_size == 0


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["ledger"], id="ledger"),
        pytest.param(["ledger", "--json"], id="ledger-json"),
        pytest.param(["parity"], id="parity"),
        pytest.param(["org", "show", "--json"], id="org-show"),
    ],
)
def test_read_only_commands_name_the_ledger_they_read(args: list[str], tmp_path: Path, ledger_url: str) -> None:
    p = _run(args, _env(EDGEBILL_DATABASE_URL=ledger_url), tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"ledger: {ledger_url}" in p.stderr.splitlines()
    assert "ledger:" not in p.stdout  # stdout stays the data (JSON stays parseable)


def test_ledger_state_rejects_an_unknown_state(tmp_path: Path, ledger_url: str) -> None:
    p = _run(["ledger", "--state", "bogus"], _env(EDGEBILL_DATABASE_URL=ledger_url), tmp_path)
    assert p.returncode == 2
    assert "Invalid value for '--state'" in p.stderr and "'bogus' is not one of" in p.stderr
    assert "shadow" in p.stderr and "skipped_before_bill_from" in p.stderr
    ok = _run(["ledger", "--state", "sent", "--json"], _env(EDGEBILL_DATABASE_URL=ledger_url), tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout) == []


def test_invalid_settings_stop_any_command_with_exit_2(tmp_path: Path) -> None:
    p = _run(["ledger"], _env(EDGEBILL_KAFKA_BOOTSTRAP="127.0.0.1:notaport"), tmp_path)
    assert p.returncode == 2
    assert "EDGEBILL_KAFKA_BOOTSTRAP" in p.stderr and "check-config" in p.stderr
    assert "Traceback" not in p.stderr


# --------------------------------------------------------------- --json: a script reads one JSON object


def _json_error(p: subprocess.CompletedProcess[str], *needles: str) -> dict[str, object]:
    """The same stderr line and exit 2 as without --json, plus exactly one JSON object on stdout saying it."""
    line = _one_line_error(p, *needles)
    obj = json.loads(p.stdout)  # one object and nothing else: trailing data would not parse
    assert isinstance(obj, dict), p.stdout
    assert obj["exit_code"] == 2 == p.returncode
    assert isinstance(obj["error"], str) and isinstance(obj["hint"], str) and obj["hint"]
    assert line == f"Error: {obj['error']}: {obj['hint']}"  # the stderr line, in two parts
    for needle in needles:
        assert needle in f"{obj['error']}: {obj['hint']}"
    return obj


_DB_DOWN = "cannot open the ledger at postgresql+psycopg://edgebill@127.0.0.1"


@pytest.mark.parametrize(
    ("args", "failure", "needles"),
    [
        pytest.param(["ledger", "--json"], "no-ledger", ["no ledger at", "EDGEBILL_DATABASE_URL"], id="ledger"),
        pytest.param(["ledger", "--summary", "--json"], "db", [_DB_DOWN], id="ledger-summary"),
        pytest.param(["parity", "--json"], "db", [_DB_DOWN], id="parity"),
        pytest.param(["replay", "--json"], "broker", ["cannot reach a Kafka broker"], id="replay"),
        pytest.param(["replay", "--apply", "--json"], "broker", ["cannot reach a Kafka broker"], id="replay-apply"),
        pytest.param(
            ["reconcile", "--json"], "stripe", ["cannot read Stripe at", "EDGEBILL_STRIPE_API_BASE"], id="reconcile"
        ),
        pytest.param(
            ["reconcile", "--repair", "--apply", "--json"],
            "shadow",
            ["--repair --apply while"],
            id="reconcile-repair-shadow",
        ),
        pytest.param(["cutover", "status", "--json"], "db", [_DB_DOWN], id="cutover-status"),
        pytest.param(["cutover", "arm", "--json"], "db", [_DB_DOWN], id="cutover-arm"),
        pytest.param(["dlq", "--json"], "broker", ["cannot reach a Kafka broker"], id="dlq"),
        pytest.param(["org", "show", "--json"], "db", [_DB_DOWN], id="org-show"),
        pytest.param(["webhooks", "--json"], "db", [_DB_DOWN], id="webhooks"),
        pytest.param(["stripe", "setup", "--json"], "stripe", ["cannot reach Stripe at"], id="stripe-setup"),
    ],
)
def test_with_json_a_command_that_cannot_run_prints_one_json_error_object(
    args: list[str], failure: str, needles: list[str], tmp_path: Path, ledger_url: str
) -> None:
    closed = _closed_port()
    env = {
        "no-ledger": _env(),
        "db": _env(EDGEBILL_DATABASE_URL=f"postgresql+psycopg://edgebill@127.0.0.1:{closed}/ledger"),
        "broker": _env(EDGEBILL_KAFKA_BOOTSTRAP=f"127.0.0.1:{closed}", EDGEBILL_DATABASE_URL=ledger_url),
        "stripe": _env(EDGEBILL_STRIPE_API_BASE=f"http://127.0.0.1:{closed}", EDGEBILL_DATABASE_URL=ledger_url),
        "shadow": _env(EDGEBILL_DATABASE_URL=ledger_url, EDGEBILL_SHADOW="true"),
    }[failure]
    obj = _json_error(_run(args, env, tmp_path), *needles)
    assert obj["command"] == "edgebill " + " ".join(a for a in args if not a.startswith("-"))


def test_with_json_invalid_settings_and_usage_errors_are_json_too(tmp_path: Path, ledger_url: str) -> None:
    p = _run(["cutover", "status", "--json"], _env(EDGEBILL_KAFKA_BOOTSTRAP="127.0.0.1:notaport"), tmp_path)
    assert p.returncode == 2 and "EDGEBILL_KAFKA_BOOTSTRAP" in p.stderr  # the stderr lines as without --json
    obj = json.loads(p.stdout)
    assert obj["error"] == "invalid configuration" and obj["exit_code"] == 2 and "check-config" in obj["hint"]
    assert len(obj["problems"]) == 1 and obj["problems"][0].startswith("EDGEBILL_KAFKA_BOOTSTRAP:")

    p = _run(["ledger", "--json", "--state", "bogus"], _env(EDGEBILL_DATABASE_URL=ledger_url), tmp_path)
    assert p.returncode == 2 and "Invalid value for '--state'" in p.stderr
    obj = json.loads(p.stdout)
    assert obj["exit_code"] == 2 and "'bogus' is not one of" in obj["error"] and "edgebill ledger --help" in obj["hint"]

    p = _run(["check-config", "--json"], _env(EDGEBILL_KAFKA_BOOTSTRAP="127.0.0.1:notaport"), tmp_path)
    assert p.returncode == 1  # check-config's finding, not "cannot run"
    obj = json.loads(p.stdout)
    assert obj["exit_code"] == 1 and obj["problems"][0].startswith("EDGEBILL_KAFKA_BOOTSTRAP:")

    # without --json stdout stays empty
    p = _run(["cutover", "status"], _env(EDGEBILL_KAFKA_BOOTSTRAP="127.0.0.1:notaport"), tmp_path)
    assert p.returncode == 2 and p.stdout == ""


def _json_commands() -> list[list[str]]:
    """Every command and group of the production command line that has --json, with its required values."""
    import click

    from infra.cli import cli

    found: list[list[str]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        if any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option)):
            args = list(path)
            for p in cmd.params:
                if p.required:
                    args += [p.opts[0], "1"] if isinstance(p, click.Option) else ["x"]
            found.append([*args, "--json"])
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, [*path, name])

    walk(cli, [])
    return found


def test_every_command_with_json_says_invalid_settings_as_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from infra.cli import cli

    commands = _json_commands()
    names = {" ".join(a for a in c if not a.startswith("-") and a != "1") for c in commands}
    assert {"ledger", "parity", "replay", "reconcile", "cutover status", "webhooks", "check-config"} <= names
    monkeypatch.chdir(tmp_path)
    env: dict[str, str | None] = {k: None for k in child_env({}) if k.startswith("EDGEBILL_")}
    env["EDGEBILL_KAFKA_BOOTSTRAP"] = "127.0.0.1:notaport"
    for args in commands:
        res = CliRunner().invoke(cli, args, env=env)
        assert res.exit_code in (1, 2), (args, res.output)
        obj = json.loads(res.stdout)
        assert obj["exit_code"] == res.exit_code and obj["error"] == "invalid configuration", (args, res.stdout)
        assert obj["problems"][0].startswith("EDGEBILL_KAFKA_BOOTSTRAP:"), args
    assert not (tmp_path / "var").exists()
