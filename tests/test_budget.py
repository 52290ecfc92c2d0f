"""The training time budget: a job caps its steps once from its measured speed, the
schedule decays over the cap, a resume keeps it, and train-all shares its minutes out
among the jobs as they start (fake clocks: no test times)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from liverpipe.models import load_checkpoint
from liverpipe.rundir import RunResult, StageDir
from liverpipe.settings import load_settings
from liverpipe.train import StepBudget, launch, loop, train, train_all
from liverpipe.train.budget import share_of

TINY = REPO / "configs" / "tiny.toml"


def _feed(budget: StepBudget, seconds: list[float], first: int = 1):
    """Observe ``seconds`` as the steps first, first + 1, ...; the steps and the cap."""
    for step, took in enumerate(seconds, start=first):
        cap = budget.observe(step, took)
        if cap is not None:
            return step, cap
    return None


def test_the_cap_is_what_fits_at_the_probed_speed_after_the_skipped_steps() -> None:
    # 5 slow first steps (counted as time spent, not as speed), then 1 s a step.
    budget = StepBudget(max_minutes=2.0, planned=300, start_step=0, skip=5, probe=30)
    step, cap = _feed(budget, [4.0] * 5 + [1.0] * 100)
    assert step == 35 and cap.decided_at == 35 and cap.seconds_per_step == 1.0
    assert cap.steps == 35 + (120 - 20 - 30)  # what is left of 120 s, at 1 s a step
    assert cap.binding and cap.planned == 300 and cap.max_minutes == 2.0
    assert budget.observe(36, 100.0) is None  # decided once


def test_a_budget_that_fits_keeps_the_planned_steps() -> None:
    budget = StepBudget(max_minutes=10.0, planned=300, start_step=0, skip=5, probe=30)
    _, cap = _feed(budget, [1.0] * 40)
    assert cap.steps == 300 and not cap.binding


def test_a_spent_budget_stops_at_the_steps_done_and_never_below() -> None:
    budget = StepBudget(max_minutes=0.1, planned=12, start_step=0, skip=2, probe=3)
    step, cap = _feed(budget, [5.0] * 10)
    assert step == 5 and cap.steps == 5


def test_a_job_trains_at_least_a_quarter_of_its_plan() -> None:
    budget = StepBudget(max_minutes=0.1, planned=300, start_step=0, skip=2, probe=3)
    _, cap = _feed(budget, [5.0] * 10)
    assert cap.steps == 75 and cap.binding


def test_steps_of_an_earlier_process_count_at_the_probed_speed() -> None:
    # Resumed at step 20 before a cap was decided: 20 steps were spent at 2 s a step.
    budget = StepBudget(max_minutes=3.0, planned=300, start_step=20, skip=0, probe=10)
    step, cap = _feed(budget, [2.0] * 20, first=21)
    assert step == 30 and cap.steps == 30 + (180 - 40 - 20) // 2


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="max_minutes"):
        StepBudget(max_minutes=0, planned=10, start_step=0)


def test_setup_time_counts_against_the_budget() -> None:
    budget = StepBudget(max_minutes=1.0, planned=100, start_step=0, spent=20.0, skip=0, probe=10)
    _, cap = _feed(budget, [1.0] * 10)
    assert cap.steps == 10 + (60 - 20 - 10)


def _run_jobs(costs: list[float], needs: list[float], lanes: int, total: float) -> list:
    """Jobs started in order on the first free of ``lanes``, each given ``share_of`` the
    time left when it starts and taking the smaller of its share and what it needs:
    (start, end, share) of each."""
    free = [0.0] * lanes  # when each lane's job ends
    planned = [0.0] * lanes  # when each lane's job's share ends
    spans = []
    for i, (cost, need) in enumerate(zip(costs, needs, strict=True)):
        lane = free.index(min(free))
        start = free[lane]
        busy = [planned[k] - start for k in range(lanes) if k != lane and free[k] > start]
        share = share_of(total - start, cost, sum(costs[i + 1 :]), lanes, busy)
        free[lane], planned[lane] = start + min(share, need), start + share
        spans.append((start, free[lane], share))
    return spans


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_shared_minutes_hold_the_deadline_and_pass_on_what_a_job_leaves(lanes: int) -> None:
    costs = [4.0, 4.0, 4.0, 1.0, 1.0, 1.0]  # three tumour jobs, three liver jobs
    slow = _run_jobs(costs, [1e9] * 6, lanes, total=480.0)  # every job uses all its share
    assert max(end for _, end, _ in slow) <= 480.0 + 1e-9
    assert all(share > 0 for _, _, share in slow)
    fast = _run_jobs(costs, [100.0] + [1e9] * 5, lanes, total=480.0)  # the first ends early
    later = sum(share for _, _, share in fast[1:])  # the jobs after it get more time
    assert later > sum(share for _, _, share in slow[1:])
    assert max(end for _, end, _ in fast) <= 480.0 + 1e-9


def test_jobs_that_start_together_get_equal_shares_of_equal_costs() -> None:
    first = share_of(480.0, 4.0, 11.0, 2)  # two tumour jobs start on two free lanes
    second = share_of(480.0, 4.0, 7.0, 2, busy=[first])
    assert first == pytest.approx(960.0 * 4 / 15) and second == pytest.approx(first)


def test_no_time_left_is_no_share() -> None:
    assert share_of(-5.0, 1.0, 3.0, 2) == 0.0
    assert share_of(100.0, 1.0, 0.0, 2) == 100.0  # the last job takes what is left


def test_train_all_gives_each_job_its_share_of_the_minutes_as_it_starts(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "_clock", lambda: 0.0)  # no time passes between starts
    settings = load_settings(
        TINY,
        {"train": {"steps": 4}, "tumour": {"steps": 4}, "train_all": {"minutes": 10.0}},
    )
    assert launch.job_cost(settings, "liver") == launch.job_cost(settings, "tumour")
    outcomes = train_all(
        tiny_store, tmp_path, settings, gpus=[], cpu_jobs=1, models=["unetplusplus"]
    )
    assert [o.error for o in outcomes] == [None, None]
    liver, tumour = (
        json.loads(StageDir(tmp_path / "unetplusplus" / s).config.read_text())
        for s in ("liver", "tumour")
    )
    # One after another (one lane): the liver job first, then the tumour job with
    # all that is left; steps train as planned (4 steps never reach the decision).
    assert liver["train"]["max_minutes"] == 5.0 and tumour["tumour"]["max_minutes"] == 10.0
    assert liver["steps"] == 4 and tumour["steps"] == 4


def test_without_minutes_train_all_sets_no_budget(tiny_store: Path, tmp_path: Path) -> None:
    settings = load_settings(TINY, {"train": {"steps": 2}, "tumour": {"steps": 2}})
    train_all(tiny_store, tmp_path, settings, gpus=[], cpu_jobs=1, models=["manet"])
    for stage, section in (("liver", "train"), ("tumour", "tumour")):
        config = json.loads(StageDir(tmp_path / "manet" / stage).config.read_text())
        assert config[section]["max_minutes"] is None


@pytest.fixture
def one_second_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's budget clock, read at each step's start and end: 1 s a step."""
    ticks = itertools.count()
    monkeypatch.setattr(loop, "_clock", lambda: float(next(ticks)))


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _capped(steps: int = 60, minutes: float | None = 0.75):
    return load_settings(
        TINY,
        {
            "train": {
                "steps": steps,
                "max_minutes": minutes,
                "log_every": 1,
                "val_every": 20,
                "warmup_steps": 5,
            }
        },
    )


