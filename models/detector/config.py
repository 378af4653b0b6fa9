"""Config keys of the open-vocabulary detector, added to a Detectron2 config in one place."""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_ovd_config(cfg: CN) -> CN:
    """Add the project's keys (MODEL.OVD.*, DATASETS.DISTILL_*, MODEL.KD.*) to a Detectron2 config."""
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

    # Compression into a student (`ovd compress`, models/compression; StudentRCNN reads these,
    # the teacher ignores them). Formulations and defaults are ours where the papers are silent.
    cfg.MODEL.KD = CN()
    # The frozen teacher: a training output folder (config.yaml + model_final.pth) or an export.
    cfg.MODEL.KD.TEACHER = ""
    cfg.MODEL.KD.TID = CN()
    # TID feature imitation on the RPN's FPN levels, weighted by task-integrated importance.
    cfg.MODEL.KD.TID.ENABLED = False
    # Factor of loss_kd_tid.
    cfg.MODEL.KD.TID.WEIGHT = 1.0
    # Teacher FPN width the student's 1x1 adapter maps to (0 = the student's own width).
    cfg.MODEL.KD.TID.TEACHER_CHANNELS = 0
    # Localisation score at best IoU >= / between / <= the RPN's IOU_THRESHOLDS (TID: 2.0/1.5/0.4).
    cfg.MODEL.KD.TID.LOC_SCORES = (2.0, 1.5, 0.4)
    # Boxes whose IoU gives that score: "predicted" (each model's anchors moved by its own RPN
    # deltas: the paper's regression task) or "anchors" (the anchor's IoU, the same for teacher
    # and student, so the weak areas see objectness gaps only).
    cfg.MODEL.KD.TID.LOC_BOXES = "predicted"
    # Key areas: this fraction of each level's locations with the highest teacher importance.
    cfg.MODEL.KD.TID.KEY_RATIO = 0.02
    # Weak areas: at most this fraction, the highest (teacher - student importance) outside key.
    cfg.MODEL.KD.TID.WEAK_RATIO = 0.02
    # Weights of the mean imitation error over key / weak / low-value areas (gamma << alpha, beta).
    cfg.MODEL.KD.TID.ALPHA = 1.0
    cfg.MODEL.KD.TID.BETA = 0.5
    cfg.MODEL.KD.TID.GAMMA = 0.05
    cfg.MODEL.KD.CID = CN()
    # CID: centerness-weighted, instance-normalised distillation on the sampled RoIs.
    cfg.MODEL.KD.CID.ENABLED = False
    # Factor of loss_kd_cls, the KL between teacher and student region logits (0 = off).
    cfg.MODEL.KD.CID.CLS_WEIGHT = 1.0
    # Factor of loss_kd_loc, the smooth-L1 between teacher and student box deltas (0 = off).
    cfg.MODEL.KD.CID.LOC_WEIGHT = 1.0
    # Temperature T of the logit KD (the loss is scaled by T^2).
    cfg.MODEL.KD.CID.TEMPERATURE = 2.0
    # Instance region = GT box scaled by this about its centre; RoI centres outside weigh 0.
    cfg.MODEL.KD.CID.ENLARGE = 1.5
    # Smooth-L1 beta of loss_kd_loc (0 = L1).
    cfg.MODEL.KD.CID.LOC_BETA = 0.0
    # Each instance's RoI weights sum to 1 (the paper's instance-aware part; False = raw
    # centerness, so instances with many sampled RoIs weigh more).
    cfg.MODEL.KD.CID.INSTANCE_NORMALISE = True
    # Localisation KD on foreground RoIs only: a background RoI near a box is matched to it by
    # Detectron2, but the teacher's regressor was never trained there (and, with the semantic
    # regressor, sees a zero class embedding). False = every centerness-weighted RoI.
    cfg.MODEL.KD.CID.LOC_FOREGROUND_ONLY = True
    cfg.MODEL.KD.LIGHT_ML = CN()
    # Light-ML between the box head's classification and regression branches (student only).
    cfg.MODEL.KD.LIGHT_ML.ENABLED = False
    # Each branch vector is viewed as this many channels (even, dividing BRANCH_DIM).
    cfg.MODEL.KD.LIGHT_ML.CHANNELS = 16
    # Kernel of its depthwise 1-D convolution (odd).
    cfg.MODEL.KD.LIGHT_ML.KERNEL_SIZE = 3
    # Apply it at inference (False: a training-time aid only, the identity in eval mode).
    cfg.MODEL.KD.LIGHT_ML.INFERENCE = True
    # Learnable gains on the two lifts, started at 0 so the module starts as the identity
    # (our addition; False = the paper's form; see LightML and benchmarks/results/compress_students_world_v1.md).
    cfg.MODEL.KD.LIGHT_ML.ZERO_INIT = False
    return cfg
