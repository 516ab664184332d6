"""Watch the config file and yield each newly saved, validated configuration.

The file's *directory* is watched, not the file: editors that save atomically
rename a new file over the old one, and Kubernetes swaps a ConfigMap by replacing a
`..data` symlink next to it, and a watch on the file itself would lose both. Any
change in the directory makes the file be read again; only a change of its content
counts. Bursts of events are debounced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from watchfiles import awatch

from quorum_quest.config.loader import load_settings
from quorum_quest.config.settings import Settings
from quorum_quest.errors import ConfigError

DEBOUNCE_MS = 300


def _content(file: Path) -> bytes | None:
    try:
        return file.read_bytes()
    except OSError:
        return None  # between an editor's delete and create: wait for the next event


async def watch_settings(
    file: Path, *, stop: anyio.Event | None = None
) -> AsyncIterator[Settings | ConfigError]:
    """Yield the new `Settings`, or the `ConfigError` that rejects them, per content change."""
    last = _content(file)
    async for _ in awatch(
        file.parent, watch_filter=None, debounce=DEBOUNCE_MS, recursive=False, stop_event=stop
    ):
        content = _content(file)
        if content is None or content == last:
            continue
        last = content
        try:
            yield load_settings(file)
        except ConfigError as exc:
            yield exc