@pytest.mark.usefixtures("one_second_steps")
def test_a_capped_job_trains_the_cap_and_its_schedule_ends_at_zero(
    tiny_store: Path, tmp_path: Path
) -> None:
    # 45 s: 1 s of set-up and 35 steps when it decides, so 9 more steps fit.
    result = train(tiny_store, tmp_path / "r", _capped())
    rows = _history(tmp_path / "r")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 45))
    assert steps[-1]["lr"] == 0.0 and steps[-2]["lr"] > 0.0  # cosine over the 44 steps
    (decision,) = [r for r in rows if "budget" in r]
    assert decision["step"] == 35 and decision["budget"]["steps"] == 44
    assert [r["step"] for r in rows if "val" in r] == [20, 40, 44]  # the last at the cap
    assert result.steps == 44 and result.planned_steps == 60
    assert result.steps_text == "44 of 60 steps (time budget)"
    folder = StageDir(tmp_path / "r")
    config = json.loads(folder.config.read_text())
    assert config["steps"] == 44 and config["step_cap"]["planned"] == 60
    assert RunResult.read(folder).planned_steps == 60
    assert load_checkpoint(folder.last)["step_cap"]["steps"] == 44


@pytest.mark.usefixtures("one_second_steps")
def test_a_budget_that_fits_trains_as_without_one(tiny_store: Path, tmp_path: Path) -> None:
    train(tiny_store, tmp_path / "plain", _capped(steps=40, minutes=None))
    result = train(tiny_store, tmp_path / "budget", _capped(steps=40, minutes=5.0))
    plain = [r for r in _history(tmp_path / "plain") if "loss" in r]
    budget = [r for r in _history(tmp_path / "budget") if "loss" in r]
    assert result.planned_steps is None and result.steps_text == "40 steps"
    assert [r["step"] for r in budget] == [r["step"] for r in plain]
    np.testing.assert_allclose([r["loss"] for r in budget], [r["loss"] for r in plain])
    np.testing.assert_allclose([r["lr"] for r in budget], [r["lr"] for r in plain])


@pytest.mark.usefixtures("one_second_steps")
def test_a_resume_after_the_cap_keeps_it_and_continues_exactly(
    tiny_store: Path, tmp_path: Path
) -> None:
    train(tiny_store, tmp_path / "full", _capped())

    def crash(step: int, _loss: float) -> None:
        if step == 43:  # the checkpoint of step 40 holds the cap; steps 41-43 are lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_store, tmp_path / "resumed", _capped(), on_step=crash)
    result = train(tiny_store, tmp_path / "resumed", _capped(), resume=True)
    a = [r for r in _history(tmp_path / "full") if "loss" in r]
    b = [r for r in _history(tmp_path / "resumed") if "loss" in r]
    assert result.steps == 44 and [r["step"] for r in b] == list(range(1, 45))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    np.testing.assert_allclose([r["lr"] for r in b], [r["lr"] for r in a])
