"""Compare methods over seeds with paired, user-level bootstrap 95% intervals, per state and shot count.

For each method (a name and ``train.py`` overrides) and seed this

1. trains ``python train.py <overrides> seed=S test=false`` into ``<out>/runs/<method>/seed_<S>``
   (kept: ``--reuse`` skips runs whose best checkpoint exists);
2. loads the best checkpoint and sets its evaluation adaptation: ``--adaptation auto`` chooses a
   schedule per support size on the VALIDATION split with the same grid for every method (the
   fine-tuned baseline gets the meta-learner's tuning budget), ``fixed`` uses each method's
   ``meta`` inner loop;
3. scores every query sample of ``--split`` at each shot count (``--shots``; 0 = no adaptation,
   ``all`` = the whole support set) and saves them (``predictions.npz``);

then resamples users (tasks, within each state) ``--replicates`` times, scores every method, seed
and k on the same replicates, and writes ``<out>/report.md`` (tables: mean AUC over seeds, the paired
differences with intervals), ``<out>/compare.png`` and ``<out>/compare.json``; prints the tables and
one JSON line. Methods are compared against ``--baseline`` (default: the last one).

Run (MovieLens, 5 seeds; about 2 minutes per run on 2 CPU cores)::

    .venv/bin/python scripts/compare.py --out logs/compare/maml_vs_plain \\
        --method maml=+experiment=movielens_maml --method plain=+experiment=movielens_plain \\
        --seeds 1 2 3 4 5 --adaptation auto
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gmeta.compare import ALL, Interval, Predictions, bootstrap_aucs, collect_predictions, interval  # noqa: E402
from gmeta.data.schema import STATES  # noqa: E402

log = logging.getLogger("compare")
FEW_SHOTS = (1, 2, 3, 5)  # the "averaged over k" of the cold-start targets


def parse_method(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--method wants NAME=OVERRIDES, got {text!r}")
    return name, shlex.split(overrides)


def parse_shot(text: str) -> int | None:
    return None if text == "all" else int(text)


def best_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    return found[-1] if found else None


def train(run_dir: Path, overrides: list[str], seed: int, extra: list[str]) -> Path:
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, *extra, f"seed={seed}", "test=false"]
    cmd += [f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null", "callbacks.model_summary=null"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("training: %s", shlex.join(cmd))
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    ckpt = best_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"{run_dir}: training wrote no best checkpoint (checkpoints/epoch_*.ckpt)")
    log.info("trained in %.0f s: %s", time.perf_counter() - start, ckpt)
    return ckpt


def evaluate(run_dir: Path, ckpt: Path, args: argparse.Namespace) -> Predictions:
    """Adaptation per ``--adaptation``, then the predictions on ``--split`` (saved in the run dir)."""
    from omegaconf import OmegaConf

    from gmeta.app import build_datamodule
    from gmeta.meta.module import MetaDLRMModule
    from gmeta.meta.schedule import AdaptationSchedule
    from gmeta.meta.schedule_search import SearchSpace, search_schedule
    from gmeta.parallel.sharded_checkpoint import load_lightning_module

    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    datamodule = build_datamodule(cfg)
    model, _ = load_lightning_module(MetaDLRMModule, ckpt)
    model.learner.schedule = None
    if args.adaptation == "auto":
        space = SearchSpace(
            steps=tuple(args.grid_steps),
            lrs=tuple(args.grid_lrs),
            groups=tuple(tuple(g.split("+")) for g in args.grid_groups),
            per_state=args.per_state,
        )
        saved = run_dir / ("schedule_per_state.json" if args.per_state else "schedule.json")
        doc = json.loads(saved.read_text()) if saved.exists() else {}
        # a per-state search chose the common buckets too (by the same rule, in the same pass)
        both = run_dir / "schedule_per_state.json"
        both_doc = json.loads(both.read_text()) if both.exists() else {}
        if args.reuse and doc.get("space") == repr(space):  # chosen on validation before, same grid
            model.learner.schedule = AdaptationSchedule.from_dict(doc["schedule"])
        elif args.reuse and both_doc.get("space") == repr(dataclasses.replace(space, per_state=True)):
            common = AdaptationSchedule.from_dict(both_doc["schedule"]).entries
            model.learner.schedule = AdaptationSchedule(common)
        else:
            schedule, _ = search_schedule(model, datamodule.val_dataloader(), space)
            model.learner.schedule = schedule
            doc = {"space": repr(space), "schedule": schedule.to_dict(), "description": schedule.describe()}
            saved.write_text(json.dumps(doc, indent=2) + "\n")
    loader = datamodule.test_dataloader() if args.split == "test" else datamodule.val_dataloader()
    preds = collect_predictions(model, loader, args.shots)
    preds.save(str(run_dir / f"predictions_{args.split}_{adaptation_tag(args)}.npz"))
    return preds


def adaptation_tag(args: argparse.Namespace) -> str:
    """How the evaluation adapted, in the names of the files it saves (``--reuse`` keeps them apart)."""
    return args.adaptation + ("_per_state" if args.per_state and args.adaptation == "auto" else "")


def k_name(k: int) -> str:
    return "all" if k == ALL else str(k)


def summarize(
    aucs: dict[tuple[str, str, int], np.ndarray], methods: list[str], baseline: str
) -> dict[str, Any]:
    """Mean AUCs, paired differences vs the baseline and adapted-minus-unadapted, with intervals."""
    ks = sorted({k for (_, _, k) in aucs}, key=lambda k: math.inf if k == ALL else k)
    out: dict[str, Any] = {"ks": [k_name(k) for k in ks], "states": {}}
    for state in STATES:
        if (baseline, state, ks[0]) not in aucs:
            continue
        rows = {}
        for m in methods:
            row: dict[str, Any] = {}
            for k in ks:
                a = aucs[(m, state, k)]
                cell: dict[str, Any] = {"auc": float(a[0])}
                if 0 in ks and k != 0:
                    cell["vs_unadapted"] = interval(a - aucs[(m, state, 0)])
                if m != baseline:
                    cell["vs_baseline"] = interval(a - aucs[(baseline, state, k)])
                row[k_name(k)] = cell
            few = [k for k in FEW_SHOTS if k in ks]
            if m != baseline and few:
                diff = np.mean([aucs[(m, state, k)] - aucs[(baseline, state, k)] for k in few], axis=0)
                row["few_shot_vs_baseline"] = interval(diff)
            rows[m] = row
        out["states"][state] = rows
    return out


def jsonable(x: Any) -> Any:
    if isinstance(x, Interval):
        return {"value": x.value, "low": x.low, "high": x.high}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [jsonable(v) for v in x]
    return x


def markdown(summary: dict[str, Any], methods: list[str], baseline: str, header: list[str]) -> str:
    parts = [*header, ""]
    ks = summary["ks"]
    for state, rows in summary["states"].items():
        parts += [
            f"## {state}",
            "",
            "AUC, mean over seeds (k = support interactions used; 0 = no adaptation):",
            "",
        ]
        parts += ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for m in methods:
            parts.append(f"| {m} | " + " | ".join(f"{rows[m][k]['auc']:.4f}" for k in ks) + " |")
        for m in methods:
            if m == baseline:
                continue
            parts += ["", f"{m} minus {baseline}, paired 95% interval:", ""]
            parts += ["| k | difference |", "|---|---|"]
            parts += [f"| {k} | {rows[m][k]['vs_baseline'].fmt()} |" for k in ks]
            if "few_shot_vs_baseline" in rows[m]:
                parts.append(f"| mean of k in {list(FEW_SHOTS)} | {rows[m]['few_shot_vs_baseline'].fmt()} |")
        if "0" in ks:
            parts += ["", "adapted minus not adapted, paired 95% interval:", ""]
            parts += ["| method | " + " | ".join(f"k={k}" for k in ks if k != "0") + " |"]
            parts += ["|---|" + "---|" * (len(ks) - 1)]
            for m in methods:
                parts.append(
                    f"| {m} | " + " | ".join(rows[m][k]["vs_unadapted"].fmt() for k in ks if k != "0") + " |"
                )
        parts.append("")
    parts += ["![AUC and paired differences per state and k](compare.png)", ""]
    return "\n".join(parts)


def plot(summary: dict[str, Any], methods: list[str], baseline: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = list(summary["states"])
    ks = summary["ks"]
    fig, axes = plt.subplots(2, len(states), figsize=(4.2 * len(states), 7), squeeze=False)
    for j, state in enumerate(states):
        rows = summary["states"][state]
        ax = axes[0][j]
        for m in methods:
            ax.plot(range(len(ks)), [rows[m][k]["auc"] for k in ks], "o-", label=m)
        ax.set(title=state, xlabel="k", ylabel="AUC (mean over seeds)")
        ax.set_xticks(range(len(ks)), ks)
        ax.legend(fontsize=8)
        ax = axes[1][j]
        for m in methods:
            if m == baseline:
                continue
            iv = [rows[m][k]["vs_baseline"] for k in ks]
            ax.errorbar(
                range(len(ks)),
                [i.value for i in iv],
                yerr=[[i.value - i.low for i in iv], [i.high - i.value for i in iv]],
                fmt="o-",
                capsize=3,
                label=f"{m} - {baseline}",
            )
        ax.axhline(0, color="black", lw=0.8)
        ax.set(xlabel="k", ylabel="AUC difference (95% interval)")
        ax.set_xticks(range(len(ks)), ks)
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--method", type=parse_method, action="append", required=True, help="NAME=train.py overrides"
    )
    p.add_argument("--baseline", default=None, help="the method the others are compared with (default: last)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--adaptation", choices=("auto", "fixed"), default="auto")
    p.add_argument("--shots", type=parse_shot, nargs="+", default=[0, 1, 2, 3, 5, 10, None])
    p.add_argument("--grid-steps", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--grid-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    p.add_argument("--grid-groups", nargs="+", default=["bottom+top", "top"])
    p.add_argument(
        "--per-state", action="store_true", help="also choose each cold-start state's own schedule (auto)"
    )
    p.add_argument("--replicates", type=int, default=1000)
    p.add_argument("--train-args", default="", help="overrides added to every method's training run")
    p.add_argument("--reuse", action="store_true", help="keep trained runs (and saved predictions)")
    args = p.parse_args()
    methods = [name for name, _ in args.method]
    if len(set(methods)) != len(methods):
        raise SystemExit(f"method names must differ: {methods}")
    baseline = args.baseline or methods[-1]
    if baseline not in methods:
        raise SystemExit(f"--baseline {baseline!r} is none of {methods}")

    runs: dict[str, list[Predictions]] = {}
    for name, overrides in args.method:
        runs[name] = []
        for seed in args.seeds:
            run_dir = (args.out / "runs" / name / f"seed_{seed}").resolve()
            saved = run_dir / f"predictions_{args.split}_{adaptation_tag(args)}.npz"
            ckpt = best_checkpoint(run_dir) if args.reuse else None
            if ckpt is not None and saved.exists():
                runs[name].append(Predictions.load(str(saved)))
                continue
            if ckpt is None:
                ckpt = train(run_dir, overrides, seed, shlex.split(args.train_args))
            start = time.perf_counter()
            runs[name].append(evaluate(run_dir, ckpt, args))
            log.info("%s seed %d evaluated in %.0f s", name, seed, time.perf_counter() - start)

    aucs = bootstrap_aucs(runs, replicates=args.replicates)
    summary = summarize(aucs, methods, baseline)
    header = [
        f"# {' vs '.join(methods)} ({args.split} split)",
        "",
        "- methods: " + "; ".join(f"`{n}`: `{shlex.join(o)}`" for n, o in args.method),
        f"- seeds {args.seeds}; common overrides `{args.train_args}`; adaptation `{args.adaptation}`"
        + (
            " (a schedule per support size chosen on the validation split, same grid for every method"
            + ("; each cold-start state its own)" if args.per_state else ")")
            if args.adaptation == "auto"
            else ""
        ),
        f"- intervals: {args.replicates} paired bootstrap replicates resampling tasks (users) within each state; "
        "percentile 95%; every method, seed and k scored on the same replicates",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    report = markdown(summary, methods, baseline, header)
    (args.out / "report.md").write_text(report)
    plot(summary, methods, baseline, args.out / "compare.png")
    (args.out / "compare.json").write_text(json.dumps(jsonable(summary), indent=1) + "\n")
    print(report)
    print(json.dumps({"compare": jsonable(summary)}))


if __name__ == "__main__":
    main()
