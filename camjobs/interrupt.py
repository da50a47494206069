"""SIGINT and SIGTERM as an error: a run that is stopped cleans up as after any failure.

`camjobs run` turns the first SIGINT (Ctrl-C) or SIGTERM (kill, `ray job stop`, a Kubernetes pod
deleted or past its deadline) into Stopped, raised in the main thread wherever the run is, so that
the context managers around it run: the Ray cluster the run started is shut down, its staging
removed, its lock released (camjobs.pipeline.job, camjobs.output); at the command's edge it
becomes camjobs.errors.Interrupted, one line and exit 128 + the signal's number. Signals after
the first are ignored, so that a second Ctrl-C neither cuts that cleanup short nor prints a
traceback. Publishing is not cut in half: a signal that arrives while a run publishes waits until
the run is published (`deferred`). Plain Python, no third-party imports.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from camjobs.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """The first SIGINT or SIGTERM. A BaseException, as KeyboardInterrupt is, so that no `except
    Exception` on its way (Ray Data's, which would log it as a bug of its own) takes it for an error."""

    def __init__(self, signum: int, run_id: str | None = None, published: bool = False):
        super().__init__(signum)
        self.signum, self.run_id, self.published = signum, run_id, published


_deferring = 0  # nesting depth of `deferred` sections
_pending: list[int] = []  # a signal that arrived inside one, raised when the outermost ends


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _ignore_further() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _stop(signum: int, frame) -> None:
    if _deferring:
        _pending.append(signum)
        return
    _ignore_further()
    raise Stopped(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop the work inside this block, which ends in Interrupted (main thread only;
    elsewhere Python delivers no signals). After that the signals stay ignored: the process is on its
    way out."""
    if not _main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}
    try:
        yield
    except Stopped as stop:
        raise Interrupted(stop.signum, stop.run_id, stop.published) from None
    except BaseException:
        _restore(previous)
        raise
    else:
        _restore(previous)


def _restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def deferred(published_by: str | None = None) -> Iterator[None]:
    """A step that must not be cut in half (publishing a run): a signal inside it stops the work once
    the step is done, saying that run `published_by` was published."""
    global _deferring
    _deferring += 1
    try:
        yield
    except BaseException:
        _leave()  # failing anyway: that error is the one reported
        raise
    signum = _leave()
    if signum is not None:
        raise Stopped(signum, published_by, published=True)


def _leave() -> int | None:
    """End a deferred section; the signal that arrived inside it, once the outermost one ends."""
    global _deferring
    _deferring -= 1
    if _deferring or not _pending:
        return None
    signum = _pending[-1]
    _pending.clear()
    _ignore_further()
    return signum


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """Keep this process's SIGTERM handler across ray.init, which installs its own: Ray's exits with
    SystemExit, past the run's cleanup (its staging stays behind). A handler of Python's own default
    is left to Ray."""
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    try:
        yield
    finally:
        if callable(previous) and _main_thread():
            signal.signal(signal.SIGTERM, previous)
