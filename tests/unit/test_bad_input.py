"""Bad input fails loudly, naming the file / shard, the task and the field."""

from __future__ import annotations

import copy
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gmeta.data.schema import SchemaError
from gmeta.data.shards import (
    MANIFEST,
    ShardError,
    encode_record,
    iter_shard,
    read_manifest,
    verify_shards,
    write_tar,
)
from gmeta.data.sources.tabular import TabularSource
from gmeta.data.tasks import TaskConfig, build_tasks

SCHEMA_YAML = "task_key: uid\nlabel: y\ntime: ts\nsparse: [uid, item]\ndense: [price]\n"


def _tabular(tmp_path: Path, df: pd.DataFrame, schema: str = SCHEMA_YAML) -> TabularSource:
    df.to_csv(tmp_path / "inter.csv", index=False)
    (tmp_path / "schema.yaml").write_text(schema)
    return TabularSource(tmp_path / "inter.csv", tmp_path / "schema.yaml")


def _good() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "uid": ["a", "a", "b"],
            "y": [1, 0, 1],
            "ts": [1, 2, 3],
            "item": ["i", "j", "i"],
            "price": [1.0, 2.0, 3.0],
        }
    )


def test_missing_column(tmp_path):
    with pytest.raises(
        SchemaError, match=r"inter.csv: missing column\(s\) \['price'\] required by schema .*schema.yaml"
    ):
        _tabular(tmp_path, _good().drop(columns="price")).load()


def test_extra_column_unless_ignored(tmp_path):
    df = _good().assign(comment="x")
    with pytest.raises(
        SchemaError, match=r"inter.csv: column\(s\) \['comment'\] are not in schema.*ignore_columns"
    ):
        _tabular(tmp_path, df).load()
    out, _ = _tabular(tmp_path, df, SCHEMA_YAML + "ignore_columns: [comment]\n").load()
    assert "comment" not in out.columns and len(out) == 3


def test_dense_not_numeric_names_file_column_and_row(tmp_path):
    df = _good().astype({"price": object})
    df.loc[2, "price"] = "cheap"
    with pytest.raises(
        SchemaError,
        match=r"inter.csv: dense column 'price' must be numeric; row 2 \(task uid='b'\) has 'cheap'",
    ):
        _tabular(tmp_path, df).load()


def test_nan_label_names_file_row_and_task(tmp_path):
    df = _good()
    df.loc[1, "y"] = np.nan
    with pytest.raises(SchemaError, match=r"inter.csv: label 'y' is NaN at row 1 \(task uid='a'\)"):
        _tabular(tmp_path, df).load()


def test_nan_id_names_file_column_row_and_task(tmp_path):
    df = _good()
    df.loc[2, "item"] = None
    with pytest.raises(
        SchemaError,
        match=r"inter.csv: id column 'item' has a missing value \(NaN\) at row 2 \(task uid='b'\)",
    ):
        _tabular(tmp_path, df).load()


def test_build_tasks_rejects_nan_label_and_long_multi_hot(ml_table):
    df, schema = ml_table
    bad = df.copy()
    bad.loc[5, "rating"] = np.nan
    with pytest.raises(
        SchemaError, match=rf"label 'rating': NaN .* at row 5 \(task user_id='{df.user_id[5]}'\)"
    ):
        build_tasks(bad, schema, TaskConfig())
    bad = df.copy()
    bad.loc[7, "genre"] = "a b c d e f g"
    with pytest.raises(
        SchemaError, match=r"multi_hot field 'genre': row 7 .* has 7 ids, more than max_len=6"
    ):
        build_tasks(bad, schema, TaskConfig())


# -- shards ------------------------------------------------------------------------------------
def _one_shard(tmp_path: Path, record, name: str = "shard-000003.tar") -> Path:
    path = tmp_path / name
    write_tar(path, [record])
    return path


def test_id_outside_vocabulary(tmp_path, small_splits):
    rec = copy.deepcopy(small_splits.test[0])
    size = small_splits.schema.field("item_id").vocab_size
    rec.arrays["query.sparse"][2, 1] = size
    path = _one_shard(tmp_path, rec)
    msg = (
        rf"task {rec.task_id} in shard-000003.tar: query field 'item_id' has id {size} outside \[0, {size}\)"
    )
    with pytest.raises(ShardError, match=msg):
        list(iter_shard(path, small_splits.schema))
    rec = copy.deepcopy(small_splits.test[0])
    rec.arrays["support.multi_hot"][0, 0, 5] = -2
    with pytest.raises(ShardError, match=r"support field 'genre' has id -2 outside \[-1, "):
        list(iter_shard(_one_shard(tmp_path, rec), small_splits.schema))


