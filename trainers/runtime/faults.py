"""Fault injection for tests and the fault benchmark, driven by environment variables.

GENTRAIN_FAULT_NONFINITE=START:COUNT poisons the loss of COUNT consecutive steps from step
START on (once per process), with a real NaN that goes through the real non-finite guard.
"""
from __future__ import annotations

import os


class NonFiniteFault:
    def __init__(self, spec: str | None = None):
        spec = spec if spec is not None else os.environ.get("GENTRAIN_FAULT_NONFINITE", "")
        self.start, self.remaining = (int(x) for x in spec.split(":")) if spec else (0, 0)

    def poison(self, batch: dict, step: int) -> dict:
        """Mark the batch of `step` (1-based) to produce a NaN loss, while the fault lasts."""
        if self.remaining > 0 and step >= self.start:
            self.remaining -= 1
            batch["poison"] = True
        return batch
