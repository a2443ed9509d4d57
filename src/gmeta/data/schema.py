"""Schema of a task-grouped interaction dataset.

The schema names the columns a source must provide and, once the data is encoded, the vocabulary
size of every id field. It travels inside each shard set's ``manifest.json`` so that a reader can
check every record against what the writer declared.

Id convention for sparse and multi-hot fields (shared by every source, the shards and the model):
row 0 of every table is the out-of-vocabulary (OOV) row; known values are 1..vocab_size-1 (or
hashed buckets 1..vocab_size-1 when a field is hashed). Ids never seen in training are *not*
errors: they map to row 0 (or their bucket). Only an id >= vocab_size is corruption.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gmeta.errors import UserError

FieldKind = Literal["sparse", "multi_hot", "dense"]
FIELD_KINDS: tuple[str, ...] = ("sparse", "multi_hot", "dense")

#: Cold-start states, in the order used for integer state codes everywhere.
STATES: tuple[str, ...] = ("warm", "user_cold", "item_cold", "user_item_cold")

#: Padding value for multi-hot id lists (never a valid row).
MULTI_HOT_PAD = -1

OOV_ID = 0


class SchemaError(UserError, ValueError):
    """Raised when data does not match the schema it claims to follow (a user error: exit status 2)."""


@dataclass(frozen=True)
class FieldSpec:
    """One feature column.

    Attributes:
        name: column name in the raw data.
        kind: ``sparse`` (one id per sample), ``multi_hot`` (a list of ids, mean-pooled) or
            ``dense`` (one float).
        vocab_size: number of embedding rows including the OOV row 0 (sparse / multi-hot only;
            0 until the data is encoded).
        max_len: multi-hot only: the most ids one sample may hold (longer lists are an error).
        separator: multi-hot only: separator of the ids inside the raw string column.
        hash_buckets: if > 0, values are hashed into ``hash_buckets`` rows (1..hash_buckets)
            instead of a vocabulary built from the training data.
    """

    name: str
    kind: FieldKind
    vocab_size: int = 0
    max_len: int = 1
    separator: str = " "
    hash_buckets: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FIELD_KINDS:
            raise SchemaError(f"field {self.name!r}: kind must be one of {FIELD_KINDS}, got {self.kind!r}")
        if self.kind == "multi_hot" and self.max_len < 1:
            raise SchemaError(f"field {self.name!r}: multi_hot max_len must be >= 1")


@dataclass(frozen=True)
class Schema:
    """Columns of an interaction table and how they become model inputs.

    Attributes:
        task_key: column that groups interactions into tasks (a user by default).
        label: target column (raw value; binarised by the task builder's threshold).
        time: timestamp column used for time-ordered support/query splits (optional).
        fields: feature columns, in model order within each kind.
    """

    task_key: str
    label: str
    time: str | None = None
    fields: tuple[FieldSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"schema lists field(s) twice: {dupes}")
        if self.label in names:
            raise SchemaError(f"label column {self.label!r} must not also be a feature field")

    # -- views by kind (model order) -------------------------------------------------------
    def of_kind(self, kind: FieldKind) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.kind == kind)

    @property
    def sparse(self) -> tuple[FieldSpec, ...]:
        return self.of_kind("sparse")

    @property
    def multi_hot(self) -> tuple[FieldSpec, ...]:
        return self.of_kind("multi_hot")

    @property
    def dense(self) -> tuple[FieldSpec, ...]:
        return self.of_kind("dense")

    @property
    def id_fields(self) -> tuple[FieldSpec, ...]:
        """Sparse then multi-hot fields: the order of embedding tables in the model."""
        return self.sparse + self.multi_hot

    @property
    def max_multi_hot_len(self) -> int:
        return max((f.max_len for f in self.multi_hot), default=0)

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise SchemaError(f"schema has no field {name!r}")

    def required_columns(self) -> list[str]:
        cols = [self.task_key, self.label] + ([self.time] if self.time else [])
        return cols + [f.name for f in self.fields if f.name not in cols]

    def with_vocab_sizes(self, sizes: dict[str, int]) -> Schema:
        """A copy with ``vocab_size`` set for the named id fields."""
        fields = tuple(
            FieldSpec(**{**asdict(f), "vocab_size": sizes[f.name]}) if f.name in sizes else f
            for f in self.fields
        )
        return Schema(task_key=self.task_key, label=self.label, time=self.time, fields=fields)

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "task_key": self.task_key,
            "label": self.label,
            "time": self.time,
            "fields": [asdict(f) for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "schema") -> Schema:
        try:
            fields = tuple(FieldSpec(**f) for f in d.get("fields", []))
            return cls(task_key=d["task_key"], label=d["label"], time=d.get("time"), fields=fields)
        except KeyError as e:
            raise SchemaError(f"{where}: missing key {e.args[0]!r}") from None
        except TypeError as e:
            raise SchemaError(f"{where}: bad field definition: {e}") from None
