"""The webhook settings and what the worker is built with from them."""

from __future__ import annotations

import pytest

from infra.runtime import topics, webhook_config, webhook_url, worker_config
from infra.settings import load_settings
from models.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("EDGEBILL_"):
            monkeypatch.delenv(k)


def test_the_worker_gets_the_secret_the_300_s_tolerance_and_the_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEBILL_STRIPE_WEBHOOK_SECRET", "whsec_abc")
    monkeypatch.setenv("EDGEBILL_KAFKA_TOPIC_PREFIX", "p.")
    s = load_settings()
    cfg = webhook_config(s)
    assert (cfg.secret, cfg.tolerance_s, cfg.max_body_bytes) == ("whsec_abc", 300, 256 * 1024)
    assert "whsec_abc" not in repr(cfg)
    assert topics(s).webhooks == "p.stripe-webhook-events"
    assert worker_config(s).webhooks == cfg
    assert webhook_url(s) == "http://127.0.0.1:6066/webhooks/stripe"
    monkeypatch.setenv("EDGEBILL_STRIPE_WEBHOOK_URL", "https://billing.example.test/webhooks/stripe")
    assert webhook_url(load_settings()) == "https://billing.example.test/webhooks/stripe"


def test_an_edge_provisioning_on_live_stripe_with_the_local_webhook_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEBILL_STRIPE_API_BASE", "https://api.stripe.com")
    monkeypatch.setenv("EDGEBILL_STRIPE_API_KEY", "sk_live_x")
    assert load_settings().stripe.webhook_secret.get_secret_value() == "whsec_edgebill_local"  # cell: no provisioning
    monkeypatch.setenv("EDGEBILL_PRO_BILLING_AUTHORITY", "edge")
    monkeypatch.setenv("EDGEBILL_SHADOW", "false")
    monkeypatch.setenv("EDGEBILL_BILL_FROM", "1781564400")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert [p for p in info.value.problems if "EDGEBILL_STRIPE_WEBHOOK_SECRET" in p]
    monkeypatch.setenv("EDGEBILL_STRIPE_WEBHOOK_SECRET", "whsec_real")
    assert load_settings().stripe.webhook_secret.get_secret_value() == "whsec_real"


def test_webhook_limits_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEBILL_STRIPE_WEBHOOK_TOLERANCE", "0")
    monkeypatch.setenv("EDGEBILL_STRIPE_WEBHOOK_URL", "ftp://x")
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = "\n".join(info.value.problems)
    assert "WEBHOOK_TOLERANCE" in text and "WEBHOOK_URL" in text
