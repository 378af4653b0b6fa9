"""The shared front of the chain with reuse: world -> pretrained CLIP -> re-normalised CLIP.

`ovd demo` and the benchmarks both start here. A stage is reused when its output exists and
was made from the same inputs (the world's config and fingerprint, the parent CLIP's sha256 and
the stage config); otherwise it runs (and resumes where it can).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ovd.models.clip.model import ClipCheckpointError, ClipModel, load_clip

from .clip_pretrain import PretrainConfig, pretrain_clip
from .clip_renorm import RenormConfig, renorm_clip
from .data.synthetic import WorldConfig, generate_world, load_world, register_world, world_datasets
from .layout import RunLayout
from .shards import ProgressFactory

logger = logging.getLogger(__name__)


def _plain(obj) -> dict:
    """A dataclass as the JSON-round-tripped dict stored in manifests (tuples -> lists)."""
    return json.loads(json.dumps(asdict(obj)))


@dataclass
class Front:
    """The first three stages under one output root.

    Attributes:
        layout: the run folder (world/, clip/pretrained/, clip/renorm/ below its root).
        world_cfg, pretrain_cfg, renorm_cfg: the stage configs.
        workers: processes for world generation.
        progress: progress reporter factory (see ovd.training.shards.ProgressFactory).
    """

    layout: RunLayout
    world_cfg: WorldConfig
    pretrain_cfg: PretrainConfig
    renorm_cfg: RenormConfig
    workers: int = 1
    progress: ProgressFactory | None = None

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def world_dir(self) -> Path:
        return self.layout.world

    @property
    def clip_dir(self) -> Path:
        return self.layout.clip_pretrained

    @property
    def renorm_dir(self) -> Path:
        return self.layout.clip_renorm

    def world(self) -> tuple[dict, bool]:
        """(world.json contents, reused?); registers the world's Detectron2 datasets."""
        reused = True
        try:
            world = load_world(self.world_dir)
            if world["config"] != _plain(self.world_cfg):
                raise ValueError("config changed")
        except (FileNotFoundError, ValueError):
            reused = False
            generate_world(self.world_dir, self.world_cfg, workers=self.workers, progress=self.progress)
            world = load_world(self.world_dir)
        register_world(self.world_dir, overwrite=True)
        return world, reused

    def train_split(self) -> tuple[Path, Path]:
        """(json file, image root) of the base-box training split."""
        return world_datasets(self.world_dir)["synth_train"]

    def clip(self, world: dict) -> tuple[ClipModel, bool]:
        """(CLIP pretrained on this world's captions, reused?)."""
        try:
            clip = load_clip(str(self.clip_dir))
            if clip.manifest["training"]["data"]["fingerprint"] != world["fingerprint"]:
                raise ClipCheckpointError("trained on another world")
            return clip, True
        except (ClipCheckpointError, KeyError):
            return pretrain_clip(self.world_dir, self.clip_dir, self.pretrain_cfg,
                                 progress=self.progress), False

    def renorm(self, clip: ClipModel) -> tuple[ClipModel, bool]:
        """(CLIP with LayerNorms re-fitted on base GT crops, reused?)."""
        try:
            renormed = load_clip(str(self.renorm_dir))
            if renormed.manifest.get("parent", {}).get("sha256") != clip.manifest["weights"]["sha256"] \
                    or renormed.manifest["training"]["config"] != _plain(self.renorm_cfg):
                raise ClipCheckpointError("made from another CLIP or config")
            return renormed, True
        except (ClipCheckpointError, KeyError):
            json_file, image_root = self.train_split()
            return renorm_clip(self.clip_dir, json_file, image_root, self.renorm_dir,
                               self.renorm_cfg, progress=self.progress), False


def zero_shot(clip: ClipModel, world_dir: Path, clip_dir: Path, *, reuse: bool = True) -> dict:
    """The zero-shot accuracy report of a CLIP checkpoint folder, cached as zero_shot.json
    next to the weights (reused only for the same weights sha256)."""
    from .clip_eval import zero_shot_report

    out = clip_dir / "zero_shot.json"
    sha = (clip.manifest or {}).get("weights", {}).get("sha256")
    if reuse and out.is_file():
        report = json.loads(out.read_text())
        if sha and report.get("clip_sha256") == sha:
            return report
    report = {**zero_shot_report(clip, world_dir), "clip_sha256": sha}
    out.write_text(json.dumps(report, indent=2))
    return report
