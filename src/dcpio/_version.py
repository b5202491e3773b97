"""The one place dcpio's version is written (``pyproject.toml`` reads it from here when building)."""

from __future__ import annotations

__version__ = "0.1.0"