def test_bad_label_dtype_and_shape(tmp_path, small_splits):
    rec = copy.deepcopy(small_splits.train[0])
    rec.arrays["support.label"][0] = np.nan
    with pytest.raises(ShardError, match=rf"task {rec.task_id} in shard-000003.tar: support.label holds nan"):
        list(iter_shard(_one_shard(tmp_path, rec), small_splits.schema))
    rec = copy.deepcopy(small_splits.train[0])
    rec.arrays["query.dense"] = rec.arrays["query.dense"].astype(np.float64)
    with pytest.raises(ShardError, match=r"query.dense has dtype float64, expected float32"):
        list(iter_shard(_one_shard(tmp_path, rec), small_splits.schema))
    rec = copy.deepcopy(small_splits.train[0])
    rec.arrays["query.sparse"] = rec.arrays["query.sparse"][:, :3]
    with pytest.raises(ShardError, match=r"query.sparse has shape \(4, 3\), expected \(4, 7\)"):
        list(iter_shard(_one_shard(tmp_path, rec), small_splits.schema))


@pytest.mark.parametrize("which", ["support", "query"])
def test_task_with_empty_set(tmp_path, small_splits, which):
    rec = copy.deepcopy(small_splits.val[0])
    for name, a in list(rec.arrays.items()):
        if name.startswith(which):
            rec.arrays[name] = a[:0]
    with pytest.raises(ShardError, match=rf"task {rec.task_id} in shard-000003.tar has no {which} samples"):
        list(iter_shard(_one_shard(tmp_path, rec), small_splits.schema))


def _copy_shards(shard_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(shard_dir, out)
    return out


def test_truncated_shard_is_an_error_not_a_skip(tmp_path, shard_dir):
    m = read_manifest(_copy_shards(shard_dir, tmp_path))
    path, info = m.shard_paths("train")[1], m.shards("train")[1]
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        boundary = [t.offset for t in tf.getmembers()][3]  # the 4th task (one member per task)
    for cut, pattern in [
        (len(data) // 2, "corrupt or truncated tar"),
        (boundary, "yielded 3 tasks, manifest says 20"),
    ]:
        path.write_bytes(data[:cut])
        with pytest.raises(ShardError, match=rf"shard .*shard-000001.tar: .*{pattern}"):
            list(iter_shard(path, m.schema, expected_tasks=info["tasks"]))
        with pytest.raises(ShardError, match=r"shard-000001.tar: \d+ bytes, manifest says"):
            verify_shards(m)


def test_corrupt_shard(tmp_path, shard_dir):
    m = read_manifest(_copy_shards(shard_dir, tmp_path))
    path = m.shard_paths("val")[0]
    data = bytearray(path.read_bytes())
    data[0:512] = b"\x07" * 512  # destroy the first header
    path.write_bytes(bytes(data))
    with pytest.raises(
        ShardError, match=r"shard .*val/shard-000000.tar: corrupt or truncated tar after 0 tasks"
    ):
        list(iter_shard(path, m.schema))
    with pytest.raises(ShardError, match=r"val/shard-000000.tar: sha256 mismatch"):
        verify_shards(m)
    with pytest.raises(ShardError, match=r"val/shard-000000.tar: corrupt or truncated tar"):
        verify_shards(m, check_checksums=False)


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / MANIFEST).read_text())
    edit(data)
    (root / MANIFEST).write_text(json.dumps(data))


def test_manifest_mismatches(tmp_path, shard_dir):
    root = _copy_shards(shard_dir, tmp_path)
    _edit_manifest(root, lambda d: d["splits"]["test"]["shards"][1].update(sha256="0" * 64))
    with pytest.raises(ShardError, match=r"test/shard-000001.tar: sha256 mismatch"):
        verify_shards(read_manifest(root))

    root = _copy_shards(shard_dir, tmp_path / "b")

    def more_tasks(d):
        d["splits"]["train"]["shards"][2]["tasks"] += 1
        d["splits"]["train"]["tasks"] += 1

    _edit_manifest(root, more_tasks)
    with pytest.raises(ShardError, match=r"train/shard-000002.tar: holds 20 tasks, manifest says 21"):
        verify_shards(read_manifest(root))

    root = _copy_shards(shard_dir, tmp_path / "c")
    _edit_manifest(root, lambda d: d["splits"]["train"].update(tasks=1))
    with pytest.raises(ShardError, match=r"split train lists 1 tasks but its shards add up to 82"):
        verify_shards(read_manifest(root))

    root = _copy_shards(shard_dir, tmp_path / "d")
    (root / "val" / "shard-000002.tar").unlink()
    with pytest.raises(
        ShardError, match=r"shard .*val/shard-000002.tar listed in .*manifest.json is missing"
    ):
        verify_shards(read_manifest(root))


