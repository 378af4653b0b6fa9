"""The open-vocabulary meta-architecture: GeneralizedRCNN whose forward takes a vocabulary."""

from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Instances
from safetensors.torch import load_file

from .output_layers import RegionFeatures


def load_text_embeddings(path: str) -> torch.Tensor:
    """(C, D) float32 text embeddings from a safetensors file with key "embeddings"."""
    return load_file(path)["embeddings"].float()


@META_ARCH_REGISTRY.register()
class OpenVocabRCNN(GeneralizedRCNN):
    """Faster R-CNN with the EZSD box head.

    `model(batched_inputs, text=T)` detects the classes whose normalised text embeddings are
    the rows of T (C, D); pred_classes index rows of T. Without `text`, the training vocabulary
    is used. Training inputs may carry "distill" Instances (see EZSDROIHeads).
    """

    @configurable
    def __init__(self, *, train_text: torch.Tensor, **kwargs):
        """
        Args:
            train_text: (C_train, D) normalised text embeddings of the training vocabulary; the
                dataset's gt_classes index its rows.
            **kwargs: GeneralizedRCNN arguments.
        """
        super().__init__(**kwargs)
        self.register_buffer("train_text", train_text.float(), persistent=False)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        path = cfg.MODEL.OVD.TRAIN_TEXT_EMBEDDINGS
        if path:
            ret["train_text"] = load_text_embeddings(path)
        else:  # e.g. a model built to load exported weights; text comes with every call
            ret["train_text"] = torch.zeros(cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.OVD.EMBED_DIM)
        return ret

    def forward(self, batched_inputs: list[dict], text: torch.Tensor | None = None):
        if not self.training:
            return self.inference(batched_inputs, text=text)
        text, images, gt_instances, distill, features = self.training_inputs(batched_inputs, text)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances, text=text,
                                            distill=distill)
        return {**detector_losses, **proposal_losses}

    def training_inputs(self, batched_inputs: list[dict], text: torch.Tensor | None):
        """(text (C, D), ImageList, GT Instances per image, distill Instances per image or None,
        backbone features) of a training batch, on the model's device."""
        text = self.train_text if text is None else text.to(self.device)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        distill = ([x["distill"].to(self.device) for x in batched_inputs]
                   if "distill" in batched_inputs[0] else None)
        return text, images, gt_instances, distill, self.backbone(images.tensor)

    def inference(self, batched_inputs: list[dict], detected_instances=None,
                  do_postprocess: bool = True, *, text: torch.Tensor | None = None):
        """Detections per image, in the input's original size; pred_classes index `text`."""
        if detected_instances is not None:
            raise NotImplementedError("OpenVocabRCNN does not take precomputed boxes")
        regions = self.encode(batched_inputs)
        results = self.classify(regions, self.train_text if text is None else text)
        if do_postprocess:
            return self.to_original_size(results, batched_inputs)
        return results

    def encode(self, batched_inputs: list[dict]) -> list[RegionFeatures]:
        """The vocabulary-independent part of inference (backbone, RPN, box head), per image.

        `roi_heads.box_predictor.classify(regions, text)` finishes it for any vocabulary.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features, None)
        return self.roi_heads.encode_regions(features, proposals)

    def classify(self, regions: list[RegionFeatures], text: torch.Tensor, **options) -> list[Instances]:
        """`roi_heads.box_predictor.classify` with text moved to the model's device.

        `ovd.models.runtime.TorchRuntime` calls encode / classify; the onnxruntime runtime
        (`ovd.models.onnx_runtime`) runs the same two halves as ONNX graphs.
        """
        return self.roi_heads.box_predictor.classify(regions, text.to(self.device), **options)

    @staticmethod
    def to_original_size(results: list[Instances], batched_inputs: list[dict]) -> list[dict]:
        """[{"instances": ...}] with boxes rescaled to each input's "height"/"width"."""
        return GeneralizedRCNN._postprocess(results, batched_inputs,
                                            [r.image_size for r in results])
