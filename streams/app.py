"""The Faust app: the one global of edgebill.

It is created unconfigured; :func:`configure` gives it the settings (broker, group, timings, web) and
:func:`streams.pipeline.install` registers topics, agents, timers and web views with their
dependencies passed in explicitly. Nothing here reads the environment.
"""

from __future__ import annotations

from typing import Any

import faust

from infra.settings import Settings

__all__ = ["app", "configure", "faust_options"]

app = faust.App("edgebill", autodiscover=False)


def faust_options(settings: Settings) -> dict[str, Any]:
    """Faust settings derived from ours (timings tuned for a ~4 s start; see local-infra-findings §2d)."""
    k = settings.kafka
    return {
        "broker": [f"kafka://{s.strip()}" for s in k.servers.split(",") if s.strip()],
        "broker_session_timeout": k.session_timeout,
        "broker_heartbeat_interval": k.heartbeat_interval,
        "broker_rebalance_timeout": k.rebalance_timeout,
        "broker_request_timeout": max(k.request_timeout, k.session_timeout),
        "broker_commit_interval": 1.0,
        "consumer_max_fetch_size": k.max_fetch_bytes,
        "consumer_auto_offset_reset": "earliest",
        "topic_partitions": k.partitions,
        "topic_replication_factor": k.replication_factor,
        "processing_guarantee": "at_least_once",
        "store": "memory://",
        "web_enabled": True,
        "web_bind": settings.web.host,
        "web_host": settings.web.host,
        "web_port": settings.web.port,
        "web_in_thread": False,
        "worker_redirect_stdouts": False,
        "producer_acks": -1,
        "stream_wait_empty": False,
    }


def configure(settings: Settings) -> faust.App:
    """Give the global app its settings. Call once, before :func:`streams.pipeline.install`."""
    app.config_from_object(faust_options(settings), force=True)
    # The app id is Faust's consumer group id; it comes from our settings, not from the constructor.
    app.conf.id = settings.kafka.group_id
    return app
