"""Reports from a runs database: markdown tables, PNG plots, CSV.

Results are grouped by suite and setting (model, data, dense start, calibration batch, objective):
tables never mix settings. The result column holds the objective's graded metric (top-1, or the cosine
to the dense outputs under `distill`), named in every header, axis and the preface. Within a setting
each (method, sparsity, seed) counts once, its latest finished run, and cells are mean ± std over
seeds. Plots use the object-oriented matplotlib API,
so no global backend is touched.
"""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PrunekitError
from ..methods import FAMILIES, get_method
from ..objectives import GRADES
from ..tables import render_table
from .store import DONE, FAILED, PENDING, RUNNING, Store, StoredRun, measured_dense_key, objective_of, settings_text

FORMATS = ("markdown", "csv")
MIB = 2 ** 20
CSV_COLUMNS = ("suite", "setting", "run", "label", "method", "target_sparsity", "seed", "point", "final", "event",
               "sparsity", "objective", "accuracy", "loss", "macs_dense", "macs", "seconds", "forward_passes",
               "forward_examples", "backward_passes", "backward_examples", "peak_memory_bytes", "planned_memory_bytes",
               "hparams", "budget",
               "code_version", "finished", "mask_path")
FAMILY_TITLES = {"one-shot": "one-shot methods", "training": "methods that train",
                 "at-init": "methods for pruning at initialisation"}
MARKERS = "osD^vPX"  # seven, against ten colours: see _styles
LINESTYLES = ("-", "--", "-.")  # ":" is left for the points recorded on the way
PANEL_INCHES = 3.6
LEGEND_ROW_INCHES = 0.2  # at legend font size 8


@dataclass(frozen=True)
class GradeName:
    """How a graded metric (a value of objectives.GRADES) is named in reports and the bench's output."""

    short: str  # "top-1"
    name: str  # "top-1 accuracy"
    unit: str  # of the tables' numbers, which are the metric × 100
    meaning: str  # for the report's preface

    @property
    def header(self) -> str:
        return f"{self.name} ({self.unit})"

    def text(self, value: float) -> str:
        """One value, e.g. the dense model's: `top-1 93.97%`, `cosine 100.00 (×100)`."""
        number = f"{100 * value:.2f}"
        return f"{self.short} {number}%" if self.unit == "%" else f"{self.short} {number} ({self.unit})"


GRADE_NAMES = {
    "accuracy": GradeName("top-1", "top-1 accuracy", "%", "top-1 accuracy on the test split"),
    "cosine": GradeName("cosine", "cosine to the dense outputs", "×100",
                        "the cosine similarity of the pruned model's outputs to the dense model's on each test "
                        "example (mean-pooled over its tokens for sequences), averaged"),
}


def grade_name(objective: str) -> GradeName:
    """The name of the graded metric of `objective` (a key of objectives.GRADES)."""
    return GRADE_NAMES[GRADES[objective]]


