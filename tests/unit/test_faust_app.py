"""The Faust app's table manager: Faust's start-up without its fixed pause, and nothing else changed."""

from __future__ import annotations

import inspect
import textwrap

from faust.tables import TableManager

from infra.runtime import web_config, worker_config
from infra.settings import load_settings
from streams.app import PromptTableManager, faust_options


def _body(fn: object) -> list[str]:
    src = textwrap.dedent(inspect.getsource(fn))  # type: ignore[arg-type]
    lines = [ln.strip() for ln in src.splitlines()[1:] if ln.strip()]
    return [ln for ln in lines if not ln.startswith(('"""', "#")) and not ln.endswith('"""')]


def test_prompt_start_is_fausts_own_without_the_pause() -> None:
    # If a Faust upgrade changes its on_start, this fails: the override must then be written again from it.
    theirs = _body(TableManager.on_start)
    assert theirs[0] == "await self.sleep(1.0)", theirs
    assert _body(PromptTableManager.on_start) == theirs[1:]


def test_the_worker_app_uses_the_prompt_table_manager() -> None:
    settings = load_settings()
    opts = faust_options(worker_config(settings).kafka, web_config(settings))
    assert opts["TableManager"] is PromptTableManager
