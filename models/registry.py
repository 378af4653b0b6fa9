"""Detector exports known by name, so no command or API call depends on the working directory.

`ovd.Detector.load("default")`, `ovd serve` and `ovd demo` without `--model-dir` use the
shipped model of the repository checkout. Light on purpose (no torch): settings and the CLI
parser read it.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "artifacts" / "default"
#: The compressed student of the default (TID + CID + Light-ML; README, "Which model").
STUDENT_MODEL = REPO_ROOT / "artifacts" / "student"
REGISTERED: dict[str, Path] = {"default": DEFAULT_MODEL, "student": STUDENT_MODEL}


def registered_or_path(name_or_path: str | Path) -> Path:
    """The folder of a registered name ("default"), else the argument as a path (unchecked)."""
    return REGISTERED.get(str(name_or_path), Path(name_or_path))