def test_manifest_wrong_format(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other", "format_version": 1}))
    with pytest.raises(
        ShardError, match=r"manifest.json: format 'other' v1, expected 'gmeta-task-shards' v2"
    ):
        read_manifest(tmp_path)


# -- format-2 records and tar structure ----------------------------------------------------------
def _raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_format1_member_is_rejected_with_rebuild_hint(tmp_path, small_splits):
    path = _raw_tar(tmp_path / "old.tar", [("00000000_u1.meta.json", b"{}")])
    with pytest.raises(
        ShardError,
        match=r"old.tar: corrupt .* after 0 tasks \(member '00000000_u1.meta.json' is not .*rebuilt",
    ):
        list(iter_shard(path, small_splits.schema))


def test_malformed_records(tmp_path, small_splits):
    rec = small_splits.train[0]
    blob = encode_record(rec)
    schema = small_splits.schema
    cases = [
        (b"XXXX" + blob[4:], r"record '00000000_a' in bad.tar: not a format-v2 task record"),
        (
            blob + bytes(8),
            rf"task {rec.task_id} in bad.tar: record is {len(blob) + 8} bytes, its header describes",
        ),
        (blob[:100], r"record '00000000_a' in bad.tar: 100 bytes, too short"),
    ]
    for data, pattern in cases:
        path = _raw_tar(tmp_path / "bad.tar", [("00000000_a.task", data)])
        with pytest.raises(ShardError, match=pattern):
            list(iter_shard(path, schema))
    bad_state = copy.deepcopy(rec)
    bad_state.state = "lukewarm"
    with pytest.raises(
        ShardError, match=rf"task {rec.task_id} in shard-000003.tar: state 'lukewarm' is not one of"
    ):
        list(iter_shard(_one_shard(tmp_path, bad_state), schema))
    dup = _raw_tar(tmp_path / "dup.tar", [("00000000_a.task", blob), ("00000000_a.task", blob)])
    with pytest.raises(ShardError, match=r"dup.tar: record key '00000000_a' appears more than once"):
        list(iter_shard(dup, schema))


def test_errors_name_the_first_bad_task_in_stream_order(tmp_path, small_splits):
    good, bad_values, bad_shape = (copy.deepcopy(r) for r in small_splits.train[:3])
    bad_values.arrays["support.dense"][0, 0] = np.inf
    bad_shape.arrays["query.sparse"] = bad_shape.arrays["query.sparse"][:, :2]
    path = tmp_path / "shard-000009.tar"
    write_tar(path, [good, bad_values, bad_shape])
    with pytest.raises(ShardError, match=rf"task {bad_values.task_id} in shard-000009.tar: support.dense"):
        list(iter_shard(path, small_splits.schema))
    write_tar(path, [good, bad_shape, bad_values])
    with pytest.raises(
        ShardError, match=rf"task {bad_shape.task_id} in shard-000009.tar: query.sparse has shape"
    ):
        list(iter_shard(path, small_splits.schema))


def test_tar_header_checksum_and_missing_end_block(tmp_path, shard_dir):
    m = read_manifest(_copy_shards(shard_dir, tmp_path))
    path = m.shard_paths("test")[0]
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        offsets = [t.offset for t in tf.getmembers()]
        last = tf.getmembers()[-1]
    hacked = bytearray(data)
    hacked[offsets[2] + 110] ^= 0x01  # a byte in the mode field of the 3rd header: checksum breaks
    path.write_bytes(bytes(hacked))
    with pytest.raises(ShardError, match=r"after 2 tasks \(header checksum mismatch at byte"):
        list(iter_shard(path, m.schema))
    end = last.offset_data + ((last.size + 511) // 512) * 512
    path.write_bytes(data[:end])  # every member complete, end-of-archive blocks cut off
    with pytest.raises(ShardError, match=r"after 20 tasks \(no end-of-archive block\)"):
        list(iter_shard(path, m.schema))
