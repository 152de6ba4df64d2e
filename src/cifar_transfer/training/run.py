"""Fit a Config's phases into a run dir: `train` starts a run, `resume` continues one; a Run
steps through its phases (phases.py) and ends with the bundle (finish.py). DistributedDataParallel
under torchrun (distributed.py); the checkpoint format is checkpoint.TrainState, the run dir's
layout rundir.py, the record of the run runlog.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from cifar_transfer.artifacts import rundir
from cifar_transfer.artifacts.checkpoint import TrainState
from cifar_transfer.config import Config
from cifar_transfer.models.transfer import apply_freeze
from cifar_transfer.recipes import to_toml
from cifar_transfer.system import hardware
from cifar_transfer.system.atomic import atomic_write_text
from cifar_transfer.training import distributed, finish, phases
from cifar_transfer.training.core import RunCore
from cifar_transfer.training.pacing import Deadline
from cifar_transfer.training.plan import PhasePlan


class Run(RunCore):
    """One run: a RunCore that trains phase after phase, then bundles what it kept."""

    def fit(self) -> dict:
        """Train every phase (resuming where the checkpoint says), then write the model bundle."""
        s = self.state
        first = 0 if s is None else s.phase + (1 if s.phase_done else 0)
        running = [p for p in self.plans[first:] if p.runs]
        for plan in running:
            if self.deadline is not None and self.deadline.expired():
                self.log.say(f"deadline reached: phase {plan.phase.name!r} and later ones skipped")
                break
            self.run_plan(plan, s if s is not None and s.phase == plan.index else None)
            if self.deadline is not None and plan is not running[-1]:  # the last: finish.finish
                finish.bundle_if_best(self)
        return finish.finish(self)

    def run_plan(self, plan: PhasePlan, resume: TrainState | None = None) -> None:
        """Freeze what the phase says, then run it by its kind (L-BFGS probe or gradient steps)."""
        apply_freeze(self.model, plan.phase.freeze, plan.phase.batchnorm)
        if plan.phase.optimizer == "lbfgs":
            phases.run_probe_phase(self, plan, phases.phase_inputs(self, plan))
        else:
            phases.run_phase(self, plan, phases.phase_inputs(self, plan), resume)


@contextlib.contextmanager
def _holding(out: Path, new: bool) -> Iterator[None]:
    """Rank 0 holds the run dir's lock for the body; a refusal stops every rank."""
    out = Path(out)
    existed = out.exists()
    locks = []
    distributed.main_only(lambda: locks.append(rundir.claim(out, new)))
    try:
        yield
    finally:
        for lock in locks:
            lock.release()
        if new and not existed and locks and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # bad input stopped a new run before it wrote anything: leave no trace


def train(
    cfg: Config, out: Path, progress: bool = True, on_start: Callable[[Path], None] | None = None,
    deadline: Deadline | None = None,
) -> dict:
    """Start a new run in `out` and train it to the end (under torchrun: on every rank).

    `on_start(out)` runs on rank 0 once data and model are loaded, just before the first epoch.
    With a `deadline` (a budgeted run) training stops cleanly by then: the best model so far
    bundled, the checkpoint resumable.
    """
    out = Path(out)
    with distributed.process_group(hardware.pick_device(cfg.run.device)), _holding(out, new=True):
        # Data and model are checked before the first file is written, so bad input leaves no run dir.
        run = Run(cfg, out, resume=False, progress=progress, deadline=deadline)
        if run.main:
            atomic_write_text(out / rundir.CONFIG, to_toml(cfg))
            if on_start is not None:
                on_start(out)
        summary = run.fit()
        del run  # its DDP wrapper must go before the process group (see process_group)
        return summary


def resume(out: Path, progress: bool = True, data_dir: str | None = None) -> dict:
    """Continue the run in `out` from its last checkpoint, to the same result as an unbroken run.

    The checkpoint holds every weight (no weights source is needed) and no per-rank state, so a
    run may resume offline and under another number of processes. `data_dir` is where the run's
    images are now, if they moved: checked against the checkpoint's fingerprint of them.
    """
    out = Path(out)
    cfg = rundir.load_run_config(out)
    if data_dir:
        cfg.data.data_dir = str(Path(data_dir).expanduser().resolve())
    with distributed.process_group(hardware.pick_device(cfg.run.device)), _holding(out, new=False):
        # A run killed before its first checkpoint starts over in its own dir.
        run = Run(cfg, out, resume=(out / rundir.LAST).is_file(), progress=progress)
        if data_dir and run.main:  # the same images, found elsewhere: remember where
            atomic_write_text(out / rundir.CONFIG, to_toml(cfg))
        summary = run.fit()
        del run  # its DDP wrapper must go before the process group (see process_group)
        return summary
