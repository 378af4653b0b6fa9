"""The run folder: where every stage writes under one output root, spelled in this one place.

    root/world/                 the synthetic world (its own layout: training/data/synthetic.py)
    root/dataset/               or your dataset's tagged annotations (training/data/dataset.py)
    root/clip/pretrained/       stage 0: CLIP pretrained on the world's captions
    root/clip/renorm/           stage 1: re-normalised CLIP
    root/proposals/             stage 2: CLIP proposals (shards)
    root/targets/               stage 3: distillation targets (shards; targets_gt/ without proposals)
    root/detector/              stage 4: Detectron2 training output (a *model folder*)
    root/student/               stage 4b: a compressed student (a model folder too)
    root/export/                stage 6: the deployable export
    root/gates.json             every stage's gate

and inside a model folder: `model_final.pth` and one `eval_<dataset>/metrics.json` per
evaluated dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("runs/synthetic")


@dataclass(frozen=True)
class RunLayout:
    """The folders of one run under `root`."""

    root: Path

    @classmethod
    def of(cls, cfg: dict, args=None) -> RunLayout:
        """The --root flag (when given), else the config's `paths.root`, else runs/synthetic."""
        root = getattr(args, "root", None) or (cfg.get("paths") or {}).get("root") or DEFAULT_ROOT
        return cls(Path(root))

    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def clip_pretrained(self) -> Path:
        return self.root / "clip" / "pretrained"

    @property
    def clip_renorm(self) -> Path:
        return self.root / "clip" / "renorm"

    @property
    def text_clip(self) -> Path:
        """The CLIP a detector of this run classifies with: the re-normalised one when it
        exists, else the pretrained one."""
        return self.clip_renorm if self.clip_renorm.is_dir() else self.clip_pretrained

    @property
    def proposals(self) -> Path:
        return self.root / "proposals"

    def targets(self, gt_only: bool = False) -> Path:
        return self.root / ("targets_gt" if gt_only else "targets")

    @property
    def detector(self) -> Path:
        return self.root / "detector"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def gates(self) -> Path:
        return self.root / "gates.json"


def final_weights(model_dir: str | Path) -> Path:
    """The trained weights of a model folder (Detectron2's last checkpoint)."""
    return Path(model_dir) / "model_final.pth"


def eval_dir(model_dir: str | Path, dataset: str) -> Path:
    """Where `ovd eval` writes a model folder's results on one dataset (metrics.json inside)."""
    return Path(model_dir) / f"eval_{dataset}"


def eval_metrics(model_dir: str | Path) -> list[Path]:
    """The metrics.json of every dataset a model folder was evaluated on, by dataset name."""
    return sorted(Path(model_dir).glob("eval_*/metrics.json"))
