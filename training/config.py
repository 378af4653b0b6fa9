"""Pipeline config files: one YAML file, one section per stage (`world:`, `clip_pretrain:`, ...).

Command-line flags override the file; the file overrides the dataclass defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "synthetic.yaml"
KNOWN_SECTIONS = {"paths", "world", "dataset", "clip", "clip_pretrain", "clip_renorm", "proposals", "targets",
                  "detector", "export"}


def load_config(path: str | Path | None) -> dict:
    """Read a pipeline config file (None = the built-in synthetic-world config).

    Raises:
        FileNotFoundError / ValueError: missing file, invalid YAML, or unknown sections.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections")
    unknown = set(cfg) - KNOWN_SECTIONS
    if unknown:
        raise ValueError(f"config file {path}: unknown sections {sorted(unknown)}; "
                         f"known: {sorted(KNOWN_SECTIONS)}")
    return cfg


class SectionConfig:
    """Mixin of the stage config dataclasses: `from_dict` builds one from its YAML section,
    refusing unknown keys (a typo must not silently fall back to a default)."""

    SECTION: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown {cls.SECTION} config keys: {sorted(unknown)}")
        # YAML has no tuples: sequences arrive as lists.
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        try:
            return cls(**values)
        except TypeError as e:  # a value of the wrong type met a comparison in validation
            types = {k: f.type for k, f in cls.__dataclass_fields__.items() if k in values}
            raise ValueError(f"{cls.SECTION} config: a value has the wrong type ({e}); given "
                             f"{values}, expected types {types}") from e

    @classmethod
    def from_config(cls, cfg: dict, args=None, flags: tuple[str, ...] = ()):
        """The config file's section, with the given command-line flags (when set) on top."""
        section = dict(cfg.get(cls.SECTION) or {})
        for key in flags:
            value = getattr(args, key, None)
            if value is not None:
                section[key] = value
        return cls.from_dict(section)
