"""Settings: defaults, every error at once, the cutover interlocks, check-config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from infra.devkit.cli import cli
from infra.settings import Authority, load_settings
from models.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("EDGEBILL_"):
            monkeypatch.delenv(k)


def test_defaults_are_embedded_shadow_and_local() -> None:
    s = load_settings()
    assert s.kafka.embedded and s.kafka.servers == "127.0.0.1:29092"
    assert s.db.resolved_url == "sqlite:///var/edgebill.db"
    assert s.stripe.base == "http://127.0.0.1:12111"
    assert s.billing.shadow is True and s.billing.bill_from == 0
    assert s.billing.pro_billing_authority is Authority.CELL
    assert (s.billing.bucket_seconds, s.billing.grace_seconds) == (3600, 600)
    assert s.web.host == "127.0.0.1"


def test_fixed_environment_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEBILL_KAFKA_BOOTSTRAP", "k1:9092,k2:9092")
    monkeypatch.setenv("EDGEBILL_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("EDGEBILL_STRIPE_API_BASE", "https://api.stripe.com")
    monkeypatch.setenv("EDGEBILL_STRIPE_API_KEY", "sk_live_x")
    monkeypatch.setenv("EDGEBILL_STRIPE_WEBHOOK_SECRET", "whsec_x")
    monkeypatch.setenv("EDGEBILL_SHADOW", "false")
    monkeypatch.setenv("EDGEBILL_BILL_FROM", "1781564400")
    monkeypatch.setenv("EDGEBILL_PRO_BILLING_AUTHORITY", "edge")
    monkeypatch.setenv("EDGEBILL_BUCKET_SECONDS", "900")
    monkeypatch.setenv("EDGEBILL_GRACE_SECONDS", "60")
    s = load_settings()
    assert s.kafka.servers == "k1:9092,k2:9092" and not s.kafka.embedded
    assert s.db.resolved_url == "postgresql+psycopg://u@h/db"
    assert s.stripe.api_key.get_secret_value() == "sk_live_x"
    assert (s.billing.shadow, s.billing.bill_from, s.billing.bucket_seconds, s.billing.grace_seconds) == (
        False,
        1781564400,
        900,
        60,
    )
    assert "sk_live_x" not in str(s.describe()) and "whsec_x" not in str(s.describe())


def test_every_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEBILL_GRACE_SECONDS", "-5")
    monkeypatch.setenv("EDGEBILL_STRIPE_API_BASE", "ftp://nope")
    monkeypatch.setenv("EDGEBILL_WEB_PORT", "99999")
    with pytest.raises(ConfigError) as e:
        load_settings()
    text = str(e.value)
    assert len(e.value.problems) == 3
    for name in ("EDGEBILL_GRACE_SECONDS", "EDGEBILL_STRIPE_API_BASE", "EDGEBILL_WEB_PORT"):
        assert name in text


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"EDGEBILL_SHADOW": "false", "EDGEBILL_BILL_FROM": "1781564400"}, "AUTHORITY=edge"),
        ({"EDGEBILL_SHADOW": "false", "EDGEBILL_PRO_BILLING_AUTHORITY": "edge"}, "BILL_FROM > 0"),
        ({"EDGEBILL_BILL_FROM": "1781564401"}, "not aligned"),
        ({"EDGEBILL_PRO_BILLING_AUTHORITY": "edge"}, "billed by nobody"),
    ],
)
def test_interlocks_refuse_double_billing_or_a_gap(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=needle):
        load_settings()


def test_live_configuration_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEBILL_SHADOW", "false")
    monkeypatch.setenv("EDGEBILL_PRO_BILLING_AUTHORITY", "edge")
    monkeypatch.setenv("EDGEBILL_BILL_FROM", "1781564400")
    assert load_settings().billing.shadow is False


def test_check_config_exits_1_listing_all_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEBILL_BUCKET_SECONDS", "7")
    monkeypatch.setenv("EDGEBILL_KAFKA_PARTITIONS", "0")
    result = CliRunner().invoke(cli, ["check-config"])
    assert result.exit_code == 1
    assert "EDGEBILL_BUCKET_SECONDS" in result.output and "EDGEBILL_KAFKA_PARTITIONS" in result.output


def test_check_config_ok_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEBILL_STRIPE_API_KEY", "sk_test_secret123")
    result = CliRunner().invoke(cli, ["check-config"])
    assert result.exit_code == 0, result.output
    assert "configuration OK" in result.output and "sk_test_secret123" not in result.output


# ------------------------------------------------------------------ secure by default: check-config refuses

LONG_SECRET = "x" * 40


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        pytest.param(
            {"EDGEBILL_WEB_HOST": "0.0.0.0"},
            ["EDGEBILL_WEB_HOST=0.0.0.0", "default EDGEBILL_WEB_INTERNAL_SECRET"],
            id="public-bind-default-secret",
        ),
        pytest.param(
            {"EDGEBILL_WEB_HOST": "10.1.2.3", "EDGEBILL_WEB_INTERNAL_SECRET": "short-secret"},
            ["EDGEBILL_WEB_HOST=10.1.2.3", "12-character EDGEBILL_WEB_INTERNAL_SECRET"],
            id="public-bind-short-secret",
        ),
        pytest.param(
            {"EDGEBILL_STRIPE_API_BASE": "https://api.stripe.com", "EDGEBILL_STRIPE_API_KEY": "sk_test_abc123"},
            ["EDGEBILL_STRIPE_API_KEY is a test key", "https://api.stripe.com"],
            id="live-stripe-test-key",
        ),
        pytest.param(
            {"EDGEBILL_STRIPE_API_BASE": "https://billing-proxy.example.net", "EDGEBILL_STRIPE_API_KEY": "rk_test_a"},
            ["EDGEBILL_STRIPE_API_KEY is a test key", "billing-proxy.example.net"],
            id="non-loopback-https-test-key",
        ),
        pytest.param(
            {"EDGEBILL_STRIPE_API_KEY": "pk_live_abc123"},
            ["EDGEBILL_STRIPE_API_KEY is a publishable key"],
            id="publishable-live-key",
        ),
        pytest.param(
            {"EDGEBILL_STRIPE_API_BASE": "https://api.stripe.com", "EDGEBILL_STRIPE_API_KEY": "pk_test_abc123"},
            ["EDGEBILL_STRIPE_API_KEY is a publishable key"],
            id="publishable-test-key",
        ),
        pytest.param({"EDGEBILL_STRIPE_API_KEY": ""}, ["EDGEBILL_STRIPE_API_KEY is empty"], id="empty-key"),
        pytest.param(
            {"EDGEBILL_KAFKA_BOOTSTRAP": "127.0.0.1:notaport"},
            ["EDGEBILL_KAFKA_BOOTSTRAP", "'notaport' is not a number"],
            id="bootstrap-not-a-port",
        ),
        pytest.param(
            {"EDGEBILL_KAFKA_BOOTSTRAP": "k1:9092,127.0.0.1:99999"},
            ["EDGEBILL_KAFKA_BOOTSTRAP", "port 99999 is out of range"],
            id="bootstrap-port-out-of-range",
        ),
        pytest.param(
            {"EDGEBILL_KAFKA_BOOTSTRAP": ":9092"}, ["EDGEBILL_KAFKA_BOOTSTRAP", "has no host"], id="bootstrap-no-host"
        ),
        pytest.param(
            {"EDGEBILL_KAFKA_BOOTSTRAP": "k1"}, ["EDGEBILL_KAFKA_BOOTSTRAP", "has no port"], id="bootstrap-no-port"
        ),
        pytest.param(
            {"EDGEBILL_KAFKA_BOOTSTRAP": "kafka://k1:9092"},
            ["EDGEBILL_KAFKA_BOOTSTRAP", "without a scheme"],
            id="bootstrap-scheme",
        ),
        pytest.param(
            {"EDGEBILL_STRIPE_API_BASE": "http://"}, ["EDGEBILL_STRIPE_API_BASE", "has no valid host"], id="url-no-host"
        ),
        pytest.param(
            {"EDGEBILL_STRIPE_API_BASE": "http://127.0.0.1:99999"},
            ["EDGEBILL_STRIPE_API_BASE", "out of range"],
            id="url-port-out-of-range",
        ),
        pytest.param(
            {"EDGEBILL_STRIPE_METER_EVENTS_BASE": "https://"},
            ["EDGEBILL_STRIPE_METER_EVENTS_BASE", "has no valid host"],
            id="meter-events-url-no-host",
        ),
        pytest.param(
            {"EDGEBILL_DATABASE_URL": "postgresql+psycopg://u@db:99999/edgebill"},
            ["EDGEBILL_DATABASE_URL", "port 99999 is out of range"],
            id="database-port-out-of-range",
        ),
        pytest.param({"EDGEBILL_WEB_PORT": "99999"}, ["EDGEBILL_WEB_PORT"], id="web-port-out-of-range"),
        pytest.param({"EDGEBILL_WEB_PORT": "0"}, ["EDGEBILL_WEB_PORT"], id="web-port-zero"),
        pytest.param(
            {"EDGEBILL_STRIPE_LOCAL_PORT": "70000"}, ["EDGEBILL_STRIPE_LOCAL_PORT"], id="stripe-local-port-out-of-range"
        ),
    ],
)
def test_check_config_refuses(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needles: list[str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(cli, ["check-config"])
    assert result.exit_code == 1, result.output
    for needle in needles:
        assert needle in result.output
    assert "configuration OK" not in result.output
    with pytest.raises(ConfigError):  # the worker and every other command refuse the same settings
        load_settings()


def test_check_config_lists_every_security_and_format_problem_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEBILL_WEB_HOST", "0.0.0.0")
    monkeypatch.setenv("EDGEBILL_STRIPE_API_KEY", "pk_live_x")
    monkeypatch.setenv("EDGEBILL_KAFKA_BOOTSTRAP", "127.0.0.1:notaport")
    monkeypatch.setenv("EDGEBILL_STRIPE_API_BASE", "http://")
    monkeypatch.setenv("EDGEBILL_WEB_PORT", "99999")
    with pytest.raises(ConfigError) as e:
        load_settings()
    text = "\n".join(e.value.problems)
    # An invalid field does not hide the checks across fields of its area (the web port, the Stripe base).
    assert len(e.value.problems) == 5, text
    for needle in (
        "EDGEBILL_WEB_HOST=0.0.0.0",
        "publishable key",
        "EDGEBILL_KAFKA_BOOTSTRAP",
        "EDGEBILL_STRIPE_API_BASE",
        "EDGEBILL_WEB_PORT",
    ):
        assert needle in text


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"EDGEBILL_WEB_HOST": "0.0.0.0", "EDGEBILL_WEB_INTERNAL_SECRET": LONG_SECRET}, id="public-long"),
        pytest.param({"EDGEBILL_WEB_HOST": "localhost"}, id="localhost-default-secret"),
        pytest.param({"EDGEBILL_WEB_HOST": "::1"}, id="ipv6-loopback"),
        pytest.param(
            {"EDGEBILL_STRIPE_API_BASE": "https://api.stripe.com", "EDGEBILL_STRIPE_API_KEY": "rk_live_abc"},
            id="live-restricted-key",
        ),
        pytest.param({"EDGEBILL_STRIPE_API_BASE": "http://stripe-mock:12111"}, id="plain-http-test-server"),
        pytest.param({"EDGEBILL_STRIPE_API_BASE": "https://127.0.0.1:12111"}, id="loopback-https-test-key"),
        pytest.param({"EDGEBILL_KAFKA_BOOTSTRAP": "k1:9092, k2.example.net:9093,[::1]:9094"}, id="bootstrap-list"),
        pytest.param({"EDGEBILL_DATABASE_URL": "postgresql://u:p@[::1]:5432/x"}, id="database-ipv6"),
    ],
)
def test_check_config_accepts(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(cli, ["check-config"])
    assert result.exit_code == 0, result.output
    assert "configuration OK" in result.output


def test_check_config_prints_the_resolved_ledger(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["check-config"])
    assert result.exit_code == 0, result.output
    assert f"ledger: sqlite:///{tmp_path.resolve() / 'var' / 'edgebill.db'}" in result.output
    monkeypatch.setenv("EDGEBILL_DATABASE_URL", "postgresql://edgebill:hunter2@db.internal:5432/ledger")
    result = CliRunner().invoke(cli, ["check-config", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["db"]["ledger"] == "postgresql+psycopg://edgebill:***@db.internal:5432/ledger"
    assert "hunter2" not in result.output


@pytest.mark.parametrize("text", ["0", "no", "off", "", "flase", "False", " false "])
def test_only_an_explicit_false_turns_shadow_off(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("EDGEBILL_SHADOW", text)
    monkeypatch.setenv("EDGEBILL_PRO_BILLING_AUTHORITY", "edge")
    monkeypatch.setenv("EDGEBILL_BILL_FROM", "1781564400")
    explicit_false = text.strip().lower() == "false"
    if explicit_false:
        assert load_settings().billing.shadow is False
    else:
        # shadow stays on: with authority edge that is the "billed by nobody" interlock, never live sending
        with pytest.raises(ConfigError, match="billed by nobody"):
            load_settings()


@pytest.mark.parametrize(("text", "warned"), [("0", True), ("off", True), ("flase", True), ("true", False)])
def test_check_config_warns_on_a_shadow_that_is_neither_true_nor_false(
    monkeypatch: pytest.MonkeyPatch, text: str, warned: bool
) -> None:
    monkeypatch.setenv("EDGEBILL_SHADOW", text)
    result = CliRunner().invoke(cli, ["check-config"])
    assert result.exit_code == 0, result.output
    assert ("shadow stays ON" in result.output) is warned
    assert "shadow = True" in result.output
