"""The chain on one run folder, as a declared list of stages with their reuse rules.

    dataset (yours, or the synthetic world) -> CLIP -> re-normalisation -> proposals -> targets
          -> detector -> evaluation (test split, else val) -> gates -> export

`ovd pipeline` runs `STAGES` in order; the benchmarks reuse the first three through the same
`Pipeline` object. Reuse rules, all in this file:

- dataset: the config's `dataset:` section is checked, tagged and copied under `<root>/dataset/`
  (training/data/dataset.py), reused while its files and section are unchanged; without one,
  the synthetic world is generated, reused while its config is unchanged.
- CLIP: the `clip:` section's model (an open_clip name with pretrained weights, or a checkpoint
  folder) is written as the run's parent CLIP, reused while the section is unchanged; without
  one, a CLIP is pretrained on the world's captions, reused while the world is the same.
- re-normalised CLIP: reused when made from the same parent weights and stage config.
- snapshots: a run folder without its own CLIP stages starts from the committed copies in
  `artifacts/synthetic_clip/` when they were made from the same world and stage configs.
  Training a CLIP on a CPU is not bit-reproducible across CPU types (the same seed gave another
  CLIP on an AMD EPYC than on an Intel Xeon), and the benchmarks' cells name their CLIP by
  sha256, so without the snapshot every new machine would make every finished cell stale.
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
from ovd.models.manifest import sha256_file, strict_json

from .clip_pretrain import PretrainConfig, pretrain_clip
from .clip_renorm import RenormConfig, renorm_clip, weights_sha256
from .config import SectionConfig
from .data.dataset import Dataset, Split, dataset_of, world_dataset
from .data.synthetic import WorldConfig, generate_world, load_world, register_world
from .layout import RunLayout, final_weights
from .shards import ProgressFactory

logger = logging.getLogger(__name__)

#: Committed CLIP stages of the built-in world (see the module docstring, "snapshots").
CLIP_SNAPSHOT = Path(__file__).resolve().parents[1] / "artifacts" / "synthetic_clip"


def restore_snapshot(source: Path, dest: Path, matches: Callable[[dict], bool]) -> bool:
    """Copy a committed stage folder to `dest` when `dest` does not exist and the folder's
    manifest satisfies `matches`; returns whether it was copied."""
    import shutil

    manifest = source / "manifest.json"
    if dest.exists() or not manifest.is_file():
        return False
    try:
        if not matches(json.loads(manifest.read_text())):
            return False
    except (KeyError, TypeError, ValueError):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, dest)
    logger.info("%s: restored the committed snapshot %s (made from the same inputs)", dest, source)
    return True


def _plain(obj) -> dict:
    """A dataclass as the JSON-round-tripped dict stored in manifests (tuples -> lists)."""
    return json.loads(json.dumps(asdict(obj)))


@dataclass(frozen=True)
class ClipSource(SectionConfig):
    """The `clip:` section: the CLIP a run starts from instead of pretraining one.

    Attributes:
        model: an open_clip model name (e.g. "ViT-B-32") or a project CLIP checkpoint folder.
        pretrained: for a name, an open_clip pretrained tag or a local weights file (None:
            random weights, seeded by `seed`: only for tests and smoke runs).
        seed: torch seed of a random initialisation.
    """

    SECTION = "clip"
    model: str = ""
    pretrained: str | None = None
    seed: int = 0


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

    @property
    def custom(self) -> bool:
        """The run trains on the config's `dataset:` section (not the synthetic world)."""
        return bool(self.cfg.get("dataset"))

    def dataset(self) -> tuple[Dataset, bool | None]:
        """(the run's dataset, reused?), registered in Detectron2's catalogs."""
        if self.custom:
            data, reused = dataset_of(self.cfg, self.layout), None
        else:
            self.results["world"], reused = self.world()
            data = world_dataset(self.world_dir)
        data.register()
        self.results["dataset"] = data
        return data, reused

    @property
    def data(self) -> Dataset:
        """The run's dataset, read once per pipeline (a `dataset:` section hashes its jsons)."""
        if "dataset" not in self.results:
            self.results["dataset"] = dataset_of(self.cfg, self.layout)
        return self.results["dataset"]

    def train_split(self) -> tuple[Path, Path]:
        """(json file, image root) of the base-box training split."""
        return self.data.train.json_file, self.data.train.image_root

    def clip(self, world: dict | None = None) -> tuple[ClipModel, bool]:
        """(the run's parent CLIP, reused?): the `clip:` section's model, else a CLIP
        pretrained on the world's captions."""
        source = ClipSource.from_config(self.cfg)
        if source.model:
            return self._fetch_clip(source)
        if self.custom:
            raise ValueError("a dataset: run needs a CLIP to start from: set clip.model to an "
                             "open_clip name with clip.pretrained weights (e.g. ViT-B-32 and "
                             "laion2b_s34b_b79k, or a local weights file), or to a CLIP checkpoint folder")
        world = world or load_world(self.world_dir)
        restore_snapshot(CLIP_SNAPSHOT / "pretrained", self.clip_dir, lambda m: (
            m["training"]["data"]["fingerprint"] == world["fingerprint"]
            and m["training"]["config"] == _plain(self.pretrain_cfg)))
        try:
            clip = load_clip(str(self.clip_dir))
            if clip.manifest["training"]["data"]["fingerprint"] != world["fingerprint"]:
                raise ClipCheckpointError("trained on another world")
            return clip, True
        except (ClipCheckpointError, KeyError):
            return pretrain_clip(self.world_dir, self.clip_dir, self.pretrain_cfg,
                                 progress=self.progress), False

    def _fetch_clip(self, source: ClipSource) -> tuple[ClipModel, bool]:
        """The configured CLIP written as the run's parent checkpoint (stable weights for
        every later stage, even from a random initialisation)."""
        import torch

        from ovd.models.clip.model import architecture_config, save_clip

        wanted = _plain(source)
        try:
            clip = load_clip(str(self.clip_dir))
            if clip.manifest.get("source") != wanted:
                raise ClipCheckpointError("another clip: section")
            return clip, True
        except (ClipCheckpointError, KeyError):
            pass
        torch.manual_seed(source.seed)
        clip = load_clip(source.model, source.pretrained)
        arch = (clip.manifest or {}).get("architecture") or architecture_config(source.model)
        save_clip(clip, self.clip_dir, model_cfg=arch, record={"source": wanted})
        logger.info("CLIP %s%s written to %s", source.model,
                    f" ({source.pretrained})" if source.pretrained else " (random weights)", self.clip_dir)
        return load_clip(str(self.clip_dir)), False

    def renorm(self, clip: ClipModel) -> tuple[ClipModel, bool]:
        """(CLIP with LayerNorms re-fitted on base GT crops, reused?)."""
        json_file, image_root = self.train_split()
        restore_snapshot(CLIP_SNAPSHOT / "renorm", self.renorm_dir, lambda m: (
            m["parent"]["sha256"] == weights_sha256(clip) and m["training"]["config"] == _plain(self.renorm_cfg)))
        try:
            renormed = load_clip(str(self.renorm_dir))
            if renormed.manifest.get("parent", {}).get("sha256") != weights_sha256(clip) \
                    or renormed.manifest["training"]["config"] != _plain(self.renorm_cfg) \
                    or renormed.manifest["training"]["data"]["json_sha256"] != sha256_file(json_file):
                raise ClipCheckpointError("made from another CLIP, config or training json")
            return renormed, True
        except (ClipCheckpointError, KeyError):
            from .shards import stage_device

            return renorm_clip(self.clip_dir, json_file, image_root, self.renorm_dir,
                               self.renorm_cfg, progress=self.progress, device=stage_device()), False

    # ------------------------------------------------------------------ stage runners
    # Each takes the pipeline and returns whether its output was reused (None: the stage
    # resumes or reuses on its own and says so in its log).

    def _run_dataset(self) -> bool | None:
        data, reused = self.dataset()
        if not self.custom:
            from .data.preview import write_preview

            logger.info("      preview: %s", write_preview(self.world_dir, self.world_dir / "preview.png"))
        logger.info("      splits: %s", ", ".join(f"{n} ({s.json_file})" for n, s in data.splits().items()))
        return reused

    def _run_clip(self) -> bool:
        self.results["clip"], reused = self.clip(self.results.get("world"))
        self.report(self.zero_shot_table(self.results["clip"], self.clip_dir))
        return reused

    def _run_renorm(self) -> bool:
        self.results["renorm"], reused = self.renorm(self.results["clip"])
        self.report(self.zero_shot_table(self.results["renorm"], self.renorm_dir))
        return reused

    def zero_shot_report(self, clip: ClipModel) -> dict:
        """A CLIP's zero-shot accuracy (clip_eval.py): on the world's caption images and val
        crops, or on the GT crops of the dataset's val split (else its training split)."""
        from .clip_eval import crop_report, zero_shot_report

        template = self.renorm_cfg.template
        if not self.custom:
            return zero_shot_report(clip, self.world_dir, template=template)
        split = self.data.val or self.data.train_all or self.data.train
        return {**crop_report(clip, split.json_file, split.image_root, template=template),
                "split": str(split.json_file)}

    def zero_shot_table(self, clip: ClipModel, clip_dir: Path) -> str:
        """`zero_shot_report` as a table (the world's cached next to the weights)."""
        if not self.custom:
            return zero_shot_table(clip, self.world_dir, clip_dir)
        from .clip_eval import format_report

        report = self.zero_shot_report(clip)
        return format_report(report, f"CLIP zero-shot accuracy on GT crops of {report['split']} ({clip_dir})")

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

    def _run_detector(self) -> bool | None:
        from .train_detector import run_training

        run_training(self.cfg, self.layout, clip=self.renorm_dir)
        return None  # run_training resumes, reuses or restarts by the folder's training identity

    def _run_evaluation(self) -> bool:
        from .evaluate import evaluate_folder, format_metrics

        split = self.data.report_name
        result, out = evaluate_folder(self.layout.detector, dataset=split)
        self.report(format_metrics(result, f"generalized zero-shot detection, {split}")
                    + f"\nmetrics: {out / 'metrics.json'}")
        return False

    def _run_gates(self) -> bool:
        from .gates import format_gates

        gates = run_gates(self.cfg, self.layout)
        self.layout.gates.write_text(strict_json(gates, indent=2))
        self.report(f"gates (also in {self.layout.gates}):\n{format_gates(gates)}")
        return False

    def _run_export(self) -> bool:
        from ovd.models.exported import verify_export

        from .export import export_detector

        name, version = export_identity(self.cfg, self.layout)
        export_detector(self.layout.detector, self.layout.export, name=name, version=version)
        verify_export(self.layout.export)
        return False

    def check_config(self) -> None:
        """Build every stage's config before any stage runs, so a typo or a wrong type in a
        late section fails in a second, not after hours of earlier stages."""
        from .proposals import ProposalConfig
        from .targets import TargetsConfig
        from .train_detector import build_config, detector_config_file

        ProposalConfig.from_config(self.cfg)
        TargetsConfig.from_config(self.cfg)
        ClipSource.from_config(self.cfg)
        # The detector's file and opts parse (its datasets are set once the dataset stage ran).
        build_config(detector_config_file(self.cfg), (self.cfg.get("detector") or {}).get("opts", []))

    def run(self) -> None:
        """Every stage of `STAGES`, in order, logging each one's status and the time so far."""
        self.check_config()
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
    Stage("dataset", "dataset", lambda lay: lay.dataset, Pipeline._run_dataset),
    Stage("clip", "CLIP", lambda lay: lay.clip_pretrained, Pipeline._run_clip),
    Stage("renorm", "CLIP re-normalisation (LayerNorms only)", lambda lay: lay.clip_renorm, Pipeline._run_renorm),
    Stage("proposals", "CLIP proposals", lambda lay: lay.proposals, Pipeline._run_proposals),
    Stage("targets", "distillation targets", lambda lay: lay.targets(), Pipeline._run_targets),
    Stage("detector", "detector training", lambda lay: lay.detector, Pipeline._run_detector),
    Stage("evaluation", "generalized zero-shot evaluation (test split, else val)",
          lambda lay: lay.detector, Pipeline._run_evaluation),
    Stage("gates", "stage gates", lambda lay: lay.gates, Pipeline._run_gates),
    Stage("export", "export", lambda lay: lay.export, Pipeline._run_export),
)


