"""`CancelToken`: how the asyncio side tells the model worker to stop a piece of work.

The RPC layer cancels it (client cancel, CancelJob) or gives it a deadline; the worker and the
library's per-step progress callback call `check()`, so work stops at its next step instead of
running to completion for a caller who is gone.
"""

from __future__ import annotations

import threading
import time

from serving.errors import Cancelled, DeadlineExceeded


class CancelToken:
    def __init__(self, deadline: float | None = None):
        """`deadline`: a `time.monotonic()` instant after which the work is abandoned."""
        self.deadline = deadline
        self._event = threading.Event()
        self._reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self._reason = reason
            self._event.set()

    @property
    def stopped(self) -> bool:
        return self._event.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def error(self) -> Exception:
        if not self._event.is_set():
            return DeadlineExceeded("the call's deadline passed; the work was stopped")
        if self._reason == "deadline":
            return DeadlineExceeded("the call's deadline passed; the work was stopped")
        return Cancelled(f"the work was stopped: {self._reason}")

    def check(self) -> None:
        """Raise Cancelled / DeadlineExceeded when the work should stop."""
        if self.stopped:
            raise self.error()
