"""alignforge: from raw documents to a small, fast model aligned to one task."""

__version__ = "0.1.0"
