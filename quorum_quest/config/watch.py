"""Watch the config file and yield each newly saved, validated configuration.

The file's *directory* is watched, not the file: editors that save atomically
rename a new file over the old one, and Kubernetes swaps a ConfigMap by replacing a
`..data` symlink next to it, and a watch on the file itself would lose both. Any
change in the directory makes the file be read again; only a change of its content
counts. Bursts of events are debounced, and a change is read again until two reads
a moment apart agree, so a file caught halfway through a write is not taken.

Editors and config managers truncate a file before they write it: an empty file (or
one of comments only) is never applied as "all defaults"; it is rejected like an
invalid one and the running configuration stays.

Nothing a file holds ends the watch: every change yields new settings or the
`ConfigError` that rejects them, whatever the bytes (binary, not UTF-8, absurdly deep).
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
# A change is re-read this often until two reads agree, at most SETTLE_READS times.
SETTLE_S = 0.1
SETTLE_READS = 20


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
        content = await _settled(file)
        if content is None or content == last:
            continue
        last = content
        update: Settings | ConfigError
        try:
            update = load_settings(file, allow_empty=False)
        except ConfigError as exc:
            update = exc
        except Exception as exc:  # load_settings means to raise only ConfigError; a net
            reason = " ".join(f"{type(exc).__name__}: {exc}".splitlines())
            update = ConfigError("", f"{file} cannot be loaded: {reason}")
        yield update


async def _settled(file: Path) -> bytes | None:
    """The file's content once two reads `SETTLE_S` apart agree (or after `SETTLE_READS`)."""
    content = _content(file)
    for _ in range(SETTLE_READS):
        await anyio.sleep(SETTLE_S)
        again = _content(file)
        if again == content:
            break
        content = again
    return content