@dataclass
class SettingResults:
    """The runs of one suite in one setting."""

    suite: str
    description: str
    published: list[dict[str, Any]]
    setting: str
    latest: bool  # the suite's most recently planned setting
    runs: list[StoredRun]  # every run of the setting, any status
    dense: dict[str, Any] | None
    finals: list[StoredRun] = field(init=False)  # done, the latest per (label, sparsity, seed)

    def __post_init__(self) -> None:
        latest: dict[tuple, StoredRun] = {}
        for run in sorted((r for r in self.runs if r.status == DONE), key=lambda r: r.finished):
            latest[(run.label, run.sparsity, run.seed)] = run
        self.finals = [run for run in self.runs if latest.get((run.label, run.sparsity, run.seed)) is run]

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def grade(self) -> GradeName:
        """The name of the metric the results hold: the graded metric of the setting's objective."""
        return grade_name(objective_of(self.config))

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(run.label for run in self.runs))

    @property
    def sparsities(self) -> list[float]:
        return sorted({run.sparsity for run in self.runs})

    @property
    def failed(self) -> list[StoredRun]:
        finished = {(r.label, r.sparsity, r.seed) for r in self.finals}
        return [r for r in self.runs if r.status == FAILED and (r.label, r.sparsity, r.seed) not in finished]

    @property
    def families(self) -> dict[str, list[str]]:
        """The labels to plot (finished or published) by method family, in FAMILIES order: a panel each."""
        methods = {run.label: run.method for run in self.finals}
        for number in self.published:
            methods.setdefault(number["label"], number["label"])  # a published method not run here
        by_family: dict[str, list[str]] = {family: [] for family in FAMILIES}
        for label, method in methods.items():
            by_family[_family(method)].append(label)
        return {family: labels for family, labels in by_family.items() if labels}

    def count(self, status: str) -> int:
        return sum(run.status == status for run in self.runs)

    def values(self, label: str, sparsity: float, metric: Callable[[StoredRun], float]) -> list[float]:
        return [metric(run) for run in self.finals if run.label == label and run.sparsity == sparsity]

    def headline(self) -> str:
        config = self.config
        start = config["start"]
        if "checkpoint" in start:
            origin = f"checkpoint {Path(start['checkpoint']).name}"
        elif "pretrained" in start:
            origin = f"pretrained weights of {Path(start['pretrained']).name}"
        elif "dense" in start:
            recipe = start["dense"]
            origin = f"dense model trained here ({recipe['epochs']} epochs, {recipe['optimizer']} lr {recipe['lr']})"
        else:
            origin = "fresh weights from each seed"
        sizes = "".join(f", {name} {config[name]}" for name in ("train_size", "test_size") if config.get(name))
        return (f"{config['model']} on {config['dataset']}{sizes}; start: {origin}; objective "
                f"{objective_of(config)}; calibration batch {config['batch_size']}; setting {self.setting}")


def _family(method: str) -> str:
    """How the method is meant to be used; one not registered here (an old database's) counts as one-shot."""
    try:
        return get_method(method).family
    except PrunekitError:
        return "one-shot"


def collect(store: Store, suite: str | None = None) -> list[SettingResults]:
    """Every suite (or one) and setting in the database, the most recent setting of each suite first."""
    runs = store.runs(suite)
    if not runs:
        known = sorted({run.suite for run in store.runs()})
        where = f" for suite {suite!r}" if suite else ""
        hint = f"suites in it: {', '.join(known)}" if known else "run `prunekit bench --suite NAME` first"
        raise PrunekitError(f"{store.path} holds no runs{where}; {hint}")
    suites = store.suites()
    results = []
    for name in dict.fromkeys(run.suite for run in runs):
        own = [run for run in runs if run.suite == name]
        settings = sorted({run.setting for run in own},
                          key=lambda s: max(r.created for r in own if r.setting == s), reverse=True)
        info = suites.get(name, {"description": "", "published": []})
        for index, setting in enumerate(settings):
            members = [run for run in own if run.setting == setting]
            config = members[0].config
            dense = store.dense(measured_dense_key(config["dense_key"], objective_of(config)))
            results.append(SettingResults(name, info["description"], info["published"], setting, index == 0,
                                          members, dense))
    return results


# ---------------------------------------------------------------- numbers as text

