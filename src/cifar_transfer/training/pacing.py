"""A run's deadline, and the pacer that keeps a phase's schedule inside it.

`Deadline` is the wall-clock end of a budgeted run (less what the final bundle needs). A `Pacer`
is called after every optimizer step: it measures the pace (seconds per step, validation seconds
per epoch end), and moves the cosine schedule's end to the last step that fits before the
deadline (optim.StepSchedule.refit: the learning rate stays continuous and reaches its end at
the deadline): earlier when the pace falls behind the plan, later (up to the phase's epochs)
when it runs ahead, e.g. after a probe that took less than planned. It answers True, "stop
now", when the schedule has ended or the deadline has come: the loop then validates, keeps the
best and checkpoints, cleanly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

RECHECK_S = 5.0  # seconds between two re-plans of the remaining steps


@dataclass
class Deadline:
    """Training must be over by `end` (a time.monotonic() value)."""

    end: float
    clock: Callable[[], float] = time.monotonic

    def left(self) -> float:
        """Seconds until the deadline (negative once past)."""
        return self.end - self.clock()

    def expired(self) -> bool:
        return self.left() <= 0


class Pacer:
    """Fits a phase's remaining steps to its deadline by measured pace; says when to stop.

    `schedule` is the phase's optim.StepSchedule (or None: then only the deadline stops it);
    `step` counts optimizer steps since the phase began (the scheduler's step count). Until the
    first epoch end is timed, validating `val_images` is guessed at a third of a training step
    of `batch_size` (the training batch) per batch of images.
    """

    def __init__(self, deadline: Deadline, schedule, steps_per_epoch: int, val_images: int,
                 batch_size: int, start_step: int = 0) -> None:
        self.deadline, self.schedule, self.spe = deadline, schedule, max(1, steps_per_epoch)
        self.val_steps = val_images / batch_size
        self.step = start_step
        self.t0: float | None = None  # clock at the first timed step (after a warm-up step)
        self.steps0 = 0
        self.val_s: float | None = None  # measured seconds of one validation
        self.last_check = -1e9
        self.refits = 0  # how many times the schedule's end was moved (for the log)

    def validated(self, seconds: float) -> None:
        """An epoch end (validation, checkpoint) took `seconds`: reserved before each later one."""
        self.val_s = seconds
        self.t0 = None  # the pace is re-measured from the next step (validation is not a step)

    def _step_s(self, now: float) -> float | None:
        if self.t0 is None or self.step - self.steps0 < 2:
            return None
        return (now - self.t0) / (self.step - self.steps0)

    def steps_that_fit(self, step_s: float, now: float) -> int:
        """Steps that end before the deadline, with a validation at every epoch end reserved."""
        left = self.deadline.end - now
        val_s = self.val_s if self.val_s is not None else self.val_steps * step_s / 3
        fit = int(left / step_s)
        for _ in range(3):  # the epoch ends the fitted steps cross, each paying a validation
            ends = (self.step + fit - 1) // self.spe - (self.step - 1) // self.spe + 1
            fit = max(0, int((left - ends * val_s) / step_s))
        return fit

    def __call__(self) -> bool:
        """After a step: True when the phase must stop now."""
        self.step += 1
        now = self.deadline.clock()
        if self.t0 is None:  # the first step after a start or a validation is a warm-up
            self.t0, self.steps0 = now, self.step
        if self.schedule is not None and self.schedule.done(self.step):
            return True
        if now >= self.deadline.end:
            return True
        step_s = self._step_s(now)
        replan = self.schedule is not None and math.isfinite(self.deadline.end)
        if step_s is not None and now - self.last_check >= RECHECK_S and replan:
            self.last_check = now
            end, before = self.step + self.steps_that_fit(step_s, now), self.schedule.total
            if end != before:
                self.schedule.refit(self.step, end)
                self.refits += self.schedule.total != before
                return self.schedule.done(self.step)
        return False

    def finished(self) -> bool:
        """The schedule has ended or the deadline has passed."""
        done = self.schedule is not None and self.schedule.done(self.step)
        return done or self.deadline.expired()
