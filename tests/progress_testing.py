"""A progress factory for stage tests (training/progress.py's interface), shared by the CLIP
pretraining and re-normalisation tests."""

from __future__ import annotations


class Recorder:
    """A progress factory that records its calls and can interrupt after `stop_after` updates."""

    def __init__(self, stop_after: int | None = None):
        self.opened: list[tuple] = []
        self.updates: list[tuple] = []
        self.stop_after = stop_after

    def __call__(self, desc: str, total: int, initial: int):
        self.opened.append((desc, total, initial))

        def update(n: int, postfix: dict) -> None:
            self.updates.append((n, postfix))
            if self.stop_after is not None and len(self.updates) >= self.stop_after:
                raise KeyboardInterrupt

        return update
