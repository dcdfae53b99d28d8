"""The run's counters: one owner for the step and the images seen."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Clock:
    """Completed optimizer steps and the images they consumed, over every rank.

    The loop owns it and advances it after each step; a task reads it during a step, when
    ``step`` is the 0-based index of the step being taken (= steps completed before it) and
    ``images_seen`` counts the images of the steps before it. ``images_per_step`` is this run's
    global batch; it may differ from the run a checkpoint came from (another world size).
    """

    step: int = 0
    images_seen: int = 0
    images_per_step: int = 0

    @property
    def step_number(self) -> int:
        """The 1-based number of the step being taken (what cadences such as `every k` count)."""
        return self.step + 1

    def on_every(self, every: int) -> bool:
        """True when the step being taken is an `every`-th one (counted 1-based); never for `every` <= 0."""
        return every > 0 and self.step_number % every == 0

    def tick(self) -> None:
        self.step += 1
        self.images_seen += self.images_per_step

    def state(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen}
