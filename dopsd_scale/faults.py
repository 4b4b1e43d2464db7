"""Failure handling: injected faults for recovery tests, and a clean stop on SIGTERM/SIGINT.

An injected fault fires once per run directory (a marker file remembers it), so a run that is
restarted after the fault resumes past it instead of failing forever.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from .config import FaultConfig

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    pass


class FaultInjector:
    def __init__(self, cfg: FaultConfig, run_dir: Path, rank: int):
        self.cfg, self.rank = cfg, rank
        self.marker = Path(run_dir) / "faults" / f"fired_rank{cfg.rank}_step{cfg.step}_{cfg.kind}"

    def _due(self, step: int, kinds: tuple[str, ...]) -> bool:
        c = self.cfg
        if c.rank != self.rank or c.step != step or c.kind not in kinds or self.marker.exists():
            return False
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.touch()
        return True

    def maybe_fail(self, step: int) -> None:
        """Before optimizer step `step` (1-based) runs: raise, or die like a lost node."""
        if self._due(step, ("raise", "kill")):
            log.error("injected fault: rank %d %s at step %d", self.rank, self.cfg.kind, step)
            if self.cfg.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFault(f"injected fault on rank {self.rank} at step {step}")

    def maybe_poison(self, step: int, loss):
        """`nan` faults make the loss of `count` steps from `step` non-finite (skip-and-count path)."""
        c = self.cfg
        if c.kind == "nan" and c.rank == self.rank and c.step <= step < c.step + c.count:
            return loss * float("nan")
        return loss

    def maybe_fail_in_save(self, step: int) -> None:
        """`save` faults raise in the middle of writing a checkpoint (tests atomic saves)."""
        if self._due(step, ("save",)):
            raise InjectedFault(f"injected fault on rank {self.rank} while saving step {step}")


STOP_FILE = "control/stop"


def request_stop(run_dir: str | Path) -> Path:
    """Ask a running trainer (all of its ranks, on any node) to checkpoint and stop."""
    path = Path(run_dir) / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


class StopRequest:
    """Turns SIGTERM/SIGINT/SIGUSR1, or a stop file in the run directory, into a flag the loop
    polls: save, then exit cleanly. The file reaches ranks whose process got no signal (a Ray
    driver stopped by `ray job stop` writes it; see launch/ray_train.py)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, run_dir: str | Path):
        self.signalled = False
        self.stop_file = Path(run_dir) / STOP_FILE
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signalled or self.stop_file.exists()

    def clear(self) -> None:
        """Remove the stop file once honoured, so that the resumed run does not stop at once."""
        self.stop_file.unlink(missing_ok=True)

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: will checkpoint and stop after this step", signum)
        self.signalled = True

    def __enter__(self) -> StopRequest:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. some Ray worker set-ups): signals stay default
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
