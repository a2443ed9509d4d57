"""docs/reliability.md lists every case of the corpus, as ``tests/reliability/table.py`` prints it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_docs_table_is_the_corpus() -> None:
    table = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "reliability" / "table.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert table.count("\n") >= 62  # header + 60 cases or more
    assert table in (ROOT / "docs" / "reliability.md").read_text()
