"""A replica's streams, decoded as one live batch: `TextEngine.run_live` on a thread of its own.

Streams do not go through `@serve.batch`: a batch of calls runs until its longest request ends, so a
stream that arrives a moment after one started would wait for it. Here every stream joins the running
decode at its next step, and leaves it when it ends (or its client goes).

Why a thread: a decode step that releases no text (a character still incomplete, text held back for a
stop string) yields nothing, so a decode on the event loop would hold the loop for as many steps as
that lasts, and neither chunks nor disconnects would get through (measured: a stream whose bytes
never formed text ran 4,000 steps to its length with its client long gone). In a thread the loop
gets the GIL every switch interval: it sends chunks, admits calls and marks them cancelled while the
batch decodes. Deltas cross back to the loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import threading

from aigc_dist.engine.live import LiveRequest, RequestFeed
from aigc_dist.engine.text import TextEngine

log = logging.getLogger(__name__)


class LiveDecoder:
    """One engine's live decode loop; `steps` and `rows` count its decode steps and the requests in them
    (rows / steps is how full the batch runs, GET /v1/models shows both)."""

    def __init__(self, engine: TextEngine):
        self.engine = engine
        self.feed = RequestFeed()
        self.steps = 0
        self.rows = 0
        self.thread = threading.Thread(target=self._run, name="aigc-live-decode", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.engine.run_live(self.feed, on_step=self._count)
        except Exception:  # its requests were told (run_live delivers the exception); the next stream starts anew
            log.exception("the live decode loop failed; its streams end with an error, the next one starts a new loop")

    def _count(self, rows: int) -> None:
        self.steps += 1
        self.rows += rows

    @property
    def usable(self) -> bool:
        return not self.feed.closed and self.thread.is_alive()

    def put(self, request: LiveRequest) -> None:
        """Queue a request (FeedClosed once this loop takes no more)."""
        self.feed.put(request)

    def close(self) -> None:
        """No new requests; the loop ends, and its thread, once those it took have ended."""
        self.feed.close()
