"""gmeta: fast optimization-based meta learning for recommendation models (meta-DLRM)."""

__version__ = "0.1.0"
