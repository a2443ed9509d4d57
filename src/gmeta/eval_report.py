"""The evaluation report: AUC vs support size, plots (PNG) and a Markdown summary of one eval run.

``write_eval_report`` writes into the eval run's output dir:

* ``support_size_metrics.json``: adapted metrics per (support size k, state), k in ``support_sizes``
  plus ``"all"``: each task adapts on its FIRST k support samples (time order: what a new user with
  k interactions has), the query sets are unchanged;
* ``curves.png``: training loss and validation AUCs of the checkpoint's training run (from its CSV
  logger ``<run>/csv/*/metrics.csv``; skipped when there is none);
* ``auc_by_state.png``: AUC per cold-start state, with vs without adaptation (and a baseline run's);
* ``auc_vs_support.png``: AUC per state as a function of k;
* ``report.md``: the tables behind the plots, linking the PNGs.

Plain torch + matplotlib (Agg): no Lightning here.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from gmeta.data.batch import TaskBatch, truncate_support  # noqa: E402
from gmeta.data.schema import STATES  # noqa: E402
from gmeta.metrics import ColdStartMetrics  # noqa: E402
from gmeta.report import record_cells, sort_records  # noqa: E402

if TYPE_CHECKING:
    from gmeta.meta.module import MetaDLRMModule

SUPPORT_METRICS_FILENAME = "support_size_metrics.json"
REPORT_FILENAME = "report.md"
DPI = 100
STATE_COLORS = dict(zip(STATES, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))

Record = dict[str, Any]


def _k_label(k: int | None) -> int | str:
    return "all" if k is None else int(k)


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _fmt(x: Any, digits: int = 4) -> str:
    x = _nan(x)
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


# --------------------------------------------------------------------------------------------------
# AUC vs support size
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def support_size_metrics(
    model: MetaDLRMModule, batches: Iterable[TaskBatch], sizes: Sequence[int | None]
) -> list[Record]:
    """Adapted query metrics per (support size, state), on the model's own evaluation path.

    For each batch and each k in ``sizes`` (None = the whole support set) every task adapts on its
    first k real support samples (``truncate_support``), then its unchanged query set is scored
    (``model.learner.predict(..., adapted=True)``) into a fresh ``ColdStartMetrics`` per k. With k=None this is
    exactly what ``MetaDLRMModule.test_step`` computes for ``adapted=True``.

    Returns records ``{"support_size": k or "all", "state", "auc", "logloss", "gauc", "tasks",
    "samples", "gauc_tasks", "support_samples"}``; ``support_samples`` counts the support samples
    actually used by the state's tasks.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metrics = {k: ColdStartMetrics().to(device) for k in sizes}
    used = {k: torch.zeros(len(STATES), dtype=torch.long) for k in sizes}
    try:
        for batch in batches:
            batch = batch.to(device)
            for k in sizes:
                # compact: the inner loop runs over k support columns (so the view has its own lookup)
                b = truncate_support(batch, k, compact=True)
                logits = model.learner.predict(b, model.embedding.lookup(b), adapted=True)
                q = b.query
                metrics[k].update(logits, q.label, q.mask, b.state, b.task_mask)
                per_task = (b.support.mask & b.task_mask[:, None]).sum(1).cpu()
                used[k].index_add_(0, b.state.cpu(), per_task)
    finally:
        model.train(was_training)
    records = []
    for k in sizes:
        for state, values in metrics[k].compute().items():
            records.append(
                {
                    "support_size": _k_label(k),
                    "state": state,
                    **values,
                    "support_samples": int(used[k][STATES.index(state)]),
                }
            )
    return records


def write_support_metrics(records: Sequence[Record], output_dir: str | Path) -> Path:
    clean = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records
    ]
    path = Path(output_dir) / SUPPORT_METRICS_FILENAME
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Training curves (CSV logger)
# --------------------------------------------------------------------------------------------------


