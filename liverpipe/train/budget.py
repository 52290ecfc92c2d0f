"""A time budget for one training job: its steps are capped once, from its measured speed.

Fixed step counts cannot hold a wall-clock goal across machines: the CPU demo's jobs ran
1.7-2.2x slower on one 2-core machine than on another. With ``max_minutes`` a job times
its steps, and after ``skip + probe`` steps of this process it sets its step count once:
as many steps as fit in the budget at the probe's mean speed, never more than planned
and never fewer than it has done or than :data:`MIN_FRACTION` of the plan. The
learning-rate schedule then decays over the capped count
(:func:`liverpipe.train.loop.lr_factor` takes it), so a capped run still ends at zero
learning rate; a cap within the warmup leaves the rate where the warmup reached.

The budget covers the job's set-up and its training steps with their data wait.
Validation, checkpoints and the tumour threshold's tuning run outside it. The cap is
kept in ``last.pt``, so a resumed job keeps it and resumes exactly. ``train-all`` with
``[train_all] minutes`` gives each job, when it starts, its :func:`share_of` the time
left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["MIN_FRACTION", "StepBudget", "StepCap", "share_of"]

#: A job trains at least this part of its planned steps, whatever its budget: fewer
#: teach too little to be worth their time (on a machine at half the demo machine's
#: speed, a liver stage cut to 46 of 400 steps scored 0.39 on val against 0.44-0.45
#: for those of 150-400), so a budget can run over by as much.
MIN_FRACTION = 0.25


def share_of(
    left_s: float, cost: float, queued: float, lanes: int, busy: Iterable[float] = ()
) -> float:
    """A job's share, in seconds, of the ``left_s`` seconds left to a run of jobs.

    The lanes that run side by side hold ``lanes * left_s`` seconds, less the ``busy``
    seconds still planned for the jobs running in the other lanes. The job takes the
    part of that which its ``cost`` is of its own plus the ``queued`` cost of the jobs
    not yet started, and never more than ``left_s``. What a job leaves unused goes to
    the jobs after it, since each takes its share when it starts.
    """
    if left_s <= 0:
        return 0.0
    held = sum(min(left_s, max(0.0, b)) for b in busy)
    room = max(1, lanes) * left_s - held
    return max(0.0, min(left_s, room * cost / (cost + queued)))


@dataclass(frozen=True)
class StepCap:
    """The decision: ``steps`` to train (of ``planned``), taken at step ``decided_at``."""

    steps: int
    planned: int
    decided_at: int
    seconds_per_step: float
    max_minutes: float

    @property
    def binding(self) -> bool:
        return self.steps < self.planned

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepCap:
        return cls(
            steps=int(data["steps"]),
            planned=int(data["planned"]),
            decided_at=int(data["decided_at"]),
            seconds_per_step=float(data["seconds_per_step"]),
            max_minutes=float(data["max_minutes"]),
        )


class StepBudget:
    """Times the steps of one process and caps the step count once.

    ``spent`` is the time the job took to set up (reading the store, building the
    model). ``observe(step, seconds)`` is called after each step with that step's wall
    time (the step count after it, and the seconds it took); it returns the
    :class:`StepCap` when it decides, else None. Steps done by an earlier process (a
    resume) count at the probe's speed.
    """

    def __init__(
        self,
        max_minutes: float,
        planned: int,
        start_step: int,
        *,
        spent: float = 0.0,
        skip: int = 5,
        probe: int = 30,
    ) -> None:
        if max_minutes <= 0 or skip < 0 or probe < 1:
            raise ValueError("max_minutes must be > 0, skip >= 0 and probe >= 1")
        self.max_minutes, self.planned, self.start_step = max_minutes, planned, start_step
        self.skip, self.probe = skip, probe
        self.spent = spent  # seconds of this process: its set-up, then its steps
        self.probed: list[float] = []
        self.done = False

    def observe(self, step: int, seconds: float) -> StepCap | None:
        if self.done:
            return None
        self.spent += seconds
        if step - self.start_step > self.skip:
            self.probed.append(seconds)
        if len(self.probed) < self.probe:
            return None
        self.done = True
        rate = sum(self.probed) / len(self.probed)
        spent = self.spent + self.start_step * rate
        left = self.max_minutes * 60.0 - spent
        more = max(0, math.floor(left / rate)) if rate > 0 else self.planned
        floor = math.ceil(MIN_FRACTION * self.planned)
        steps = max(step, floor, min(self.planned, step + more))
        steps = min(steps, self.planned)
        return StepCap(steps, self.planned, step, rate, self.max_minutes)