def _mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _seconds(values: Sequence[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    text = f"{mean:.3g}"
    return text if len(values) == 1 else f"{text} ± {statistics.stdev(values):.2g}"


def _accuracy(run: StoredRun) -> float:
    return run.final.accuracy


def _cost(key: str) -> Callable[[StoredRun], float]:
    return lambda run: run.cost.get(key, 0)  # runs stored before a key existed have none


def _planned(planned_bytes: float) -> str:
    return f"{planned_bytes / MIB:.1f}" if planned_bytes else "–"


def accuracy_table(results: SettingResults) -> tuple[list[str], list[list[str]]]:
    """The graded metric (× 100) per method and sparsity, mean ± std over seeds."""
    headers = ["method"] + [f"{s:g}" for s in results.sparsities] + ["seeds"]
    rows = []
    for label in results.labels:
        seeds = {run.seed for run in results.finals if run.label == label}
        rows.append([label] + [_mean_std(results.values(label, s, _accuracy), 100) for s in results.sparsities]
                    + [str(len(seeds))])
    return headers, rows


def terminal_summary(store: Store, suite: str, setting: str) -> str:
    """The accuracy table of one setting, for the end of `prunekit bench`."""
    results = next(r for r in collect(store, suite) if r.setting == setting)
    headers, rows = accuracy_table(results)
    grade = results.grade
    lines = [f"{suite}: {results.headline()}"]
    if results.dense:
        lines.append(f"dense {grade.text(results.dense['accuracy'])}")
    lines += [f"{grade.header}, mean ± std over seeds, by sparsity:", render_table(headers, rows)]
    return "\n".join(lines)


# ---------------------------------------------------------------- markdown

def write_report(db: str | Path, out: str | Path, suite: str | None = None, fmt: str = "markdown") -> list[Path]:
    """Write the report (markdown + PNG plots, or one CSV) into `out`; returns the files written."""
    if fmt not in FORMATS:
        raise PrunekitError(f"report format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    if not Path(db).is_file():
        raise PrunekitError(f"no runs database at {db}; run `prunekit bench --suite NAME --db {db}` first")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"--out {out} is a file; give a folder for the report")
    with Store(db) as store:
        all_results = collect(store, suite)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        return [_write_csv(all_results, out / "results.csv")]
    return _write_markdown(all_results, out, Path(db))


def _write_markdown(all_results: list[SettingResults], out: Path, db: Path) -> list[Path]:
    written = []
    grades = "; ".join(f"{grade.short} is {grade.meaning}"
                       for grade in dict.fromkeys(results.grade for results in all_results))
    preface = (f"From `{db}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}. Each suite's results are its "
               f"objective's graded metric: {grades}. Sparsity is the fraction of zero weights over all Conv and "
               "Linear weights; cost is what `prunekit.prune` used (measuring is not counted); MACs are "
               "multiply–accumulates per example (for text: per the first test example's tokens) with zero weights "
               "skipped (FLOPs ≈ 2 × MACs).")
    lines = ["# prunekit bench report", "", preface, ""]
    for results in all_results:
        stem = _file_stem(results)
        plots = [_plot(accuracy_figure, results, out / f"{stem}-accuracy.png"),
                 _plot(cost_figure, results, out / f"{stem}-cost.png")]
        written += [p for p in plots if p is not None]
        lines += _suite_section(results, plots)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [path] + written


def _suite_section(results: SettingResults, plots: list[Path | None]) -> list[str]:
    title = results.suite if results.latest else f"{results.suite} (earlier setting {results.setting})"
    lines = [f"## {title}", ""]
    if results.description:
        lines += [results.description, ""]
    lines += [results.headline() + ".", ""]
    grade = results.grade
    if results.dense:
        dense = results.dense
        lines += [f"Dense model: {grade.text(dense['accuracy'])}, {dense['macs']:,} MACs per example.", ""]
    status = [f"{results.count(s)} {s}" for s in (PENDING, RUNNING) if results.count(s)]
    if status:
        lines += [f"Not finished: {', '.join(status)} (run the same `prunekit bench` command to complete them).", ""]
    headers, rows = accuracy_table(results)
    lines += [f"### {grade.header[0].upper()}{grade.header[1:]} by sparsity", "", "mean ± std over seeds", "",
              *_markdown_table(headers, rows), ""]
    if plots[0] is not None:
        lines += [f"![accuracy vs sparsity]({plots[0].name})", ""]
    lines += _published_section(results)
    lines += _search_section(results)
    lines += _cost_section(results)
    if plots[1] is not None:
        lines += [f"![cost vs sparsity]({plots[1].name})", ""]
    lines += _layers_section(results)
    lines += _rounds_section(results)
    lines += _failures_section(results)
    lines += _environment_section(results)
    return lines


def _published_section(results: SettingResults) -> list[str]:
    if not results.published:
        return []
    rows = []
    for number in results.published:
        ours = results.values(number["label"], number["sparsity"], _accuracy)
        cell = f"{100 * number['accuracy']:.2f}"
        if number["std"] is not None:
            cell += f" ± {100 * number['std']:.2f}"
        difference = f"{100 * (statistics.fmean(ours) - number['accuracy']):+.2f}" if ours else "—"
        rows.append([number["label"], f"{number['sparsity']:g}", cell, _mean_std(ours, 100), difference,
                     number["source"]])
    return ["### Published numbers beside ours", "",
            *_markdown_table(["method", "sparsity", f"published {results.grade.header}", "ours", "ours − published",
                              "source"], rows), ""]


def _search_section(results: SettingResults) -> list[str]:
    """The values each searching entry chose on the held-out examples, and every candidate's score."""
    searched = [run for run in results.finals if run.search]
    if not searched:
        return []
    rows = [[run.label, f"{run.sparsity:g}", str(run.seed), settings_text(run.search["chosen"]),
             "; ".join(f"{settings_text(c['hparams'])}: {100 * c['accuracy']:.2f}" for c in run.search["candidates"])]
            for run in searched]
    grade = results.grade
    explained = (f"Each candidate was pruned and scored by {grade.short} on {searched[0].search['holdout']:,} "
                 "training examples held out of every run (never the test set); the chosen one is the run in the "
                 "tables.")
    headers = ["method", "sparsity", "seed", "chosen", f"held-out {grade.header} of each candidate"]
    return ["### Hyperparameters searched on held-out data", "", explained, "", *_markdown_table(headers, rows), ""]


def _cost_section(results: SettingResults) -> list[str]:
    seconds = [[label] + [_seconds(results.values(label, s, _cost("seconds"))) for s in results.sparsities]
               for label in results.labels]
    passes = [_passes_row(results, label) for label in results.labels
              if any(run.label == label for run in results.finals)]
    explained = ("At each method's largest sparsity (means over seeds): examples through the model, peak memory "
                 "above the start and the method's own estimate of it (– where it plans none), MACs kept and the "
                 "theoretical speed-up of a kernel that skips zeros:")
    return ["### Cost", "", "Wall seconds of pruning, mean ± std over seeds:", "",
            *_markdown_table(["method"] + [f"{s:g}" for s in results.sparsities], seconds), "", explained, "",
            *_markdown_table(["method", "sparsity", "forward examples", "backward examples", "peak memory (MiB)",
                              "planned (MiB)", "MACs kept (%)", "speed-up"], passes), ""]


def _passes_row(results: SettingResults, label: str) -> list[str]:
    runs = [run for run in results.finals if run.label == label]
    top = max(run.sparsity for run in runs)
    at_top = [run for run in runs if run.sparsity == top]

    def mean(metric: Callable[[StoredRun], float]) -> float:
        return statistics.fmean(metric(run) for run in at_top)

    return [label, f"{top:g}", f"{mean(_cost('forward_examples')):,.0f}", f"{mean(_cost('backward_examples')):,.0f}",
            f"{mean(_cost('peak_memory_bytes')) / MIB:.1f}", _planned(mean(_cost('planned_memory_bytes'))),
            f"{100 * mean(lambda r: r.final.macs / r.final.macs_dense):.1f}",
            f"{mean(lambda r: r.final.macs_dense / max(r.final.macs, 1)):.2f}×"]


def _layers_section(results: SettingResults) -> list[str]:
    if not results.finals:
        return []
    top = max(run.sparsity for run in results.finals)
    chosen = {}
    for run in sorted(results.finals, key=lambda r: r.seed):
        if run.sparsity == top and run.label not in chosen:
            chosen[run.label] = run
    tensors = list(dict.fromkeys(name for run in chosen.values() for name in run.final.layers))
    rows = [[name] + [f"{run.final.layers[name]:.3f}" if name in run.final.layers else "—" for run in chosen.values()]
            for name in tensors]
    return [f"### Sparsity per layer at {top:g} (lowest seed)", "",
            *_markdown_table(["tensor"] + list(chosen), rows), ""]


def _rounds_section(results: SettingResults) -> list[str]:
    """Results that methods recorded on their way to the target (IMP rounds, stages)."""
    groups: dict[tuple, list] = {}
    for run in results.finals:
        for point in run.points:
            if not point.final:
                groups.setdefault((run.label, run.sparsity, round(point.sparsity, 4)), []).append(point)
    if not groups:
        return []
    rows = [[label, f"{target:g}", f"{reached:.4f}", _mean_std([p.accuracy for p in points], 100),
             _seconds([p.cost["seconds"] for p in points])]
            for (label, target, reached), points in groups.items()]
    return ["### Results recorded during runs", "",
            "Methods that record sparsities on their way (rounds, stages) are measured at each; cost is cumulative.",
            "", *_markdown_table(["method", "target", "reached", results.grade.header, "seconds so far"], rows), ""]


def _failures_section(results: SettingResults) -> list[str]:
    if not results.failed:
        return []
    rows = [[run.label, f"{run.sparsity:g}", str(run.seed), str(run.attempts),
             (run.error or "").strip().splitlines()[-1][:200] if run.error else ""] for run in results.failed]
    return ["### Failed runs", "", "The full tracebacks are in the database (`runs.error`).", "",
            *_markdown_table(["method", "sparsity", "seed", "attempts", "error"], rows), ""]


def _environment_section(results: SettingResults) -> list[str]:
    keys = ("host", "cpu", "cores", "threads", "device", "torch", "python", "prunekit")
    counts: dict[tuple, int] = {}
    for run in results.finals:
        environment = run.environment or {}
        row = tuple(str(environment.get(key, "")) for key in keys)
        counts[row] = counts.get(row, 0) + 1
    if not counts:
        return []
    rows = [list(row) + [str(count)] for row, count in counts.items()]
    return ["### Environment", "", *_markdown_table(list(keys) + ["runs"], rows), ""]


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(headers), "|" + "|".join("---" for _ in headers) + "|"] + [line(row) for row in rows]


def _file_stem(results: SettingResults) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", results.suite)
    return stem if results.latest else f"{stem}-{results.setting[:8]}"


# ---------------------------------------------------------------- plots

def _plot(make_figure: Callable[[SettingResults], Any], results: SettingResults, path: Path) -> Path | None:
    if not results.finals:
        return None
    make_figure(results).savefig(path, dpi=110)
    return path


def accuracy_figure(results: SettingResults):
    """The graded metric against sparsity, one panel per method family, with the dense model and published numbers."""
    families = results.families
    figure, legends, grid = _panels(families, rows=1)
    for labels, (axes,) in zip(families.values(), grid):
        styles = _styles(labels)
        if results.dense:
            axes.axhline(100 * results.dense["accuracy"], color="0.4", linestyle="--", linewidth=1, label="dense")
        for label in labels:
            _errorbar(axes, results, label, _accuracy, 100, styles[label], label)
            way = _on_the_way(results, label)
            if way:
                axes.plot([p.sparsity for p in way], [100 * p.accuracy for p in way], markersize=3, alpha=0.7,
                          label=f"{label} (recorded on the way)", **{**styles[label], "linestyle": ":"})
        for number in results.published:
            if number["label"] in styles:
                axes.scatter([number["sparsity"]], [100 * number["accuracy"]], marker="x", s=60, zorder=3,
                             color=styles[number["label"]]["color"], label=f"{number['label']} (published)")
    grid[0][0].set_ylabel(results.grade.header)
    _finish(figure, legends, grid, results, f"{results.grade.short} vs sparsity")
    return figure


def cost_figure(results: SettingResults):
    """Wall seconds and examples through the model against sparsity, one column of panels per method family."""
    families = results.families
    figure, legends, grid = _panels(families, rows=2)
    for labels, (seconds_axes, examples_axes) in zip(families.values(), grid):
        styles = _styles(labels)
        for label in labels:
            _errorbar(seconds_axes, results, label, _cost("seconds"), 1, styles[label], label)
            _errorbar(examples_axes, results, label,
                      lambda run: run.cost["forward_examples"] + run.cost["backward_examples"], 1, styles[label],
                      label)
        seconds_axes.set_yscale("log")
        examples_axes.set_yscale("symlog", linthresh=1)  # one-shot scores pass no examples at all
    grid[0][0].set_ylabel("wall seconds of pruning")
    grid[0][1].set_ylabel("examples through the model (forward + backward)")
    _finish(figure, legends, grid, results, "cost vs sparsity")
    return figure


def _on_the_way(results: SettingResults, label: str) -> list:
    """The measured points of the method's highest-target run (lowest seed), inside the grid's range."""
    runs = [run for run in results.finals if run.label == label and any(not p.final for p in run.points)]
    if not runs:
        return []
    run = max(runs, key=lambda r: (r.sparsity, -r.seed))
    low = min(results.sparsities)
    return sorted((p for p in run.points if low <= p.sparsity), key=lambda p: p.sparsity)


def _panels(families: dict[str, list[str]], rows: int):
    """A column of `rows` panels per family, titled, over a row for its legend; each row shares its y axis.

    The legends get a row of their own, sized in _finish, so that panels of every family line up
    whatever the length of their legends.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * len(families), PANEL_INCHES * rows), layout="constrained")
    layout = figure.add_gridspec(rows + 1, len(families))
    grid = []
    for index, family in enumerate(families):
        panels = [figure.add_subplot(layout[row, index], sharey=grid[0][row] if grid else None)
                  for row in range(rows)]
        panels[0].set_title(FAMILY_TITLES.get(family, family))
        grid.append(panels)
    legends = [figure.add_subplot(layout[rows, index]) for index in range(len(families))]
    for axes in legends:
        axes.set_axis_off()
    return figure, legends, grid


def _styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """A colour, marker and line style per method of a panel, no two alike.

    Seven markers against ten colours repeat together only after 70 methods; the line style changes
    every ten, so a colour comes back with another marker and another line style.
    """
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {label: {"color": palette(index % 10), "marker": MARKERS[index % len(MARKERS)],
                    "linestyle": LINESTYLES[index // 10 % len(LINESTYLES)]} for index, label in enumerate(labels)}


def _errorbar(axes, results: SettingResults, label: str, metric: Callable[[StoredRun], float], scale: float,
              style: dict[str, Any], legend: str) -> None:
    points = [(s, results.values(label, s, metric)) for s in results.sparsities]
    points = [(s, values) for s, values in points if values]
    if not points:
        return
    means = [scale * statistics.fmean(v) for _, v in points]
    stds = [scale * statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
    axes.errorbar([s for s, _ in points], means, yerr=stds, markersize=4, capsize=3, label=legend, **style)


def _finish(figure, legends, grid, results: SettingResults, what: str) -> None:
    """Shared x axis (a logit scale spreads 0.9, 0.95, 0.98 apart), title, a legend under each family's panels."""
    sparsities = results.sparsities
    for panel in (panel for panels in grid for panel in panels):
        if all(0 < s < 1 for s in sparsities) and len(sparsities) > 1:
            panel.set_xscale("logit")
        panel.set_xticks(sparsities, [f"{s:g}" for s in sparsities])
        panel.minorticks_off()
        panel.set_xlabel("sparsity (fraction of weights removed)")
        panel.grid(alpha=0.3)
    entries = 0
    for legend_axes, panels in zip(legends, grid):
        handles, labels = panels[0].get_legend_handles_labels()
        # dense first, then by name: a method's published and recorded points come right after it
        ordered = sorted(zip(labels, handles), key=lambda entry: (entry[0] != "dense", entry[0]))
        legend_axes.legend([handle for _, handle in ordered], [label for label, _ in ordered], loc="upper center",
                           ncols=2, fontsize=8, frameon=False)
        entries = max(entries, len(labels))
    legend_inches = LEGEND_ROW_INCHES * (math.ceil(entries / 2) + 1)
    rows = len(grid[0])
    legends[0].get_gridspec().set_height_ratios([PANEL_INCHES] * rows + [legend_inches])
    figure.set_figheight(PANEL_INCHES * rows + legend_inches)
    config = results.config
    figure.suptitle(f"{results.suite}: {what} ({config['model']} on {config['dataset']})")


# ---------------------------------------------------------------- csv

def _write_csv(all_results: list[SettingResults], path: Path) -> Path:
    """One row per result row of every finished run (all settings), the final one and any recorded on the way."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for results in all_results:
            for run in results.runs:
                if run.status != DONE:
                    continue
                for index, point in enumerate(run.points):
                    cost = point.cost
                    writer.writerow([
                        run.suite, run.setting, run.hash, run.label, run.method, run.sparsity, run.seed, index,
                        int(point.final), "" if point.event is None else json.dumps(point.event), point.sparsity,
                        objective_of(run.config), point.accuracy, point.loss, point.macs_dense, point.macs,
                        cost["seconds"], cost["forward_passes"], cost["forward_examples"], cost["backward_passes"],
                        cost["backward_examples"], cost["peak_memory_bytes"], cost.get("planned_memory_bytes", 0),
                        json.dumps(run.config["hparams"]),
                        json.dumps(run.config["budget"]), run.code_version,
                        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(run.finished)), run.mask_path])
    return path

