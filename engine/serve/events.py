"""Job events from the render worker thread to every connected WebSocket client.

The worker calls publish() from its own thread; the event is handed to the event
loop with call_soon_threadsafe and copied into one bounded asyncio queue per
client, so a render never waits for a client and the loop never waits for a
render. A client that falls too far behind is dropped rather than slowing the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger("threedis.serve")

CLIENT_BACKLOG = 2000  # events kept per client before it counts as gone


class EventHub:
    """Fan-out of event dicts to subscribers; bound to the running event loop by start()."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: set[asyncio.Queue] = set()
        self.published = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def stop(self) -> None:
        for queue in list(self._clients):
            queue.put_nowait(None)  # wakes the client's sender so it closes
        self._clients.clear()
        self._loop = None

    @property
    def clients(self) -> int:
        return len(self._clients)

    def subscribe(self) -> asyncio.Queue:
        """A queue that receives every event from now on, as JSON text (call from the event loop)."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=CLIENT_BACKLOG)
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._clients.discard(queue)

    def publish(self, event: dict[str, Any]) -> None:
        """Send `event` to every client; safe from any thread, never blocks."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._fan_out, event)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _fan_out(self, event: dict[str, Any]) -> None:
        self.published += 1
        text = json.dumps(event)  # once, not once per client
        for queue in list(self._clients):
            try:
                queue.put_nowait(text)
            except asyncio.QueueFull:
                log.warning("dropping a WebSocket client that is %d events behind", CLIENT_BACKLOG)
                self._clients.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)
