"""A user's own CSV + schema file trains end to end through train.py (data=tabular)."""

from __future__ import annotations

import json
from pathlib import Path

from entry_points import run_entry_point

from gmeta.data.schema import STATES
from gmeta.data.sources.synthetic import SyntheticSource

SCHEMA_YAML = """\
task_key: user_id
label: rating
time: timestamp
sparse: [user_id, item_id, gender, age, occupation, zip3, release_year]
multi_hot: [{name: genre, max_len: 6, separator: " "}]
dense: [year_norm]
"""


def test_train_on_own_csv(tmp_path: Path) -> None:
    df, _ = SyntheticSource(num_users=150, num_items=200, seed=3).load()
    csv = tmp_path / "clicks.csv"
    df.to_csv(csv, index=False)
    schema = tmp_path / "schema.yaml"
    schema.write_text(SCHEMA_YAML)
    run_dir, shards = tmp_path / "run", tmp_path / "shards"
    run_entry_point(
        "train.py",
        "data=tabular",
        f"data.source.path={csv}",
        f"data.source.schema_path={schema}",
        f"data.data_dir={shards}",
        "data.task_config.label_threshold=4.0",  # 1..5 ratings: the default 'auto' is for 0/1 labels
        "debug=fdr",
        f"hydra.run.dir={run_dir}",
        tmp=tmp_path,
    )

    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["schema"]["fields"][0]["name"] == "user_id"
    # every interaction of the CSV is accounted for: in a task or filtered with a reason
    in_tasks = sum(c["interactions"] for split in ("train",) for c in manifest["counts"][split].values())
    filtered = sum(f["interactions"] for f in manifest["filtered"].values())
    held_out = sum(manifest["counts"][s][st]["query"] for s in ("val", "test") for st in ("warm",))
    cold = sum(manifest["counts"][s][st]["interactions"] for s in ("val", "test") for st in STATES[1:])
    assert in_tasks + filtered + held_out + cold == len(df)
    records = json.loads((run_dir / "cold_start_metrics.json").read_text())
    assert {r["state"] for r in records} <= set(STATES) and records
