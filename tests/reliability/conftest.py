"""The reliability corpus imports its case modules (``bad_data``...) from this folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
