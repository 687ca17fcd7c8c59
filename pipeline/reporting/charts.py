"""The report's chart, drawn by matplotlib: the training loss curve (loss.svg)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from pipeline.io.atomic import atomic_file
from pipeline.training.outputs import LOG_GLOB, TrainingLog, read_training_done, read_training_log

LOSS_COLOR, LR_COLOR, RESTART_COLOR = "#1f5fbf", "#2a8f3a", "#d08000"
# Text stays text (searchable, small); fixed ids and no date: the same log gives the same file;
# no path simplification: every logged step is a vertex of its line.
SVG_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "rldiff-report", "path.simplify": False,
             "font.family": "DejaVu Sans", "font.size": 9}


def _draw_loss(figure, log: TrainingLog, max_steps: int | None) -> None:
    x, loss = log.steps.astype(float), log.losses
    x_range = (0.0, max(float(x.max()), float(max_steps or 0), 1.0))
    positive = loss[loss > 0]
    use_log = len(positive) == len(loss) and positive.max() / positive.min() > 20
    window = max(1, len(loss) // 20)
    smooth = pd.Series(loss).rolling(window, min_periods=1, center=True).mean().to_numpy() if window > 2 else None
    panels = 2 if log.learning_rates is not None else 1
    grid = figure.add_gridspec(panels, 1, height_ratios=[3, 1][:panels], left=0.1, right=0.96, top=0.88,
                               bottom=0.17, hspace=0.35)
    top = figure.add_subplot(grid[0])
    top.set_title("loss" + (" (log scale)" if use_log else ""), loc="left", fontweight="bold")
    top.plot(x, loss, color=LOSS_COLOR, lw=1 if smooth is not None else 1.8, alpha=0.35 if smooth is not None else 1,
             marker="o" if len(x) <= 40 else None, ms=3, gid="loss")
    if smooth is not None:
        top.plot(x, smooth, color=LOSS_COLOR, lw=2, gid="loss-moving-average")
    if use_log:
        top.set_yscale("log")
        # 0.02, not 2 x 10^-2; of the minor ticks only 2 x and 5 x a power of ten, so labels never crowd
        top.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
        top.yaxis.set_minor_formatter(FuncFormatter(
            lambda value, _: f"{value:.3g}" if round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""))
    for number, step in enumerate(log.restarts):
        top.axvline(step, color=RESTART_COLOR, ls="--", lw=1, gid=f"restart-{number}")
    axes = [top]
    if log.learning_rates is not None:
        bottom = figure.add_subplot(grid[1], sharex=top)
        bottom.set_title("learning rate", loc="left", fontweight="bold")
        bottom.plot(x, log.learning_rates, color=LR_COLOR, lw=1.8, gid="learning-rate")
        axes.append(bottom)
    for ax in axes:
        ax.grid(True, color="#e4e4e4", lw=0.8)
        ax.set_xlim(*x_range)
    axes[-1].set_xlabel("optimiser step")
    last = loss[-max(1, len(loss) // 10):].mean()
    restarts = len(log.restarts)
    note = (f"{len(log)} logged steps, last at step {int(x.max())}; mean of the last tenth {last:.4g}"
            + (f"; {restarts} restart(s), dashed" if restarts else ""))
    figure.text(0.1, 0.025, note, color="#444", fontsize=9, gid="note")


def loss_curve(training_dir: str | Path, out: str | Path, dataset: str) -> TrainingLog:
    """SVG of the training loss (top; log scale when it spans more than a factor of 20, with a
    moving average when there are many points) and the learning rate (bottom) against the
    optimiser step. Dashed lines mark where a restarted run continued."""
    log = read_training_log(training_dir)
    done = read_training_done(training_dir)
    with matplotlib.rc_context(SVG_STYLE):
        figure = Figure(figsize=(7.6, 4.92), dpi=100)
        FigureCanvasAgg(figure)
        figure.suptitle(f"{dataset}: training loss (noise-prediction MSE) by optimiser step", x=0.02, ha="left",
                        fontsize=11, fontweight="bold")
        if len(log):
            _draw_loss(figure, log, done.max_steps if done else None)
        else:
            figure.text(0.02, 0.8, f"No training log found ({LOG_GLOB}).", fontsize=11)
        with atomic_file(out) as temp:
            figure.savefig(temp, format="svg", metadata={"Date": None})
    return log
