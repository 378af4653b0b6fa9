"""The dataset a run trains on: one definition read by every stage.

Two producers make one: the config's `dataset:` section (your own COCO jsons; `prepare_dataset`
tags the novel classes and writes the run's copies of the annotations) and the synthetic
world (`world:` section, training/data/synthetic.py). Stages never ask which.

    dataset:
      name: trees                   # registered as trees_train, trees_val, ...; names the export
      train_json: data/train.json   # novel boxes in it are dropped for training, kept for the gates
      train_images: data/images     # default: the json's folder
      val_json: data/val.json       # all classes annotated: choices, gates, evaluation
      val_images: data/images
      test_json: data/test.json     # optional: the reported numbers (else val's)
      test_images: data/images
      novel: [dead tree, palm]      # or tag categories "split": "novel" in the jsons
      heldout_json: null            # optional: ALL boxes of the training images, for the gates

Paths are relative to the working directory. Images stay where they are; the annotations are
copied, tagged, into `<root>/dataset/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import SectionConfig
from .coco_format import SPLIT_KEY, check_dataset, load_coco_json

logger = logging.getLogger(__name__)

DATASET_FORMAT = "ovd-dataset/1"


@dataclass(frozen=True)
class Split:
    """One COCO json and the folder its images' file_name are relative to."""

    json_file: Path
    image_root: Path


@dataclass(frozen=True)
class Dataset:
    """The splits of a run, by role.

    Attributes:
        name: prefix of the Detectron2 dataset names (``<name>_train``, ...).
        train: base boxes only: what stages 1-4 train on.
        val: all classes: choices, the renorm gate, evaluation.
        test: all classes: the reported numbers (None: val's).
        train_all: all classes of the training images, read by the gates only (None: no gate
            that needs novel boxes of training images).
    """

    name: str
    train: Split
    val: Split | None = None
    test: Split | None = None
    train_all: Split | None = None

    def splits(self) -> dict[str, Split]:
        """Registered name -> split, for every split the dataset has."""
        roles = {"train": self.train, "train_all": self.train_all, "val": self.val, "test": self.test}
        return {f"{self.name}_{role}": s for role, s in roles.items() if s is not None}

    @property
    def train_name(self) -> str:
        return f"{self.name}_train"

    @property
    def val_name(self) -> str | None:
        return f"{self.name}_val" if self.val else None

    @property
    def report_name(self) -> str:
        """The split a run's numbers are reported on: test, else val (else train)."""
        return f"{self.name}_{'test' if self.test else 'val' if self.val else 'train'}"

    def specs(self) -> list[str]:
        """DATASETS.REGISTER entries ("name=json:image_root") of the splits whose json exists
        (a synthetic world not generated yet has none)."""
        return [f"{n}={s.json_file}:{s.image_root}" for n, s in self.splits().items() if s.json_file.is_file()]

    def register(self) -> list[str]:
        """Register every split in Detectron2's catalogs (with base/novel metadata)."""
        from .coco_format import register_ov_dataset

        return [register_ov_dataset(n, s.json_file, s.image_root, overwrite=True)
                for n, s in self.splits().items()]


@dataclass(frozen=True)
class DatasetConfig(SectionConfig):
    """The `dataset:` section of a config file (see the module docstring)."""

    SECTION = "dataset"
    name: str = "dataset"
    train_json: str = ""
    train_images: str | None = None
    val_json: str | None = None
    val_images: str | None = None
    test_json: str | None = None
    test_images: str | None = None
    novel: tuple[str, ...] | None = None
    heldout_json: str | None = None
    heldout_images: str | None = None

    def __post_init__(self) -> None:
        if not self.train_json:
            raise ValueError("dataset: train_json is required (a COCO json of the training images)")
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"dataset: name {self.name!r} must be letters, digits, '-' or '_'")

    def split(self, role: str) -> Split | None:
        json_file = getattr(self, f"{role}_json")
        if not json_file:
            return None
        images = getattr(self, f"{role}_images")
        return Split(Path(json_file), Path(images) if images else Path(json_file).parent)


def _tag(coco: dict, novel: set[str] | None, source: Path) -> dict:
    """The json with every category tagged base/novel (config list first, else its own tags)."""
    names = {c["name"] for c in coco["categories"]}
    if novel is not None:
        unknown = sorted(novel - names)
        if unknown:
            raise ValueError(f"dataset.novel names {unknown} are not categories of {source} "
                             f"(its categories: {sorted(names)})")
    tagged = []
    for c in coco["categories"]:
        split = ("novel" if c["name"] in novel else "base") if novel is not None else c.get(SPLIT_KEY, "base")
        tagged.append({**c, SPLIT_KEY: split})
    return {**coco, "categories": tagged}


