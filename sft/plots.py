"""Pictures of a run and of its data: training curves (loss, eval loss, learning rate) and sample lengths.

Each PNG also carries, in a text chunk named `PLOTTED_KEY`, the very values its lines and bars were drawn from
(read back from the matplotlib figure just before saving), so the numbers behind a picture can be checked
without reading pixels: `plotted_data(path)`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

# Figures made directly, not through pyplot: they need no backend and no display (none on a training node), so
# nothing here touches matplotlib's global backend or pyplot's list of open figures.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sft.outputs import written_whole

TRAINING_CURVES_FILE = "training_curves.png"
PLOTTED_KEY = "Plotted data"


def training_curves_figure(log_history: list[dict]) -> Figure:
    """Train loss and eval loss (top) and learning rate (bottom) against the optimizer step, from a Trainer's
    `state.log_history` (the list saved in trainer_state.json)."""
    series = {
        "train loss": [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry],
        "eval loss": [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry],
        "learning rate": [(entry["step"], entry["learning_rate"]) for entry in log_history if "learning_rate" in entry],
    }
    figure = Figure(figsize=(7, 5))
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for name, marker in (("train loss", "."), ("eval loss", "o")):
        if series[name]:
            steps, values = zip(*series[name])
            loss_axes.plot(steps, values, marker=marker, markersize=4, label=name)
    if not series["train loss"] and not series["eval loss"]:
        loss_axes.text(0.5, 0.5, "no loss logged (raise --logging_steps?)", ha="center", transform=loss_axes.transAxes)
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("Training curves")
    loss_axes.grid(alpha=0.3)
    if loss_axes.lines:
        loss_axes.legend()
    if series["learning rate"]:
        steps, values = zip(*series["learning rate"])
        lr_axes.plot(steps, values, color="tab:green", label="learning rate")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("optimizer step")
    lr_axes.grid(alpha=0.3)
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    figure.tight_layout()
    return figure


def length_histogram_figure(
    lengths_by_fate: dict[str, list[int]], max_length: int, title: str = "Sample lengths"
) -> Figure:
    """Stacked histogram of sample lengths in tokens (before truncation), one colour per fate ("fits",
    "truncated", "dropped: ..."), with `max_length` marked."""
    everything = [length for lengths in lengths_by_fate.values() for length in lengths]
    largest = max([*everything, max_length])
    width = max(1, math.ceil(largest / 40))  # whole tokens per bin, about 40 bins
    # One edge half a token above max_length: no bar mixes samples that fit with samples that do not.
    first = max_length + 0.5 - width * math.ceil((max_length + 0.5) / width)
    edges = np.arange(first, largest + width + 1, width)
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    present = {fate: lengths for fate, lengths in lengths_by_fate.items() if lengths}
    if present:
        axes.hist(
            list(present.values()), bins=edges, stacked=True, label=list(present), edgecolor="white", linewidth=0.5
        )
    axes.axvline(max_length, color="tab:red", linestyle="--", label=f"--model_max_length {max_length}")
    axes.set_xlabel("tokens per sample (before truncation)")
    axes.set_ylabel("samples")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure


def _figure_data(figure: Figure) -> dict:
    """What the figure shows: each line's (x, y) points and each histogram's bin edges and bar heights, per axes
    (keyed by its y label), read from the figure itself."""
    data: dict[str, dict] = {}
    for axes in figure.axes:
        panel: dict[str, object] = {}
        for line in axes.lines:
            label = line.get_label()
            if label.startswith("--model_max_length"):
                panel["max_length"] = float(line.get_xdata()[0])
            elif not label.startswith("_"):
                panel[label] = [[float(x), float(y)] for x, y in line.get_xydata()]
        for container in axes.containers:  # one BarContainer per histogram layer
            label = container.patches[0].get_label()  # hist labels a layer's first bar
            lefts = [patch.get_x() for patch in container.patches]
            panel[label] = {
                "bin_edges": [float(x) for x in lefts] + [float(lefts[-1] + container.patches[-1].get_width())],
                "counts": [float(patch.get_height()) for patch in container.patches],
            }
        data[axes.get_ylabel() or str(len(data))] = panel
    return data


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Writes the figure as a PNG (whole or not at all: a reader never finds half a picture), with the plotted
    values in its `PLOTTED_KEY` text chunk."""
    path = Path(path)
    # NaN (a skipped non-finite step) is written as null: JSON has no NaN.
    plotted = json.dumps(_figure_data(figure), allow_nan=True).replace("NaN", "null")
    with written_whole(path, folder=False) as temporary:
        figure.savefig(temporary, format="png", dpi=100, metadata={PLOTTED_KEY: plotted})
    return path


def plotted_data(path: str | os.PathLike) -> dict:
    """The values a PNG written by `save_figure` was drawn from (None where a value was NaN)."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[PLOTTED_KEY])


def save_training_curves(log_history: list[dict], output_dir: str | os.PathLike) -> Path:
    """`training_curves.png` in `output_dir`, replacing the one an earlier run (or this run before a resume) wrote."""
    preference = any("rewards/margins" in entry for entry in log_history)
    figure = preference_curves_figure(log_history) if preference else training_curves_figure(log_history)
    return save_figure(figure, Path(output_dir) / TRAINING_CURVES_FILE)


def preference_curves_figure(log_history: list[dict]) -> Figure:
    """A preference run's curves (dpo.py): loss and eval loss; rewards of chosen and rejected answers, their margin
    and accuracy; the mean token lengths of chosen and rejected answers (a length bias shows as a growing gap)."""
    figure = Figure(figsize=(7, 8))
    panels = figure.subplots(3, 1, sharex=True)
    groups = (
        ("loss", ("loss", "eval_loss")),
        ("reward", ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")),
        ("answer tokens", ("length/chosen", "length/rejected")),
    )
    for axes, (label, names) in zip(panels, groups):
        for name in names:
            points = [(entry["step"], entry[name]) for entry in log_history if name in entry]
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, marker=".", markersize=4, label=name)
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    panels[0].set_title("Preference training curves")
    panels[-1].set_xlabel("optimizer step")
    figure.tight_layout()
    return figure