def export_identity(cfg: dict, layout: RunLayout) -> tuple[str, str]:
    """(name, version) of a run's export: the config's `export:` section, else "ovd-<dataset
    name>" ("ovd-synthetic" for the world) and 0.1.0. The name is in every service response."""
    from .data.dataset import DatasetConfig

    section = cfg.get("export") or {}
    default = f"ovd-{DatasetConfig.from_config(cfg).name}" if cfg.get("dataset") else "ovd-synthetic"
    return str(section.get("name") or default), str(section.get("version", "0.1.0"))


def sample_images(cfg: dict, layout: RunLayout, count: int = 3) -> list[Path]:
    """A few images of a `dataset:` run (val, else train): ONNX validation on the user's own
    domain and sizes. None for the synthetic world (its validation uses drawn scenes)."""
    if not cfg.get("dataset"):
        return []
    from .data.coco_format import load_coco_json

    data = dataset_of(cfg, layout)
    split = data.val or data.train
    images = load_coco_json(split.json_file)["images"][:count]
    return [split.image_root / im["file_name"] for im in images]


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

    data = dataset_of(cfg, layout)
    heldout = (Split(Path(heldout_json), Path(heldout_images or Path(heldout_json).parent)) if heldout_json
               else data.train_all)
    evaluation = (Split(Path(eval_json), Path(eval_images or Path(eval_json).parent)) if eval_json
                  else data.val)

    def held(split: Split | None) -> HeldOut | None:
        if split is None or not split.json_file.is_file():
            return None
        try:
            return HeldOut.load(split.json_file, split.image_root)
        except ValueError as e:  # no novel class: the gates that need one are listed as skipped
            logger.warning("%s", e)
            return None

    heldout, eval_set = held(heldout), held(evaluation)
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
    if clip_dir.is_dir():  # a CLIP given by name has no folder to cache in
        out.write_text(json.dumps(report, indent=2))
    return report


def zero_shot_table(clip: ClipModel, world_dir: Path, clip_dir: Path) -> str:
    """A CLIP's zero-shot accuracy table as text (computed once per weights, see `zero_shot`)."""
    from .clip_eval import format_report

    report = zero_shot(clip, world_dir, clip_dir)
    return (format_report(report, f"CLIP zero-shot accuracy ({clip_dir}, template {report['template']!r})")
            + f"\naccuracy table: {clip_dir / 'zero_shot.json'}")
