"""Config keys of the open-vocabulary detector, added to a Detectron2 config in one place."""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_ovd_config(cfg: CN) -> CN:
    """Add the project's keys (MODEL.OVD.*, DATASETS.DISTILL_*) to a Detectron2 config."""
    cfg.MODEL.OVD = CN()
    # D, the CLIP embedding size the region embeddings are distilled into.
    cfg.MODEL.OVD.EMBED_DIM = 512
    # Width of the hidden FC layer of the classification and of the regression branch.
    cfg.MODEL.OVD.BRANCH_DIM = 1024
    # Initial classifier temperature tau (EZSD: exp(s) with s = ln 100).
    cfg.MODEL.OVD.INIT_TEMPERATURE = 100.0
    # Floor of the learnable temperature (0 = none, as in the paper; see TextEmbeddingClassifier).
    cfg.MODEL.OVD.MIN_TEMPERATURE = 0.0
    # Condition box deltas on the class's text embedding (EZSD's semantic regressor).
    cfg.MODEL.OVD.SEMANTIC_REGRESSOR = True
    # lambda of the region-distillation loss (EZSD: 1.0 on COCO, 0.5 on LVIS; 0 = off).
    cfg.MODEL.OVD.DISTILL_WEIGHT = 1.0
    # safetensors file with the training vocabulary's text embeddings ("embeddings": (C, D)).
    cfg.MODEL.OVD.TRAIN_TEXT_EMBEDDINGS = ""
    # Classes trained on: "base" (open-vocabulary setting) or "all" (oracle with novel boxes).
    cfg.MODEL.OVD.TRAIN_VOCABULARY = "base"
    # The CLIP whose text tower embeds class names (project folder or open_clip name).
    cfg.MODEL.OVD.CLIP = ""
    # Prompt template that class names are put into before text encoding.
    cfg.MODEL.OVD.PROMPT_TEMPLATE = "a photo of a {}"
    # Datasets to register before use, as "name=annotations.json:image_root" specs.
    cfg.DATASETS.REGISTER = []
    # Folder written by `ovd targets` (distillation regions per image); "" = no distillation.
    cfg.DATASETS.DISTILL_TARGETS = ""
    # At most this many proposal regions per image are distilled (EZSD: 200); GT always are.
    cfg.DATASETS.DISTILL_MAX_PROPOSALS = 200
    return cfg
