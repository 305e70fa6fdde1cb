"""Stopping a training run by hand: Ctrl-C (SIGINT) or SIGTERM.

The first signal asks the loop to stop once the step it is in has finished. The loop then saves
a checkpoint, the same one ``save_steps`` would write there, so a resumed run takes exactly the
steps the uninterrupted one would have. It raises :class:`TrainingInterrupted`, whose one line
says where the checkpoint is. A second signal stops at once: the message then names the last
checkpoint written before, or says that nothing was saved.

    @stoppable
    def fit(self):
        while ...:
            ...one step...
            if self.stop_requested():
                raise self.stop(self.save_checkpoint)
"""

from __future__ import annotations

import functools
import signal
import sys
import threading

from alignforge.errors import UserError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # signals that arrived while a fit ran (the handler appends)


class TrainingInterrupted(UserError):
    """Training was stopped by a signal; the message says what was saved. Exits 128 + signal."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def signal_received() -> int | None:
    """The first stop signal received since the running fit began, or None."""
    return _received[0] if _received else None


def _ask_to_stop(signum, frame) -> None:
    _received.append(signum)
    # a second signal acts at once: Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    print(
        "\nstopping after this step to save a checkpoint; press Ctrl-C again to stop at once",
        file=sys.stderr,
        flush=True,
    )


def stoppable(fit):
    """Run a training loop's ``fit`` with SIGINT/SIGTERM asking it to stop (see the module).

    The loop's ``core`` attribute (or the loop itself) is the :class:`TrainCore` whose step and
    checkpoints the message reports. Handlers are installed only in the main thread, the one
    place Python delivers signals to.
    """

    @functools.wraps(fit)
    def run(loop, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return fit(loop, *args, **kwargs)
        core = getattr(loop, "core", loop)
        _received.clear()
        # a signal the process was started to ignore (nohup, a background job) stays ignored
        previous = {s: signal.getsignal(s) for s in _SIGNALS}
        previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}
        for s in previous:
            signal.signal(s, _ask_to_stop)
        try:
            return fit(loop, *args, **kwargs)
        except KeyboardInterrupt:
            raise core.stop(save=None) from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _received.clear()

    return run
