"""Training time: ``trainer.train.fit`` (200-tree Isolation Forest and 100-tree random-forest yield model, the
trainer's defaults) on synthetic tables of 200 tests and growing part counts.

A size is skipped, with the reason in the figures, when the time extrapolated linearly from the previous
size exceeds ``budget_s``. 1,000,000 parts took 694 s on 2 cores (forward folds 500 s, Isolation Forest 62 s, refit
127 s), most of the full run; the linear estimate from 100,000 parts overstates it about 3-4x (the forward folds
run on at most about 200,000 parts), hence the budget.
"""
from __future__ import annotations

import time

from bench.e2e_latency import synthetic_table
from trainer.train import TrainConfig, fit

TESTS = 200
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000,)
FULL_BUDGET_S = 3600.0
FIT_OVER_OUTLIER_FIT_TARGET = 10    # the whole fit of 1,000,000 parts, at most this many Isolation Forest fits


def run(quick: bool, budget_s: float = FULL_BUDGET_S) -> dict:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    figures: dict = {"training.tests": TESTS, "training.budget_s": budget_s,
                     "training.fit_over_outlier_fit_target": FIT_OVER_OUTLIER_FIT_TARGET}
    previous = None
    for parts in sizes:
        key = f"training.parts_{parts}"
        if previous is not None:
            estimate = previous[1] * parts / previous[0]
            if estimate > budget_s:
                figures[f"{key}.skipped"] = (f"estimated {estimate:.0f} s (linear from {previous[0]:,} parts) "
                                             f"exceeds the {budget_s:.0f} s budget of this run")
                continue
        table = synthetic_table(parts, TESTS, seed=1)
        start = time.perf_counter()
        trained = fit(table, TrainConfig(name="bench"), progress=lambda message: None)
        seconds = time.perf_counter() - start
        figures[f"{key}.seconds"] = round(seconds, 2)
        outlier_s = trained.timings_s["outlier_fit"]
        figures[f"{key}.outlier_fit_s"] = round(outlier_s, 2)
        figures[f"{key}.forward_folds_s"] = round(trained.timings_s["forward_folds"], 2)
        figures[f"{key}.yield_fit_s"] = round(trained.timings_s["yield_fit"], 2)
        figures[f"{key}.fit_over_outlier_fit"] = round(seconds / outlier_s, 2) if outlier_s > 0 else None
        previous = (parts, seconds)
    return figures
