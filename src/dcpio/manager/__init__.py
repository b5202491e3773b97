"""Checkpoints over a whole run: one directory per step, the newest good one found, old ones deleted safely.

:class:`CheckpointManager` sits on top of dcpio's writers and readers and ``dcp.save`` / ``dcp.async_save`` /
``dcp.load``. The guarantees hold by construction:

* only committed steps exist for it (``.metadata`` present and parsing), so ``latest()`` never names a save that
  is still running or was killed;
* retention (keep the last N, keep every Kth) counts committed steps only and always keeps the newest one, so a
  step is never deleted before a newer one is durable; deletion removes the commit first;
* steps that never committed are swept once untouched for a grace period, and never while a save or upload of
  this job is working on them;
* every decision (which steps exist, which to delete) is made on one rank and broadcast, so ranks that see a shared
  file system differently still act alike;
* with a fast local tier, saves commit locally and a background thread uploads each step to the durable tier with
  the same commit rules there (see :mod:`dcpio.manager.upload`).
"""

from __future__ import annotations

from dcpio.manager.core import CheckpointManager, StepInfo, list_steps, prune
from dcpio.names import step_name

__all__ = ["CheckpointManager", "StepInfo", "list_steps", "prune", "step_name"]
