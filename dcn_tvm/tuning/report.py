"""The end-of-run table and the Markdown report (templates/tuning_report.md.j2) with its plot."""

from __future__ import annotations

import json
from pathlib import Path

from dcn_tvm.kernels.records import Records
from dcn_tvm.kernels.workloads import STAGES
from dcn_tvm.render import render
from dcn_tvm.tuning.tuner import MIN_REPEAT_MS, REPEAT, ROUNDS, Result, result_of


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _row(workload: str, default_ms, tuned_ms, trials: int, **extra) -> dict:
    speedup = default_ms / tuned_ms if default_ms and tuned_ms else None
    return dict(workload=workload, default_ms=_ms(default_ms), tuned_ms=_ms(tuned_ms), trials=trials,
                speedup="-" if speedup is None else f"{speedup:.2f}x", **extra)


def _rows(results: list[Result]) -> list[dict]:
    """One row per kernel."""
    return [_row(r.workload, r.default_ms, r.tuned_ms, r.trials, stage=r.stage, schedule=r.schedule)
            for r in results]


def _workload_rows(results: list[Result]) -> list[dict]:
    """One row per workload: the times of its kernels added up (a forward and backward pass)."""
    rows = []
    for workload in dict.fromkeys(r.workload for r in results):
        mine = [r for r in results if r.workload == workload]
        known = all(r.default_ms is not None and r.tuned_ms is not None for r in mine)
        rows.append(_row(workload, sum(r.default_ms for r in mine) if known else None,
                         sum(r.tuned_ms for r in mine) if known else None, sum(r.trials for r in mine),
                         stages=", ".join(r.stage for r in mine)))
    return rows


def table(results: list[Result]) -> str:
    """The results as Markdown tables: per workload (its kernels added up), then per kernel; each
    with default and tuned time, speedup and trials."""
    return render("tuning_table.md.j2", workloads=_workload_rows(results), rows=_rows(results))


def recorded(folder: Path) -> list[Result]:
    """Every finished kernel recorded for one target (`folder` = <logs>/<target-key>)."""
    results = []
    for op_folder in sorted(path for path in folder.iterdir() if (path / "metadata.json").is_file()):
        store = Records(folder.name, op_folder.name, folder.parent)
        results += [result_of(store, key) for key, entry in store.metadata()["kernels"].items()
                    if "default_ms" in entry]
    order = {stage: index for stages in STAGES.values() for index, stage in enumerate(stages)}
    return sorted(results, key=lambda r: (r.workload, order[r.stage]))


def _plot(results: list[Result], path: Path) -> bool:
    """Best time against trials, one panel per workload; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot

    workloads = list(dict.fromkeys(r.workload for r in results))
    figure, axes = pyplot.subplots(len(workloads), 1, figsize=(8, 2.8 * len(workloads)), squeeze=False)
    for axis, workload in zip(axes[:, 0], workloads):
        for index, result in enumerate(r for r in results if r.workload == workload):
            color = f"C{index}"
            points = [(trials, best) for trials, best in result.history if best is not None]
            if points:
                axis.plot(*zip(*points), marker=".", color=color, label=result.stage)
            if result.default_ms is not None:
                axis.axhline(result.default_ms, color=color, linestyle=":")
        axis.set_title(workload, fontsize=7)
        axis.set_xlabel("trials")
        axis.set_ylabel("best ms")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80, metadata={"Software": None})
    pyplot.close(figure)
    return True


def write(folder: Path) -> Path:
    """Write `folder`/report.md (and report.png) for every kernel recorded for that target."""
    results = recorded(folder)
    metadata = next(Records(folder.name, p.name, folder.parent).metadata()
                    for p in sorted(folder.iterdir()) if (p / "metadata.json").is_file())
    plot = folder / "report.png"
    has_plot = _plot(results, plot)
    report = folder / "report.md"
    report.write_text(render("tuning_report.md.j2", target=folder.name, device=metadata["device"],
                             tvm=metadata["tvm"], dcn_tvm=metadata["dcn_tvm"], date=metadata["date"],
                             target_json=json.dumps(metadata["target"]), rounds=ROUNDS, repeat=REPEAT * ROUNDS,
                             min_repeat_ms=MIN_REPEAT_MS, folder=folder.name,
                             workloads=_workload_rows(results), rows=_rows(results), plot=plot.name if has_plot else None))
    return report
