"""A checkpoint file that runs code when it is unpickled: what weights_only loading must refuse."""

from __future__ import annotations

from pathlib import Path


def _run_on_load(path: str) -> dict:
    Path(path).write_text("code ran")
    return {}


class RunsCodeOnLoad:
    """Unpickling this calls _run_on_load: what a hostile checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_run_on_load, (str(self.marker),))
