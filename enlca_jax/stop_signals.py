"""SIGTERM/SIGINT during training: noted, so that the loop saves a checkpoint at a step boundary and stops."""

from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    """A context manager that catches SIGTERM and SIGINT while it is active.

    ``requested`` turns True at the first signal (``signal_name`` says which); the previous
    handlers are restored on exit. Outside the main thread, where Python cannot install signal
    handlers, it catches nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
