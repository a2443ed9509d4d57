"""Print the bad-input corpus as the Markdown tables of ``docs/reliability.md``:

python tests/reliability/table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bad_config import CONFIG_CASES  # noqa: E402
from bad_data import DATA_CASES  # noqa: E402
from bad_shards import SHARD_CASES  # noqa: E402
from test_bad_shards import SERVING_CASES  # noqa: E402


def _message(pattern: str) -> str:
    """A regex as readable text for the table."""
    text = pattern.replace("\\(", "(").replace("\\)", ")").replace("\\[", "[").replace("\\]", "]")
    text = text.replace("\\?", "?").replace("\\d+", "N").replace(".*", "…").replace("|", "/")
    return "`" + text.replace("`", "'") + "`"


def main() -> None:
    print("| # | case | bad input | outcome (message; exit status 2) |\n|---|---|---|---|")
    k = 0
    for c in DATA_CASES:
        k += 1
        engines = " (both engines)" if len(c.engines) == 2 else ""
        print(f"| {k} | data: `{c.id}` | {c.what}{engines} | {_message(c.message)} |")
    for c in CONFIG_CASES:
        k += 1
        print(f"| {k} | config: `{c.id}` | {c.what}: `{' '.join(c.overrides)}` | {_message(c.message)} |")
    for c in SHARD_CASES:
        k += 1
        print(f"| {k} | shards: `{c.id}` | {c.what} | {_message(c.message)} |")
    for name, _, message in SERVING_CASES:
        k += 1
        print(f"| {k} | serving: `{name}` | `gmeta adapt` input file {name} | {_message(message)} |")


if __name__ == "__main__":
    main()