def _same_categories(a: dict, b: dict, a_file: Path, b_file: Path) -> None:
    ka = sorted((c["id"], c["name"]) for c in a["categories"])
    kb = sorted((c["id"], c["name"]) for c in b["categories"])
    if ka != kb:
        raise ValueError(f"{a_file} and {b_file} name different categories (id, name): "
                         f"only in the first {sorted(set(ka) - set(kb))}, only in the second "
                         f"{sorted(set(kb) - set(ka))}; every split must share one category list")


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def prepare_dataset(dcfg: DatasetConfig, out_dir: str | Path) -> Dataset:
    """Check the section's jsons, tag the novel classes, and write the run's annotations.

    Writes ``out_dir/annotations/{train_base,train_all,val,test}.json`` (those that apply) and
    ``out_dir/dataset.json``; reused when the inputs (file hashes, the section) are unchanged.

    Raises:
        FileNotFoundError: a json or image folder is missing.
        ValueError: invalid json, splits with different categories, unknown novel names.
    """
    out_dir = Path(out_dir)
    roles = {r: dcfg.split(r) for r in ("train", "val", "test", "heldout")}
    for role, s in roles.items():
        if s is not None and not s.image_root.is_dir():
            raise FileNotFoundError(f"dataset: {role} image folder {s.image_root} is not a folder (relative "
                                    f"paths are read from the working directory, {Path.cwd()})")
    digest = hashlib.sha256(json.dumps(asdict(dcfg), sort_keys=True, default=list).encode())
    for s in roles.values():
        if s is not None:
            if not s.json_file.is_file():
                raise FileNotFoundError(f"dataset: {s.json_file} does not exist (relative paths are read "
                                        f"from the working directory, {Path.cwd()})")
            digest.update(hashlib.sha256(s.json_file.read_bytes()).digest())
    fingerprint = digest.hexdigest()
    manifest_path = out_dir / "dataset.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint:
            return dataset_from_manifest(manifest)

    novel = set(dcfg.novel) if dcfg.novel is not None else None
    for role, s in roles.items():  # what `ovd data check` checks, once per change of the files
        if s is not None:
            report = check_dataset(s.json_file, s.image_root)
            if report["errors"]:
                raise ValueError(f"dataset: {role} split {s.json_file} (images in {s.image_root}) is not "
                                 f"usable as given: {'; '.join(report['errors'][:5])}"
                                 f"{' ...' if len(report['errors']) > 5 else ''} "
                                 f"(`ovd data check {s.json_file} --image-root {s.image_root}` lists all)")
    cocos = {r: _tag(load_coco_json(s.json_file), novel, s.json_file) for r, s in roles.items() if s}
    for role, coco in cocos.items():
        if role != "train":
            _same_categories(cocos["train"], coco, roles["train"].json_file, roles[role].json_file)
    train = cocos["train"]
    novel_ids = {c["id"] for c in train["categories"] if c[SPLIT_KEY] == "novel"}
    base_anns = [a for a in train["annotations"] if a["category_id"] not in novel_ids]
    if not base_anns:
        raise ValueError(f"dataset: {roles['train'].json_file} has no box of a base class (every "
                         f"annotated class is novel: {sorted(c['name'] for c in train['categories'] if c['id'] in novel_ids)}); "
                         "the detector learns from base boxes: leave at least one annotated class out of dataset.novel")
    ann = out_dir / "annotations"
    _write(ann / "train_base.json", {**train, "annotations": base_anns})
    splits = {"train": Split(ann / "train_base.json", roles["train"].image_root)}
    if "heldout" in cocos:
        _write(ann / "train_all.json", cocos["heldout"])
        splits["train_all"] = Split(ann / "train_all.json", roles["heldout"].image_root)
    elif len(base_anns) < len(train["annotations"]):
        # The training json annotates novel classes too: training drops those boxes, the gates
        # (which never feed a stage) may read them.
        _write(ann / "train_all.json", train)
        splits["train_all"] = Split(ann / "train_all.json", roles["train"].image_root)
    for role in ("val", "test"):
        if role in cocos:
            _write(ann / f"{role}.json", cocos[role])
            splits[role] = Split(ann / f"{role}.json", roles[role].image_root)
    names = {s: [c["name"] for c in train["categories"] if c[SPLIT_KEY] == s] for s in ("base", "novel")}
    manifest = {
        "format": DATASET_FORMAT, "name": dcfg.name, "fingerprint": fingerprint,
        "splits": {r: {"json_file": str(s.json_file), "image_root": str(s.image_root)} for r, s in splits.items()},
        "base": names["base"], "novel": names["novel"],
        "counts": {r: {"images": len(c["images"]), "boxes": len(c["annotations"])} for r, c in cocos.items()},
        "dropped_novel_training_boxes": len(train["annotations"]) - len(base_anns),
    }
    _write(manifest_path, manifest)
    logger.info("dataset %s: %d base classes %s, %d novel %s; %s", dcfg.name, len(names["base"]),
                names["base"], len(names["novel"]), names["novel"],
                ", ".join(f"{r} {c['images']} images / {c['boxes']} boxes" for r, c in manifest["counts"].items()))
    if not names["novel"]:
        logger.warning("dataset %s declares no novel class (dataset.novel, or \"split\": \"novel\" "
                       "in the jsons): the novel-class proposals, gates and AP have nothing to "
                       "measure; the detector still takes any class name at request time", dcfg.name)
    return dataset_from_manifest(manifest)


def dataset_from_manifest(manifest: dict) -> Dataset:
    """The `Dataset` a prepared dataset.json describes."""
    splits = {r: Split(Path(s["json_file"]), Path(s["image_root"])) for r, s in manifest["splits"].items()}
    return Dataset(manifest["name"], splits["train"], splits.get("val"), splits.get("test"),
                   splits.get("train_all"))


def world_dataset(world_dir: str | Path) -> Dataset:
    """The synthetic world as a `Dataset` (registered names synth_train, synth_val, ...)."""
    from .synthetic import world_datasets

    s = {name.removeprefix("synth_"): Split(*paths) for name, paths in world_datasets(world_dir).items()}
    return Dataset("synth", s["train"], s["val"], s["test"], s["train_all"])


def dataset_of(cfg: dict, layout) -> Dataset:
    """The dataset of a run: its config's `dataset:` section (prepared under the run folder
    when needed), else the synthetic world under the run folder."""
    if cfg.get("dataset"):
        return prepare_dataset(DatasetConfig.from_config(cfg), layout.dataset)
    return world_dataset(layout.world)
