"""Replaying ASHA over recorded learning curves: which grid points Ray Tune's asynchronous
successive halving would have stopped, and when, for any grace period, reduction factor and
number of trials at once, without training anything again.

Training is deterministic per grid point (its seed), so a trial ASHA lets continue produces the
same val top-1 after each epoch as the same point trained to the end: the full grid's per-epoch
val curves hold every number ASHA could see. What a replay cannot know is the order in which
results arrive on a real cluster; it assumes every epoch takes the same time, trials start in
submission order as slots free up, and results of one time step are handled in starting order.
``scripts/asha_cost.py --replay`` uses it (docs/performance.md, "The protocol's cost").
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence


def replay_asha(
    curves: Sequence[Sequence[float]], max_t: int, grace_period: int, reduction_factor: float, workers: int = 2
) -> list[int]:
    """Epochs each trial trains under Ray Tune's ``AsyncHyperBandScheduler`` (one bracket, val top-1
    at each epoch, ``max_t`` epochs), trials submitted in the order of ``curves``.

    ``curves[i][e - 1]`` is trial i's val top-1 after epoch e; a curve shorter than ``max_t`` is a
    run that failed (diverged) after its last epoch. A trial that trains ``max_t`` epochs finished;
    fewer, and ASHA stopped it (or it failed). Ray's own scheduler makes every decision."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    if workers < 1 or max_t < 1:
        raise ValueError("workers and max_t must be >= 1")
    scheduler = AsyncHyperBandScheduler(
        time_attr="epoch", metric="val_top1", mode="max", max_t=max_t,
        grace_period=min(grace_period, max_t), reduction_factor=reduction_factor,
    )
    trials = [SimpleNamespace(trial_id=str(i)) for i in range(len(curves))]
    spent = [0] * len(curves)
    waiting, running = list(range(len(curves))), []
    while waiting or running:
        while waiting and len(running) < workers:
            i = waiting.pop(0)
            scheduler.on_trial_add(None, trials[i])
            running.append(i)
        for i in list(running):  # one epoch of every running trial, handled in the order they started
            epoch = spent[i] + 1
            if epoch > min(len(curves[i]), max_t):  # failed during this epoch: it reports nothing more
                scheduler.on_trial_remove(None, trials[i])
                running.remove(i)
                continue
            spent[i] = epoch
            result = {"epoch": epoch, "val_top1": float(curves[i][epoch - 1])}
            action = scheduler.on_trial_result(None, trials[i], result)
            if epoch >= max_t:
                scheduler.on_trial_complete(None, trials[i], result)
                running.remove(i)
            elif action == TrialScheduler.STOP:
                running.remove(i)
    return spent
