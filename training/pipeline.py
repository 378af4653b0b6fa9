"""The chain on one run folder, as a declared list of stages with their reuse rules.

    world -> CLIP pretraining -> re-normalisation -> proposals -> targets -> detector
          -> evaluation on synth_test -> gates -> export

`ovd pipeline` runs `STAGES` in order; the benchmarks reuse the first three through the same
`Pipeline` object. Reuse rules, all in this file:

- world, CLIP, re-normalised CLIP: reused when their output exists and was made from the same
  inputs (the world's config, the world's fingerprint, the parent CLIP's sha256 and the stage
  config); otherwise they run, resuming where they can.
- proposals, targets: sharded stages that resume their own folder and reuse a complete one
  made with the same identity (CLIP, data, config); a different identity is recomputed.
- detector: Detectron2 resumes from the folder's last checkpoint (a finished one is reused).
- evaluation, gates, export: recomputed every run (minutes at most), from the stages above.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ovd.models.clip.model import ClipCheckpointError, ClipModel, load_clip

from .clip_pretrain import PretrainConfig, pretrain_clip
from .clip_renorm import RenormConfig, renorm_clip
from .data.synthetic import WorldConfig, generate_world, load_world, register_world, world_datasets
from .layout import RunLayout, final_weights
from .shards import ProgressFactory

logger = logging.getLogger(__name__)

#: The split the shipped model's numbers are reported on (every choice in its recipe was
#: taken on val).
REPORT_SPLIT = "synth_test"


def _plain(obj) -> dict:
    """A dataclass as the JSON-round-tripped dict stored in manifests (tuples -> lists)."""
    return json.loads(json.dumps(asdict(obj)))


@dataclass
class Pipeline:
    """Every stage of one run, under one output root.

    Attributes:
        cfg: the pipeline config (training/config.py's load_config).
        layout: the run folder.
        world_cfg, pretrain_cfg, renorm_cfg: the first three stages' configs (default: the
            config's sections).
        workers: processes for world generation.
        progress: progress reporter factory (see ovd.training.shards.ProgressFactory).
        report: where the stages' result tables go (the CLI passes `print`; default: the log).
    """

    cfg: dict
    layout: RunLayout
    world_cfg: WorldConfig | None = None
    pretrain_cfg: PretrainConfig | None = None
    renorm_cfg: RenormConfig | None = None
    workers: int = 1
    progress: ProgressFactory | None = None
    report: Callable[[str], None] = logger.info
    results: dict = field(default_factory=dict)  # stage key -> what it returned, for later stages

    def __post_init__(self) -> None:
        self.world_cfg = self.world_cfg or WorldConfig.from_config(self.cfg)
        self.pretrain_cfg = self.pretrain_cfg or PretrainConfig.from_config(self.cfg)
        self.renorm_cfg = self.renorm_cfg or RenormConfig.from_config(self.cfg)

    @property
    def world_dir(self) -> Path:
        return self.layout.world

    @property
    def clip_dir(self) -> Path:
        return self.layout.clip_pretrained

    @property
    def renorm_dir(self) -> Path:
        return self.layout.clip_renorm

    # ------------------------------------------------------------------ stages 0-1

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

    # ------------------------------------------------------------------ stage runners
    # Each takes the pipeline and returns whether its output was reused (None: the stage
    # resumes or reuses on its own and says so in its log).

    def _run_world(self) -> bool:
        from .data.preview import write_preview

        self.results["world"], reused = self.world()
        logger.info("      preview: %s", write_preview(self.world_dir, self.world_dir / "preview.png"))
        return reused

    def _run_clip(self) -> bool:
        self.results["clip"], reused = self.clip(self.results["world"])
        self.report(zero_shot_table(self.results["clip"], self.world_dir, self.clip_dir))
        return reused

    def _run_renorm(self) -> bool:
        self.results["renorm"], reused = self.renorm(self.results["clip"])
        self.report(zero_shot_table(self.results["renorm"], self.world_dir, self.renorm_dir))
        return reused

    def _run_proposals(self) -> None:
        from .proposals import ProposalConfig, run_proposals

        json_file, image_root = self.train_split()
        run_proposals(self.results["renorm"], json_file, image_root, self.layout.proposals,
                      ProposalConfig.from_config(self.cfg), overwrite=True, progress=self.progress)

    def _run_targets(self) -> None:
        from .gates import format_gates
        from .targets import TargetsConfig, run_targets

        json_file, image_root = self.train_split()
        run_targets(self.results["renorm"], json_file, image_root, self.layout.proposals,
                    self.layout.targets(), TargetsConfig.from_config(self.cfg), overwrite=True,
                    progress=self.progress)
        # The detector gate waits for this run's detector (a previous run's may still be there).
        self.report("gates before training:\n" + format_gates(run_gates(self.cfg, self.layout, detector=False)))

    def _run_detector(self) -> bool:
        from .train_detector import run_training

        reused = final_weights(self.layout.detector).is_file()
        run_training(self.cfg, self.layout, clip=self.renorm_dir)
        return reused

    def _run_evaluation(self) -> bool:
        from .evaluate import evaluate_folder, format_metrics

        result, out = evaluate_folder(self.layout.detector, dataset=REPORT_SPLIT)
        self.report(format_metrics(result, f"generalized zero-shot detection, {REPORT_SPLIT}")
                    + f"\nmetrics: {out / 'metrics.json'}")
        return False

    def _run_gates(self) -> bool:
        from .gates import format_gates

        gates = run_gates(self.cfg, self.layout)
        self.layout.gates.write_text(json.dumps(gates, indent=2))
        self.report(f"gates (also in {self.layout.gates}):\n{format_gates(gates)}")
        return False

    def _run_export(self) -> bool:
        from ovd.models.exported import verify_export

        from .export import export_detector

        export_detector(self.layout.detector, self.layout.export, name="ovd-synthetic", version="0.1.0")
        verify_export(self.layout.export)
        return False

    def run(self) -> None:
        """Every stage of `STAGES`, in order, logging each one's status and the time so far."""
        t0 = time.time()
        for k, stage in enumerate(STAGES, 1):
            logger.info("[%d/%d] %s -> %s ...", k, len(STAGES), stage.title, stage.output(self.layout))
            reused = stage.run(self)
            status = {True: "reused", False: "done", None: "done (resumed or reused where complete)"}[reused]
            logger.info("[%d/%d] %s: %s  (%.1f min so far)", k, len(STAGES), stage.title, status,
                        (time.time() - t0) / 60)
        logger.info("pipeline finished in %.1f min; outputs under %s", (time.time() - t0) / 60, self.layout.root)


@dataclass(frozen=True)
class Stage:
    """One step of the chain: its name, where it writes, and how it runs (see `Pipeline`)."""

    key: str
    title: str
    output: Callable[[RunLayout], Path]
    run: Callable[[Pipeline], bool | None]


STAGES: tuple[Stage, ...] = (
    Stage("world", "synthetic world", lambda lay: lay.world, Pipeline._run_world),
    Stage("clip", "CLIP pretraining", lambda lay: lay.clip_pretrained, Pipeline._run_clip),
    Stage("renorm", "CLIP re-normalisation (LayerNorms only)", lambda lay: lay.clip_renorm, Pipeline._run_renorm),
    Stage("proposals", "CLIP proposals", lambda lay: lay.proposals, Pipeline._run_proposals),
    Stage("targets", "distillation targets", lambda lay: lay.targets(), Pipeline._run_targets),
    Stage("detector", "detector training", lambda lay: lay.detector, Pipeline._run_detector),
    Stage("evaluation", f"generalized zero-shot evaluation on {REPORT_SPLIT}",
          lambda lay: lay.detector, Pipeline._run_evaluation),
    Stage("gates", "stage gates", lambda lay: lay.gates, Pipeline._run_gates),
    Stage("export", "export", lambda lay: lay.export, Pipeline._run_export),
)


def run_gates(cfg: dict, layout: RunLayout, *, detector: bool | str | Path = True, heldout_json=None,
              heldout_images=None, eval_json=None, eval_images=None, parent_clip=None, clip=None,
              proposals=None, targets=None) -> dict:
    """Every stage gate of a run (training/gates.py); each input defaults to the run folder's.

    Args:
        detector: True for the run's detector, a weights path, or False to leave that gate out.
        heldout_json, heldout_images: ALL annotations of the training images (default: the
            world's train_all.json), read by the gates only.
        eval_json, eval_images: a split with all annotations for the renorm gate (default: val).
    """
    from .gates import HeldOut, stage_gates
    from .proposals import ProposalConfig

    det = layout.world / "detection"
    heldout_json = heldout_json or det / "annotations" / "train_all.json"
    eval_json = eval_json or det / "annotations" / "val.json"
    heldout = HeldOut.load(heldout_json, heldout_images or det / "train") if Path(heldout_json).is_file() else None
    eval_set = HeldOut.load(eval_json, eval_images or det / "val") if Path(eval_json).is_file() else None
    if detector is True:
        detector = final_weights(layout.detector)
    return stage_gates(
        heldout=heldout, eval_set=eval_set, parent_clip=parent_clip or layout.clip_pretrained,
        clip=clip or layout.clip_renorm, proposals=proposals or layout.proposals,
        targets=targets or layout.targets(), detector=detector or None,
        template=ProposalConfig.from_config(cfg).template)


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


def zero_shot_table(clip: ClipModel, world_dir: Path, clip_dir: Path) -> str:
    """A CLIP's zero-shot accuracy table as text (computed once per weights, see `zero_shot`)."""
    from .clip_eval import format_report

    report = zero_shot(clip, world_dir, clip_dir)
    return (format_report(report, f"CLIP zero-shot accuracy ({clip_dir}, template {report['template']!r})")
            + f"\naccuracy table: {clip_dir / 'zero_shot.json'}")