def find_metrics_csv(ckpt_path: str | Path) -> Path | None:
    """The CSV log of the training run of ``<run>/checkpoints/x.ckpt`` (newest version), or None."""
    run_dir = Path(ckpt_path).resolve().parent.parent
    found = sorted((run_dir / "csv").glob("*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """{column: [(step, value), ...]} plus ``"<column>@epoch"`` with (epoch, value), empty cells skipped."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step, epoch = row.get("step") or "", row.get("epoch") or ""
            for col, val in row.items():
                if col in ("step", "epoch") or val in (None, ""):
                    continue
                if step:
                    series.setdefault(col, []).append((float(step), float(val)))
                if epoch:
                    series.setdefault(f"{col}@epoch", []).append((float(epoch), float(val)))
    return series


def plot_curves(series: dict[str, list[tuple[float, float]]], path: str | Path) -> Path:
    """Train loss by step; mean val AUC (adapted / plain) by epoch; per-state val AUC by epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    for col, style in (("train/loss", "-"), ("train/support_loss", ":"), ("train/query_loss", "--")):
        if col in series:
            x, y = zip(*series[col], strict=True)
            ax.plot(x, y, style, label=col.replace("train/loss", "train/loss (meta loss)"))
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)

    ax = axes[1]
    for col, style in (("val/auc_adapted", "o-"), ("val/auc_plain", "s--")):
        if f"{col}@epoch" in series:
            x, y = zip(*series[f"{col}@epoch"], strict=True)
            ax.plot(x, y, style, label=col.split("_", 1)[1].replace("plain", "no adaptation"))
    ax.set(title="validation AUC (mean over states)", xlabel="epoch", ylabel="AUC")
    ax.legend(fontsize=8)

    ax = axes[2]
    for state in STATES:
        for mode, style in (("adapted", "o-"), ("plain", "--")):
            col = f"val/{state}/auc_{mode}@epoch"
            if col in series:
                x, y = zip(*series[col], strict=True)
                label = state if mode == "adapted" else None
                ax.plot(x, y, style, color=STATE_COLORS[state], label=label, alpha=1.0 if label else 0.5)
    ax.set(title="validation AUC per state (solid: adapted, dashed: not)", xlabel="epoch", ylabel="AUC")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for ax in axes[1:]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# AUC per state / vs support size
# --------------------------------------------------------------------------------------------------


def _by_state(records: Sequence[Record]) -> dict[tuple[str, str, bool], Record]:
    return {(r["state"], r["method"], bool(r["adapted"])): r for r in records}


def _bar_series(
    records: Sequence[Record], baseline: Sequence[Record] | None
) -> list[tuple[str, list[float]]]:
    """[(legend label, AUC per state)] for the model's and the baseline's (method, adapted) rows."""
    out = []
    for recs, suffix in ((records, ""), (baseline or [], " (baseline)")):
        table = _by_state(recs)
        for method in sorted({r["method"] for r in recs}):
            for adapted in (False, True):
                if not any((s, method, adapted) in table for s in STATES):
                    continue
                label = f"{method}{suffix}, {'adapted' if adapted else 'no adaptation'}"
                aucs = [_nan(table.get((s, method, adapted), {}).get("auc")) for s in STATES]
                out.append((label, aucs))
    return out


def _auc_ylim(values: Iterable[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    pad = max(0.02, 0.15 * (hi - lo))
    return max(0.0, lo - pad), min(1.0, hi + pad)


def plot_auc_by_state(
    records: Sequence[Record], path: str | Path, baseline: Sequence[Record] | None = None
) -> Path:
    """Grouped bars: AUC per cold-start state, with vs without adaptation (and the baseline's)."""
    series = _bar_series(records, baseline)
    states = [s for s in STATES if any(not math.isnan(a[STATES.index(s)]) for _, a in series)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(series))
    colors = ["#9ecae1", "#3182bd", "#fdae6b", "#e6550d"]
    for i, (label, aucs) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(states))]
        ys = [aucs[STATES.index(s)] for s in states]
        bars = ax.bar(xs, ys, width, label=label, color=colors[i % len(colors)], edgecolor="black", lw=0.5)
        ax.bar_label(bars, labels=[_fmt(y, 3) for y in ys], fontsize=7, padding=1, rotation=90)
    ax.set_xticks(range(len(states)), states)
    lo, hi = _auc_ylim(a for _, aucs in series for a in aucs)
    ax.set_ylim(lo, hi + 0.4 * (hi - lo))  # headroom for the value labels and the legend
    ax.set(ylabel="AUC (query sets)", title="AUC per cold-start state")
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def plot_auc_vs_support(
    support_records: Sequence[Record], path: str | Path, records: Sequence[Record] | None = None
) -> Path:
    """AUC per state vs the number of support samples used for adaptation (dotted: no adaptation)."""
    ks = list(dict.fromkeys(r["support_size"] for r in support_records))
    table = {(r["state"], r["support_size"]): r for r in support_records}
    plain = {r["state"]: r for r in records or [] if not r["adapted"]}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    values = []
    for state in STATES:
        ys = [_nan(table.get((state, k), {}).get("auc")) for k in ks]
        if all(math.isnan(y) for y in ys):
            continue
        values += ys
        ax.plot(range(len(ks)), ys, "o-", color=STATE_COLORS[state], label=state)
        if state in plain and not math.isnan(_nan(plain[state]["auc"])):
            values.append(_nan(plain[state]["auc"]))
            ax.axhline(_nan(plain[state]["auc"]), color=STATE_COLORS[state], ls=":", lw=1)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_ylim(*_auc_ylim(values))
    ax.set(
        xlabel="support interactions used for adaptation (first k per task)",
        ylabel="AUC (query sets)",
        title="AUC vs support size (dotted: no adaptation)",
    )
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(
    records: Sequence[Record],
    support_records: Sequence[Record],
    title: str,
    images: Sequence[tuple[str, str]],
    baseline: Sequence[Record] | None = None,
    notes: Sequence[str] = (),
) -> str:
    parts = [f"# {title}", ""]
    parts += [f"- {n}" for n in notes]
    parts += ["", "## Metrics per cold-start state", ""]
    header = ("state", "method", "adapted", "AUC", "logloss", "gAUC", "tasks", "samples")
    rows = [record_cells(r) for r in sort_records(records)]
    rows += [record_cells(r, " (baseline)") for r in sort_records(baseline or [])]
    parts += [_md_table(header, rows), ""]

    # adapted vs not (and vs the baseline) in one AUC row per state
    series = _bar_series(records, baseline)
    if series:
        parts += ["## AUC: adapted vs not" + (" vs baseline" if baseline else ""), ""]
        rows = [(s, *(_fmt(aucs[STATES.index(s)]) for _, aucs in series)) for s in STATES]
        rows = [r for r in rows if any(c != "-" for c in r[1:])]
        parts += [_md_table(("state", *(label for label, _ in series)), rows), ""]

    ks = list(dict.fromkeys(r["support_size"] for r in support_records))
    table = {(r["state"], r["support_size"]): r for r in support_records}
    parts += [
        "## AUC vs support size (adapted, first k support interactions per task)",
        "",
        "Cells: AUC (mean support interactions used per task). Query sets are the same for every k.",
        "",
    ]
    rows = []
    for s in STATES:
        cells = []
        for k in ks:
            r = table.get((s, k))
            cells.append(
                "-" if r is None else f"{_fmt(r['auc'])} ({r['support_samples'] / max(1, r['tasks']):.1f})"
            )
        if any(c != "-" for c in cells):
            rows.append((s, *cells))
    parts += [_md_table(("state", *(f"k={k}" for k in ks)), rows), ""]

    if images:
        parts += ["## Plots", ""]
        parts += [f"![{caption}]({name})\n" for name, caption in images]
    return "\n".join(parts).rstrip() + "\n"


def load_records(path: str | Path) -> list[Record]:
    """Records of a ``cold_start_metrics.json`` (null -> NaN)."""
    recs = json.loads(Path(path).read_text())
    return [{k: (math.nan if v is None else v) for k, v in r.items()} for r in recs]


def write_eval_report(
    model: MetaDLRMModule,
    batches: Iterable[TaskBatch],
    records: Sequence[Record],
    output_dir: str | Path,
    ckpt_path: str | Path,
    support_sizes: Sequence[int] = (1, 3, 5, 10),
    baseline_path: str | Path | None = None,
    title: str = "Evaluation report",
) -> Path:
    """Compute AUC vs support size over ``batches``, write the JSON, the PNGs and ``report.md``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: list[int | None] = [int(k) for k in support_sizes] + [None]
    support_records = support_size_metrics(model, batches, sizes)
    write_support_metrics(support_records, out)
    baseline = load_records(baseline_path) if baseline_path else None

    images: list[tuple[str, str]] = []
    notes = [f"checkpoint: `{ckpt_path}`", f"method: `{model.meta_config.name}`"]
    if baseline_path:
        notes.append(f"baseline: `{baseline_path}`")
    csv_path = find_metrics_csv(ckpt_path)
    if csv_path is not None:
        plot_curves(read_metrics_csv(csv_path), out / "curves.png")
        images.append(("curves.png", "training and validation curves"))
        notes.append(f"training log: `{csv_path}`")
    else:
        notes.append("no training CSV log next to the checkpoint: no curves")
    plot_auc_by_state(records, out / "auc_by_state.png", baseline)
    images.append(("auc_by_state.png", "AUC per cold-start state"))
    plot_auc_vs_support(support_records, out / "auc_vs_support.png", records)
    images.append(("auc_vs_support.png", "AUC vs support size"))

    path = out / REPORT_FILENAME
    path.write_text(markdown_report(records, support_records, title, images, baseline, notes))
    return path
