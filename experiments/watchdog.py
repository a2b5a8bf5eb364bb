"""A hung run ends with an error instead of waiting forever.

Every stage of an experiment keeps a CPU busy (training, q*, AIS, compiling, writing figures),
so a process that uses no CPU time for minutes is stuck, not slow. The one way amortjax has
been seen to get there is a deadlock of XLA's CPU thread pool: jaxlib's batched LAPACK kernels
(Cholesky, triangular solves, eigh) block a pool thread while their tasks wait for a free one,
and when as many such kernels run at once as the pool has threads, every thread waits
(`amortjax/__init__.py`; measured: four eigh kernels on a pool of four, in the flow floor's
fit, since run one datapoint at a time). Such a process sleeps at 0% CPU and would never
finish, nor say why.

`Watchdog` is a daemon thread that reads the process's CPU time (all threads) every few
seconds; when it has grown by less than `MIN_CPU_SECONDS` (1 s, or a tenth of a shorter
window) over `stall_seconds`, it writes every Python thread's stack and a message naming the
cause, the results folder to resume and the setting that avoids it to stderr, and ends the
process with `EXIT_HUNG` (the main thread, blocked inside XLA, cannot be interrupted by an
exception). Checkpoints and every result saved so far are on disk: `--resume FOLDER`
continues from them.

`AMORTJAX_STALL_SECONDS` sets the window (default 600 s; 0 turns the watchdog off). Only
`python -m experiments` runs it: an experiment starts no other process, whereas `python -m
bench` waits on child processes (whose CPU time this process does not see) for longer than that.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable

EXIT_HUNG = 7
STALL_ENV = "AMORTJAX_STALL_SECONDS"
DEFAULT_STALL_SECONDS = 600.0
MIN_CPU_SECONDS = 1.0  # less CPU than this (or a tenth of the window) over it: nothing runs


def stall_seconds_from_env(default: float = DEFAULT_STALL_SECONDS) -> float:
    """The window from `AMORTJAX_STALL_SECONDS` (seconds >= 0; 0 is off), or a clear error."""
    text = os.environ.get(STALL_ENV)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(
            f"{STALL_ENV}={text!r}: give the seconds without CPU use after which a run is "
            "ended as hung (a number >= 0; 0 turns the watchdog off)"
        )
    return value


class Watchdog:
    """Ends the process when it has used no CPU for `stall_seconds` (see the module).

    Args:
        stall_seconds: the window; 0 disables the watchdog.
        describe: called when the watchdog fires; returns what to tell the user beyond the
            cause (e.g. the resume command of the run's folder).
        on_stall: called with the message instead of writing the stacks and exiting (tests).
        poll_seconds: how often the CPU time is read (default: a tenth of the window, at most
            10 s).
    """

    def __init__(
        self,
        stall_seconds: float,
        describe: Callable[[], str] = lambda: "",
        on_stall: Callable[[str], None] | None = None,
        poll_seconds: float | None = None,
    ):
        self.stall_seconds = float(stall_seconds)
        self.describe = describe
        self.on_stall = on_stall
        self.poll_seconds = poll_seconds or min(10.0, max(self.stall_seconds / 10, 0.05))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.stall_seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="amortjax-watchdog",
                                            daemon=True)  # fmt: skip
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        least = min(MIN_CPU_SECONDS, self.stall_seconds / 10)
        since, cpu = time.monotonic(), time.process_time()
        while not self._stop.wait(self.poll_seconds):
            now, used = time.monotonic(), time.process_time()
            if used - cpu >= least:
                since, cpu = now, used
            elif now - since >= self.stall_seconds:
                self._fire(used - cpu, now - since)
                return

    def _fire(self, cpu: float, idle: float) -> None:
        try:
            more = self.describe()
        except Exception as err:  # the message must go out whatever describe does
            more = f"(describing the run failed: {err!r})"
        message = (
            f"error (hung): the run used {cpu:.2f} s of CPU in the last {idle:.0f} s, so it is "
            "stuck, not slow: most likely XLA's CPU thread pool deadlocked (as many batched "
            "LAPACK kernels at once as the pool has threads; see experiments/watchdog.py). "
            "Everything saved so far is kept. Set NPROC to more threads than the machine has "
            "cores (e.g. NPROC=8) and resume, or set "
            f"{STALL_ENV}=0 to wait anyway. {more}"
        ).strip()
        if self.on_stall is not None:
            self.on_stall(message)
            return
        print("\nthe Python threads at the stall:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(message, file=sys.stderr, flush=True)
        os._exit(EXIT_HUNG)
