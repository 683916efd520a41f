"""Pre-emption: on SIGUSR1 or SIGTERM, finish the step, write ``last.pt`` and exit with :data:`PREEMPT_EXIT`.

SLURM signals a job before it kills it (``#SBATCH --signal=B:USR1@120`` before the time limit; SIGTERM
on pre-emption or ``scancel``). While :func:`watch` is active a signal only sets a flag; the training
loop calls :func:`requested` once per optimiser step. Under DDP the ranks all-reduce the flag, so all of
them stop after the same step even when only one process got the signal. :func:`stop` then writes the
regular resumable checkpoint (rank 0), waits for every rank and raises :class:`Preempted`, a
``SystemExit`` whose exit status is ``PREEMPT_EXIT`` (75, ``EX_TEMPFAIL``: "try again"). Re-running
the same command resumes from ``last.pt`` exactly (workflows/train*.sbatch requeue the job).
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as tdist
from medsass.trainer.distributed import barrier

PREEMPT_EXIT = 75  # sysexits.h EX_TEMPFAIL; distinct from 143 (killed by SIGTERM) and 138 (SIGUSR1)
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: int | None = None  # the first signal caught while watching


class Preempted(SystemExit):
    """Raised after the checkpoint is written; uncaught, the process exits with ``PREEMPT_EXIT``."""

    def __init__(self, signum: int, step: int):
        super().__init__(PREEMPT_EXIT)
        self.signum, self.step = signum, step

    def __str__(self) -> str:
        return f"pre-empted by {signal.Signals(self.signum).name} after step {self.step}"


def _on_signal(signum: int, frame: Any) -> None:
    global _received
    if _received is None:
        _received = signum


@contextmanager
def watch(signals: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """Catch ``signals`` (set the flag instead of dying) inside the block; restore the old handlers after.

    Outside the main thread (where Python cannot install handlers) it does nothing. DataLoader workers
    forked inside the block inherit the handler (torch's worker then replaces SIGTERM's, and make_loader's
    ``worker_init_fn`` ignores SIGTERM), so a signal sent to the whole job does not kill them.
    """
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _received = None


def requested(dist: Any) -> bool:
    """True when this process or (under DDP) any rank got a signal; a collective call on every rank."""
    global _received
    if not dist.enabled:
        return _received is not None
    flag = torch.tensor([_received or 0], device=dist.device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)  # the ranks agree (and on which signal)
    _received = int(flag.item()) or None
    return _received is not None


def stop(checkpoint: Callable[[str, Any], None], state: Any, dist: Any, log: Any = None) -> None:
    """Write ``last.pt`` for ``state`` (the callback writes on rank 0), wait for all ranks, raise :class:`Preempted`.

    ``log`` (a ``MetricsLog``) gets ``{"step", "preempted": "SIGUSR1", "time"}``: the metrics log shows where a run
    was stopped and resumed.
    """
    exc = Preempted(_received or signal.SIGTERM, state.step)
    checkpoint("last", state)
    if log is not None:
        log.write({"step": state.step, "preempted": signal.Signals(exc.signum).name, "time": time.time()})
    barrier(dist)
    if dist.is_main:
        print(f"medsass: {exc}; last.pt written; run the same command again to resume (exit {PREEMPT_EXIT})",
              file=sys.stderr, flush=True)
    raise exc
