"""Integrity and safety: block checksums, the restricted metadata unpickler, path confinement, atomic commit."""

from __future__ import annotations
