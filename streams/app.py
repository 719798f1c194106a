"""The Faust app: the one global of edgebill.

It is created unconfigured; :func:`configure` gives it its configuration (broker, group, timings, web)
and :func:`streams.wiring.install` registers topics, agents, timers and web views with their
dependencies passed in explicitly. Nothing here reads the environment.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.tables import TableManager

from streams.config import KafkaConfig, WebConfig, WebLimits

__all__ = ["EdgebillApp", "PromptTableManager", "app", "configure", "faust_options"]


class PromptTableManager(TableManager):
    """Faust's table manager without its fixed one-second pause at start.

    Faust sleeps a second before it registers the tables' changelog channels, so that tables defined after
    the worker started are still picked up; the consumer group is joined only after that. edgebill keeps
    its state in the ledger and defines any Faust table at import, before the worker starts, so the pause
    only delayed the join (and with it the first close) by a second. The rest is Faust's own ``on_start``,
    unchanged (a unit test compares it with the installed Faust's).
    """

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class EdgebillApp(faust.App):
    """The Faust app, serving its pages through :class:`streams.web_server.LimitedWeb` (Faust's aiohttp
    driver with the limits of ``web_limits``). Faust picks its web driver by URL only, so the one
    override is the method that makes it."""

    web_limits: WebLimits = WebLimits()

    def _new_web(self) -> Any:
        from streams.web_server import LimitedWeb

        return LimitedWeb(self)


app = EdgebillApp("edgebill", autodiscover=False)


def faust_options(k: KafkaConfig, web: WebConfig) -> dict[str, Any]:
    """Faust settings derived from ours. The default timings give a ~4 s start on the embedded broker,
    whose group join lasts about half the session timeout."""
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
        # Faust's own pages describing the cluster (partition routes, tables, stats) are not served: an
        # unauthenticated caller reads only what streams.web documents.
        "web_router_enabled": False,
        "web_tables_enabled": False,
        "web_stats_enabled": False,
        "web_graph_enabled": False,
        "web_metrics_enabled": False,
        # A backstop for a page that would read a whole body; each path's own limit is in web.limits.
        "web_application_options": {"client_max_size": max([1024, *(n for _, n in web.limits.body_bytes)])},
        "web_bind": web.host,
        "web_host": web.host,
        "web_port": web.port,
        "web_in_thread": False,
        "worker_redirect_stdouts": False,
        "producer_acks": -1,
        "stream_wait_empty": False,
        "TableManager": PromptTableManager,
    }


def configure(k: KafkaConfig, web: WebConfig) -> faust.App:
    """Give the global app its configuration. Call once, before :func:`streams.wiring.install`."""
    app.config_from_object(faust_options(k, web), force=True)
    app.web_limits = web.limits
    # The app id is Faust's consumer group id; it comes from our settings, not from the constructor.
    app.conf.id = k.group_id
    return app
