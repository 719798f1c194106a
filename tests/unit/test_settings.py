"""Settings: defaults, every error at once, the cutover interlocks, check-config."""

from __future__ import annotations

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
