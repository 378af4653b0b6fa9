"""Speed of our detectors against the open-vocabulary detectors users would pick instead.

Everything runs in one process on this machine, at the same square image sizes and the same
vocabulary sizes, on the CPU, one model at a time:

1. **Anchors.** Per-image latency (median and p95 over repeated runs after warm-up), images/s at
   the best of a few batch sizes, and peak memory of

   * our teacher (`--teacher`, the shipped export, `ovd.models.exported.load_export`),
   * our student (`--student` export folder; without it the architecture of
     configs/compress/synthetic_student_r18_narrow.yaml with **random weights**),
   * OWL-ViT B/32, OWLv2 B/16 and Grounding DINO tiny, built with Hugging Face `transformers`
     from their published configurations with **random weights** (no hub download is possible
     here; speed does not depend on weight values). No tokenizer either: the text inputs are
     random token ids of realistic length (see `--owl-name-tokens`, `--gdino-name-tokens`).

   Ours are timed as the service answers a request with the vocabulary's text embeddings
   already cached: `encode` (backbone, RPN, box head) + `classify` per image (two matmuls,
   softmax, NMS) + rescaling to the original size. OWL models are timed as their pipeline
   runs them (text tower on every call) and with pre-computed query embeddings
   (`image_embedder` + `class_predictor` + `box_predictor`). Grounding DINO takes one prompt
   "a . b . c ." of at most 256 tokens: larger vocabularies are split into several forwards,
   as its users must do. Anchor timings stop at the raw model outputs (no thresholding or
   NMS); ours include it.
2. **FLOPs** of our detectors' `encode` per image (fvcore `FlopCountAnalysis` of a traced
   `encode`, multiply-adds counted once, reported x2 as FLOPs) and the achieved FLOP/s
   against this machine's float32 matmul peak, timed in the same process.
3. **Stage costs and how they grow**: text encoding of new vs cached class names; our detectors
   vs image size; encode vs classify vs number of classes; a training step of the teacher
   config vs batch size; the proposal stage (training/proposals.py) dense vs cheap.
4. **Inference speed-ups** on the teacher at 640 px, each before/after in this process,
   alternating the two variants run by run: `torch.inference_mode` vs `no_grad`,
   channels_last, intra-op threads; the classification share of a request. `--profile` adds
   the top ops of a `torch.profiler` run of the teacher's request.

Memory is the peak resident set size of the process while a model is built and measured,
above the RSS just before it was built (after `gc.collect()` and glibc `malloc_trim`), sampled
every 2 ms by a thread reading /proc/self/statm: weights, activations and allocator caches.

Results go to stdout and to benchmarks/results/speed_anchors.{json,md}. Timings on a machine
shared with other jobs are slower and noisier: the report records the load average.

Usage:
    python benchmarks/speed_anchors.py --profile            # full run (~20 min on 2 cores)
    python benchmarks/speed_anchors.py --quick --profile     # smoke run, small sizes
    python benchmarks/speed_anchors.py --student runs/synthetic/student_export \\
        --sizes 640 --vocabs 10 --repeats 3 --anchors owlvit,owlv2
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import shlex
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from host_info import host_info, host_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEACHER_CONFIG = ROOT / "configs/detector/synthetic_r18_fpn.yaml"
STUDENT_CONFIG = ROOT / "configs/compress/synthetic_student_r18_narrow.yaml"
RENORM_CLIP = ROOT / "runs/synthetic/clip/renorm"
RANDOM_CLIP = "ovd-vit-tiny-64"
SECTIONS = ("anchors", "flops", "scaling", "train", "proposals", "speedups")
ANCHORS = ("owlvit", "owlv2", "gdino")
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WORDS = ["red", "green", "blue", "small", "large", "striped", "metal", "wooden",
         "disk", "ring", "star", "cross", "helmet", "forklift", "pallet", "crate"]

# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock seconds of repeated runs of one thing (after its warm-up runs)."""

    seconds: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.seconds)

    def ms(self, q: float = 50) -> float | None:
        """The q-th percentile in ms (linear interpolation), None without runs."""
        return float(np.percentile(self.seconds, q)) * 1000 if self.seconds else None

    def summary(self) -> dict:
        return {"n": self.n, "median_ms": _r(self.ms(50)), "p95_ms": _r(self.ms(95)),
                "min_ms": _r(min(self.seconds) * 1000 if self.seconds else None),
                "note": self.note}


def _r(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def timed(fn: Callable[[], object], *, repeats: int, warmup: int, budget_s: float) -> Timing:
    """Run fn `warmup` times unmeasured, then up to `repeats` measured times; stop early (after
    at least one measured run) once the measured runs took `budget_s` in all."""
    for _ in range(warmup):
        fn()
    t = Timing()
    spent = 0.0
    while t.n < repeats and (t.n == 0 or spent < budget_s):
        start = time.perf_counter()
        fn()
        t.seconds.append(time.perf_counter() - start)
        spent += t.seconds[-1]
    if t.n < repeats:
        t.note = f"cell budget {budget_s:.0f} s reached after {t.n} of {repeats} runs"
    return t


def alternating(*fns: Callable[[], object], repeats: int, warmup: int) -> list[Timing]:
    """Time variants A, B, ... as A B ... A B ..., so slow drifts of the machine's load hit all
    of them alike; one Timing per variant, in order."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    timings = [Timing() for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, timings, strict=True):
            start = time.perf_counter()
            fn()
            t.seconds.append(time.perf_counter() - start)
    return timings


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """Peak RSS above the RSS at entry (after gc + malloc_trim), sampled every `interval_s`."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        _release_memory()
        self.baseline = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def matmul_peak(n: int, repeats: int) -> dict:
    """float32 (n x n) @ (n x n) on this machine: best and median GFLOP/s (2 n^3 per product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timed(lambda: torch.matmul(a, b), repeats=repeats, warmup=1, budget_s=60)
    flops = 2 * n**3
    return {"n": n, "runs": t.n, "best_gflops": round(flops / min(t.seconds) / 1e9, 1),
            "median_gflops": round(flops / statistics.median(t.seconds) / 1e9, 1)}


# --- inputs -------------------------------------------------------------------------------------


def scene(size: int, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8 RGB: a textured ground with coloured discs (deterministic)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(110, 25, (size, size, 3)).clip(0, 255)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(max(4, size // 40)):
        cy, cx = rng.integers(0, size, 2)
        r = rng.integers(size // 40 + 4, size // 8 + 8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def pixel_values(size: int, batch: int, mean, std) -> torch.Tensor:
    """(batch, 3, size, size) float normalised images of `scene` (what a processor returns)."""
    x = torch.from_numpy(scene(size)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x[None].expand(batch, -1, -1, -1).contiguous()


def class_names(n: int, tag: str = "") -> list[str]:
    """n distinct readable names ("red disk 17"); a tag makes them new (a text-cache miss)."""
    return [f"{WORDS[i % 8]} {WORDS[8 + (i // 8) % 8]} {i}{tag}" for i in range(n)]


# --- our detectors ------------------------------------------------------------------------------


@dataclass
class Ours:
    """One of our detectors with its CLIP text tower."""

    name: str
    model: torch.nn.Module
    text_embeddings: Callable[[list[str]], torch.Tensor]
    note: str

    def inputs(self, size: int, batch: int) -> list[dict]:
        """Detectron2 inputs already resized to size x size (the service resizes first)."""
        image = torch.from_numpy(np.ascontiguousarray(scene(size).transpose(2, 0, 1)))
        return [{"image": image, "height": size, "width": size} for _ in range(batch)]

    def encode(self, inputs: list[dict]):
        return self.model.encode(inputs)

    def classify(self, regions, text: torch.Tensor) -> list:
        """Per image, as service/batcher.py does it (each request has its own vocabulary)."""
        out = []
        for region in regions:
            found = self.model.classify([region], text)
            out.append(self.model.to_original_size(found, [{"height": region.image_size[0],
                                                            "width": region.image_size[1]}]))
        return out

    def request(self, inputs: list[dict], text: torch.Tensor) -> list:
        with torch.inference_mode():
            return self.classify(self.encode(inputs), text)


def load_teacher(folder: Path) -> Ours:
    from ovd.models.exported import load_export

    export = load_export(folder)
    return Ours("ours: teacher", export.model, export.text_embeddings,
                f"export {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder} "
                f"(R18-FPN 128 ch, {export.manifest.get('weights_dtype', 'float32')} weights "
                "loaded into float32)")


def load_student(folder: Path | None, text_embeddings) -> Ours:
    if folder is not None:
        from ovd.models.exported import load_export

        export = load_export(folder)
        return Ours("ours: student", export.model, export.text_embeddings, f"export {folder}")
    from detectron2.modeling import build_model

    import ovd.models.detector  # noqa: F401  registers the detector components
    from ovd.training.train_detector import build_config

    torch.manual_seed(0)
    cfg = build_config(STUDENT_CONFIG, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    return Ours("ours: student", model, text_embeddings,
                f"{STUDENT_CONFIG.relative_to(ROOT)} with RANDOM weights (no --student export; "
                "speed only), teacher's text tower")


def region_count(ours: Ours, size: int) -> float:
    with torch.inference_mode():
        return float(np.mean([len(r.proposals) for r in ours.encode(ours.inputs(size, 1))]))


class _EncodeOnly(torch.nn.Module):
    """`model.encode` of one image as a module of tensors, for fvcore's tracer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        regions = self.model.encode([{"image": image, "height": image.shape[1],
                                      "width": image.shape[2]}])
        return tuple(t for r in regions for t in (r.proposals, r.embeddings, r.reg_features))


def encode_flops(ours: Ours, size: int) -> dict:
    """fvcore count of encode at size x size: total and per top-level module, in FLOPs
    (fvcore counts one per multiply-add; x2 here), plus the ops fvcore could not count."""
    from fvcore.nn import FlopCountAnalysis

    image = ours.inputs(size, 1)[0]["image"]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(_EncodeOnly(ours.model), (image,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fca.tracer_warnings("none")
        total = fca.total()
        by_module = fca.by_module()
        unsupported = dict(fca.unsupported_ops())
    parts = {k: 2 * by_module.get(f"model.{k}", 0) / 1e9
             for k in ("backbone", "proposal_generator", "roi_heads")}
    return {"size": size, "gflops": round(2 * total / 1e9, 3),
            "gflops_by_module": {k: round(v, 3) for k, v in parts.items()},
            "uncounted_ops": unsupported}


# --- anchors ------------------------------------------------------------------------------------


class Anchor:
    """An anchor detector: `request(size, batch, n_names)` returns a callable doing one batch."""

    name: str
    config: dict
    notes: list[str]
    model: torch.nn.Module

    def variants(self) -> list[str]:
        return ["pipeline"]

    def params_m(self) -> float:
        return sum(p.numel() for p in self.model.parameters()) / 1e6


class Owl(Anchor):
    """OWL-ViT B/32 or OWLv2 B/16 (transformers), random weights."""

    def __init__(self, kind: str, name_tokens: int):
        from transformers import (
            Owlv2Config,
            Owlv2ForObjectDetection,
            OwlViTConfig,
            OwlViTForObjectDetection,
        )

        torch.manual_seed(0)
        if kind == "owlvit":
            # google/owlvit-base-patch32: ViT-B/32 at 768 px, CLIP text tower 12 x 512,
            # 16 tokens; OwlViTConfig() defaults are exactly that (checked below).
            cfg, cls, self.name = OwlViTConfig(), OwlViTForObjectDetection, "OWL-ViT B/32"
            expected = {"image_size": 768, "patch_size": 32}
        else:
            # google/owlv2-base-patch16(-ensemble): ViT-B/16 at 960 px. Owlv2Config() defaults
            # to image_size 768, so it is set explicitly.
            cfg = Owlv2Config(vision_config={"image_size": 960, "patch_size": 16})
            cls, self.name = Owlv2ForObjectDetection, "OWLv2 B/16"
            expected = {"image_size": 960, "patch_size": 16}
        v, t = cfg.vision_config, cfg.text_config
        published = {**expected, "vision_hidden": 768, "vision_layers": 12, "vision_heads": 12,
                     "vision_mlp": 3072, "text_hidden": 512, "text_layers": 12, "text_heads": 8,
                     "text_mlp": 2048, "text_context": 16, "projection_dim": 512}
        actual = {"image_size": v.image_size, "patch_size": v.patch_size,
                  "vision_hidden": v.hidden_size, "vision_layers": v.num_hidden_layers,
                  "vision_heads": v.num_attention_heads, "vision_mlp": v.intermediate_size,
                  "text_hidden": t.hidden_size, "text_layers": t.num_hidden_layers,
                  "text_heads": t.num_attention_heads, "text_mlp": t.intermediate_size,
                  "text_context": t.max_position_embeddings, "projection_dim": cfg.projection_dim}
        if actual != published:
            raise SystemExit(f"{self.name}: config {actual} differs from the published {published}")
        self.kind, self.native = kind, v.image_size
        self.patch = v.patch_size
        self.context = t.max_position_embeddings
        self.name_tokens = min(name_tokens, self.context - 2)
        self.model = cls(cfg).eval()
        self.inner = getattr(self.model, "owlvit", None) or self.model.owlv2
        set_fields = "vision image_size=960, patch_size=16 (default 768)" if kind == "owlv2" \
            else "defaults"
        self.config = {**actual, "set": set_fields, "params_m": round(self.params_m(), 1)}
        self.notes = []

    def variants(self) -> list[str]:
        return ["text every call", "cached queries"]

    def size_ok(self, size: int) -> tuple[int, bool]:
        """(input side, interpolate_pos_encoding) for a requested side."""
        return size, size != self.native

    def queries(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 16) token ids (BOS, `name_tokens` random BPE ids, EOS, padding) and mask."""
        g = torch.Generator().manual_seed(n)
        ids = torch.zeros(n, self.context, dtype=torch.long)
        ids[:, 0] = 49406
        ids[:, 1:1 + self.name_tokens] = torch.randint(300, 49000, (n, self.name_tokens), generator=g)
        ids[:, 1 + self.name_tokens] = 49407  # EOS: the highest id, where CLIP pools
        mask = (torch.arange(self.context) < self.name_tokens + 2).long().expand(n, -1).contiguous()
        return ids, mask

    def request(self, variant: str, size: int, batch: int, n_names: int) -> Callable[[], object]:
        side, interp = self.size_ok(size)
        px = pixel_values(side, batch, CLIP_MEAN, CLIP_STD)
        ids, mask = self.queries(n_names)
        if variant == "text every call":
            ids_b, mask_b = ids.repeat(batch, 1), mask.repeat(batch, 1)

            def run():
                with torch.inference_mode():
                    return self.model(input_ids=ids_b, pixel_values=px, attention_mask=mask_b,
                                      interpolate_pos_encoding=interp)
            return run
        with torch.inference_mode():
            q = self.inner.get_text_features(input_ids=ids, attention_mask=mask)
            q = q if isinstance(q, torch.Tensor) else q.pooler_output
        query = q[None].expand(batch, -1, -1)
        query_mask = torch.ones(batch, n_names, dtype=torch.bool)

        def run_cached():
            with torch.inference_mode():
                fmap = self.model.image_embedder(pixel_values=px, interpolate_pos_encoding=interp)[0]
                b, h, w, d = fmap.shape
                feats = fmap.reshape(b, h * w, d)
                logits, _ = self.model.class_predictor(feats, query, query_mask)
                boxes = self.model.box_predictor(feats, fmap, interp)
                if self.kind == "owlv2":
                    self.model.objectness_predictor(feats)
                return logits, boxes
        return run_cached


class GroundingDino(Anchor):
    """Grounding DINO tiny (Swin-T + BERT-base), random weights, one prompt per forward."""

    def __init__(self, name_tokens: int):
        from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

        torch.manual_seed(0)
        cfg = GroundingDinoConfig()
        b, t = cfg.backbone_config, cfg.text_config
        # IDEA-Research/grounding-dino-tiny: Swin-T (96, depths 2-2-6-2, heads 3-6-12-24,
        # window 7) stages 2-4, BERT-base-uncased, d_model 256, 900 queries, 6 + 6 layers,
        # 4 levels, 4 points, two-stage, 256 text tokens: GroundingDinoConfig() defaults.
        published = {"swin_embed_dim": 96, "swin_depths": [2, 2, 6, 2],
                     "swin_heads": [3, 6, 12, 24], "swin_window": 7,
                     "swin_out_features": ["stage2", "stage3", "stage4"], "text": "bert",
                     "text_hidden": 768, "text_layers": 12, "d_model": 256, "num_queries": 900,
                     "encoder_layers": 6, "decoder_layers": 6, "ffn_dim": 2048,
                     "num_feature_levels": 4, "points": 4, "two_stage": True, "max_text_len": 256}
        actual = {"swin_embed_dim": b.embed_dim, "swin_depths": list(b.depths),
                  "swin_heads": list(b.num_heads), "swin_window": b.window_size,
                  "swin_out_features": list(b.out_features), "text": t.model_type,
                  "text_hidden": t.hidden_size, "text_layers": t.num_hidden_layers,
                  "d_model": cfg.d_model, "num_queries": cfg.num_queries,
                  "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
                  "ffn_dim": cfg.encoder_ffn_dim, "num_feature_levels": cfg.num_feature_levels,
                  "points": cfg.encoder_n_points, "two_stage": cfg.two_stage,
                  "max_text_len": cfg.max_text_len}
        if actual != published:
            raise SystemExit(f"Grounding DINO: config {actual} differs from the published {published}")
        self.name = "Grounding DINO T"
        self.model = GroundingDinoForObjectDetection(cfg).eval()
        self.max_len = cfg.max_text_len
        self.name_tokens = name_tokens
        self.config = {**actual, "set": "defaults", "params_m": round(self.params_m(), 1)}
        self.notes = []

    def names_per_prompt(self) -> int:
        return (self.max_len - 2) // (self.name_tokens + 1)  # [CLS] ... [SEP]; " ." per name

    def prompts(self, n: int) -> list[torch.Tensor]:
        """Token ids of "a . b . c ." prompts of at most max_text_len tokens covering n names."""
        g = torch.Generator().manual_seed(n)
        per = self.names_per_prompt()
        out = []
        for start in range(0, n, per):
            k = min(per, n - start)
            words = torch.randint(1996, 29612, (k, self.name_tokens), generator=g)
            body = torch.cat([words, torch.full((k, 1), 1012)], dim=1).flatten()  # 1012 = "."
            out.append(torch.cat([torch.tensor([101]), body, torch.tensor([102])])[None])
        return out

    def request(self, variant: str, size: int, batch: int, n_names: int,
                chunks: list[int] | None = None) -> Callable[[], object]:
        """One batch over all prompts (or only the prompts with the given indices)."""
        px = pixel_values(size, batch, IMAGENET_MEAN, IMAGENET_STD)
        pmask = torch.ones(batch, size, size, dtype=torch.long)
        prompts = self.prompts(n_names)
        if chunks is not None:
            prompts = [prompts[i] for i in chunks]
        prompts = [p.expand(batch, -1).contiguous() for p in prompts]

        def run():
            with torch.inference_mode():
                return [self.model(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids),
                                   token_type_ids=torch.zeros_like(ids), pixel_mask=pmask)
                        for ids in prompts]
        return run


# --- section 1: anchors -------------------------------------------------------------------------


def cell(model: str, variant: str, size: int, n_names: int, batch: int, t: Timing, **extra) -> dict:
    row = {"model": model, "variant": variant, "size": size, "names": n_names, "batch": batch,
           **t.summary(), **extra}
    med = t.ms(50)
    row["per_image_ms"] = _r(med / batch if med else None)
    row["images_per_s"] = _r(batch / (med / 1000), 2) if med else None
    return row


def measure_ours(ours: Ours, args, rows: list[dict]) -> None:
    for size in args.sizes:
        inputs = ours.inputs(size, 1)
        texts = [ours.text_embeddings(class_names(n)) for n in args.vocabs]
        # The vocabularies of one size are timed in turn, run by run (A B A B ...), so that their
        # ratio (what 1000 cached names cost against 10) is not a drift of the machine's load.
        requests = [lambda inputs=inputs, text=text: ours.request(inputs, text) for text in texts]
        runs = alternating(*requests, repeats=args.repeats, warmup=args.warmup)
        for n, t in zip(args.vocabs, runs, strict=True):
            rows.append(cell(ours.name, "cached text", size, n, 1, t, note="vocabularies alternated"))
            print(f"  {ours.name} {size}px {n} names: {t.ms():.1f} ms", flush=True)
    text = ours.text_embeddings(class_names(args.vocabs[0]))
    for b in args.batch_sizes:
        inputs = ours.inputs(args.throughput_size, b)
        t = timed(lambda inputs=inputs: ours.request(inputs, text), repeats=args.repeats,
                  warmup=args.warmup, budget_s=args.cell_budget_s)
        rows.append(cell(ours.name, "cached text", args.throughput_size, args.vocabs[0], b, t,
                         throughput=True))


def measure_anchor(anchor: Anchor, args, rows: list[dict]) -> None:
    budget = args.cell_budget_s
    for variant in anchor.variants():
        for size in args.sizes:
            for n in args.vocabs:
                extra = {}
                if isinstance(anchor, GroundingDino) and len(anchor.prompts(n)) > 1 \
                        and args.gdino_chunks == "sum":
                    t, extra = gdino_chunk_sum(anchor, size, n, args)
                else:
                    fn = anchor.request(variant, size, 1, n)
                    t = timed(fn, repeats=args.repeats, warmup=args.warmup, budget_s=budget)
                    if isinstance(anchor, GroundingDino):
                        extra = {"prompts": len(anchor.prompts(n))}
                if isinstance(anchor, Owl) and anchor.size_ok(size)[1]:
                    extra["interpolate_pos_encoding"] = True
                rows.append(cell(anchor.name, variant, size, n, 1, t, **extra))
                print(f"  {anchor.name} [{variant}] {size}px {n} names: {t.ms():.1f} ms "
                      f"{extra.get('prompts', '')}", flush=True)
        for b in args.batch_sizes:
            fn = anchor.request(variant, args.throughput_size, b, args.vocabs[0])
            t = timed(fn, repeats=args.repeats, warmup=args.warmup, budget_s=budget)
            rows.append(cell(anchor.name, variant, args.throughput_size, args.vocabs[0], b, t,
                             throughput=True))
            if t.ms() / 1000 > budget and b != args.batch_sizes[-1]:
                rows[-1]["note"] = "; ".join(filter(None, [rows[-1]["note"], "larger batches skipped (cell budget)"]))
                break


def gdino_chunk_sum(anchor: GroundingDino, size: int, n: int, args) -> tuple[Timing, dict]:
    """Latency of a multi-prompt vocabulary as the sum of its measured prompt forwards: every
    full prompt has the same shape, so one full prompt and the (shorter) last one are timed."""
    prompts = anchor.prompts(n)
    full = timed(anchor.request("pipeline", size, 1, n, chunks=[0]), repeats=args.repeats,
                 warmup=args.warmup, budget_s=args.cell_budget_s)
    n_full = sum(p.shape[1] == prompts[0].shape[1] for p in prompts)
    parts = [(full, n_full)]
    if n_full < len(prompts):
        last = timed(anchor.request("pipeline", size, 1, n, chunks=[len(prompts) - 1]),
                     repeats=args.repeats, warmup=0, budget_s=args.cell_budget_s)
        parts.append((last, len(prompts) - n_full))
    k = min(t.n for t, _ in parts)
    total = Timing([sum(sorted(t.seconds)[i] * m for t, m in parts) for i in range(k)])
    total.note = (f"{len(prompts)} prompts: sum of measured forwards ({n_full} x full "
                  f"{full.ms():.0f} ms" + (f" + last {parts[1][0].ms():.0f} ms" if len(parts) > 1
                                           else "") + ")")
    return total, {"prompts": len(prompts), "chunk_timing": "sum"}


def section_anchors(args, report: dict) -> list[Ours]:
    """Section 1; returns our two detectors (each loaded inside its memory measurement)."""
    rows: list[dict] = []
    models: list[dict] = []
    ours_models: list[Ours] = []
    for which in ("teacher", "student"):
        with PeakRss() as mem:
            ours = (load_teacher(args.teacher) if which == "teacher"
                    else load_student(args.student, ours_models[0].text_embeddings))
            ours_models.append(ours)
            measure_ours(ours, args, rows)
        models.append({"model": ours.name, "note": ours.note, "peak_rss_delta_mib": round(mem.delta_mib),
                       "params_m": round(sum(p.numel() for p in ours.model.parameters()) / 1e6, 2),
                       "regions_per_image": {s: region_count(ours, s) for s in args.sizes}})
    for key in args.anchors:
        print(f"building {key} (random weights)", flush=True)
        with PeakRss() as mem:
            anchor = (Owl(key, args.owl_name_tokens) if key in ("owlvit", "owlv2")
                      else GroundingDino(args.gdino_name_tokens))
            measure_anchor(anchor, args, rows)
        info = {"model": anchor.name, "config": anchor.config, "peak_rss_delta_mib": round(mem.delta_mib),
                "params_m": anchor.config["params_m"], "load_avg_1m_after": os.getloadavg()[0]}
        if isinstance(anchor, Owl):
            info["native_size"] = anchor.native
            info["text_tokens"] = (f"{anchor.name_tokens} random BPE ids + BOS/EOS, padded to "
                                   f"{anchor.context}, one sequence per name per image")
        else:
            info["text_tokens"] = (f"{anchor.name_tokens} random WordPiece ids + '.' per name, "
                                   f"{anchor.names_per_prompt()} names per {anchor.max_len}-token "
                                   "prompt, one forward per prompt")
        models.append(info)
        del anchor
        _release_memory()
    report["anchors"] = {"rows": rows, "models": models, "ratios": ratios(rows, ours_models),
                         "vocabulary_cost": vocabulary_cost(rows, ours_models, args.vocabs)}
    return ours_models


def vocabulary_cost(rows: list[dict], ours_models: list[Ours], vocabs: list[int]) -> list[dict]:
    """Per detector of ours and image size: median latency with the largest cached vocabulary
    over that with the smallest (the issue's bound is 1.2x for 1000 vs 10 names)."""
    if len(vocabs) < 2:
        return []
    small, large = min(vocabs), max(vocabs)
    lat = {(r["model"], r["size"], r["names"]): r["median_ms"] for r in rows
           if not r.get("throughput") and r["variant"] == "cached text"}
    out = []
    for o in ours_models:
        for size in sorted({s for m, s, _ in lat if m == o.name}):
            a, b = lat.get((o.name, size, small)), lat.get((o.name, size, large))
            if a and b:
                out.append({"model": o.name, "size": size, "small": small, "small_ms": a,
                            "large": large, "large_ms": b, "ratio": round(b / a, 3)})
    return out


def ratios(rows: list[dict], ours_models: list[Ours]) -> list[dict]:
    """ours / anchor latency for every (size, names) cell at batch 1, and best images/s."""
    out = []
    lat = {(r["model"], r["variant"], r["size"], r["names"]): r["median_ms"]
           for r in rows if not r.get("throughput")}
    best: dict[tuple, float] = {}
    for r in rows:
        if r.get("throughput") and r["images_per_s"]:
            key = (r["model"], r["variant"])
            best[key] = max(best.get(key, 0), r["images_per_s"])
    ours_names = [o.name for o in ours_models]
    for (model, variant, size, n), ms in lat.items():
        if model in ours_names:
            continue
        for o in ours_names:
            mine = lat.get((o, "cached text", size, n))
            if mine and ms:
                out.append({"ours": o, "anchor": model, "variant": variant, "size": size,
                            "names": n, "latency_ratio": round(mine / ms, 4)})
    for (model, variant), ips in best.items():
        if model in ours_names:
            continue
        for o in ours_names:
            mine = best.get((o, "cached text"))
            if mine:
                out.append({"ours": o, "anchor": model, "variant": variant, "size": None,
                            "names": None, "throughput_ratio": round(mine / ips, 2)})
    return out


# --- sections 2 and 3: FLOPs and stage costs ----------------------------------------------------


def section_flops_and_scaling(args, report: dict, ours_models: list[Ours], do_flops: bool,
                              do_scaling: bool) -> None:
    peak = matmul_peak(args.matmul_n, args.repeats + 2)
    report["matmul_peak"] = peak
    print(f"  matmul peak: {peak['best_gflops']} GFLOP/s (n={peak['n']})", flush=True)
    sizes = args.scale_sizes if do_scaling else [args.throughput_size]
    rows = []
    for ours in ours_models:
        text = ours.text_embeddings(class_names(10))
        for size in sizes:
            inputs = ours.inputs(size, 1)
            with torch.inference_mode():
                regions = ours.encode(inputs)
            enc = timed(lambda ours=ours, inputs=inputs: _no_grad_call(ours.encode, inputs),
                        repeats=args.repeats, warmup=args.warmup, budget_s=args.cell_budget_s)
            cls = timed(lambda ours=ours, regions=regions, text=text:
                        _no_grad_call(ours.classify, regions, text),
                        repeats=args.repeats, warmup=args.warmup, budget_s=args.cell_budget_s)
            row = {"model": ours.name, "size": size, "names": 10, "regions": len(regions[0].proposals),
                   "encode": enc.summary(), "classify": cls.summary()}
            if do_flops:
                fl = encode_flops(ours, size)
                row["flops"] = fl
                achieved = fl["gflops"] / (enc.ms() / 1000)
                row["achieved_gflops"] = round(achieved, 1)
                row["fraction_of_matmul_peak"] = round(achieved / peak["best_gflops"], 3)
            rows.append(row)
            print(f"  {ours.name} {size}px: encode {enc.ms():.1f} ms, classify {cls.ms():.2f} ms"
                  + (f", {row['flops']['gflops']:.2f} GFLOPs" if do_flops else ""), flush=True)
    report["size_scaling"] = rows
    if not do_scaling:
        return
    teacher = ours_models[0]
    inputs = teacher.inputs(args.throughput_size, 1)
    with torch.inference_mode():
        regions = teacher.encode(inputs)
    enc = timed(lambda: _no_grad_call(teacher.encode, inputs), repeats=args.repeats,
                warmup=args.warmup, budget_s=args.cell_budget_s)
    cls_rows = []
    for n in args.scale_classes:
        text = teacher.text_embeddings(class_names(n))
        cls = timed(lambda text=text: _no_grad_call(teacher.classify, regions, text),
                    repeats=args.repeats, warmup=args.warmup, budget_s=args.cell_budget_s)
        cls_rows.append({"names": n, "classify": cls.summary(),
                         "classify_share": round(cls.ms() / (cls.ms() + enc.ms()), 4)})
    report["classes_scaling"] = {"model": teacher.name, "size": args.throughput_size,
                                 "regions": len(regions[0].proposals), "encode": enc.summary(),
                                 "rows": cls_rows}
    text_rows = []
    cache: dict[str, torch.Tensor] = {}
    for i, n in enumerate(args.text_names):
        counter = iter(range(10**6))
        new = timed(lambda n=n, i=i, counter=counter: teacher.text_embeddings(
            class_names(n, f" new{i}.{next(counter)}")), repeats=args.repeats, warmup=1,
            budget_s=args.cell_budget_s)
        names = class_names(n)
        cache.update(zip(names, teacher.text_embeddings(names), strict=True))
        cached = timed(lambda names=names: torch.stack([cache[x] for x in names]),
                       repeats=args.repeats, warmup=1, budget_s=args.cell_budget_s)
        text_rows.append({"names": n, "new": new.summary(), "cached": cached.summary(),
                          "new_ms_per_name": _r(new.ms() / n, 3)})
        print(f"  text {n} names: new {new.ms():.1f} ms, cached {cached.ms():.3f} ms", flush=True)
    report["text_encoding"] = {"model": teacher.name, "rows": text_rows,
                               "cached_means": "in-memory dict lookup + torch.stack (the service's "
                                               "memory cache; Redis adds a round trip)"}


def _no_grad_call(fn, *a):
    with torch.inference_mode():
        return fn(*a)


def section_train(args, report: dict) -> None:
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    import ovd.models.detector  # noqa: F401
    from ovd.training.train_detector import Trainer, build_config

    torch.manual_seed(0)
    cfg = build_config(TEACHER_CONFIG, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).train()
    model.train_text = F.normalize(torch.randn_like(model.train_text), dim=1)
    opt = Trainer.build_optimizer(cfg, model)
    size = cfg.INPUT.MAX_SIZE_TRAIN
    rng = np.random.default_rng(0)

    def batch(b: int) -> list[dict]:
        out = []
        for i in range(b):
            xy = rng.uniform(0, size - 64, (6, 2))
            wh = rng.uniform(12, 64, (6, 2))
            inst = Instances((size, size))
            inst.gt_boxes = Boxes(torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32))
            inst.gt_classes = torch.tensor(rng.integers(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, 6))
            image = torch.from_numpy(np.ascontiguousarray(scene(size, i).transpose(2, 0, 1)))
            out.append({"image": image, "height": size, "width": size, "instances": inst})
        return out

    def step(data):
        losses = model(data)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows = []
    for b in args.train_batches:
        data = batch(b)
        with EventStorage(0):  # Detectron2's losses log into it
            t = timed(lambda data=data: step(data), repeats=args.train_steps, warmup=1,
                      budget_s=args.cell_budget_s)
        rows.append({"batch": b, "step": t.summary(),
                     "images_per_s": _r(b / (t.ms() / 1000), 2)})
        print(f"  train step batch {b}: {t.ms():.0f} ms", flush=True)
    report["train_step"] = {"config": str(TEACHER_CONFIG.relative_to(ROOT)), "size": size,
                            "init": "random", "boxes_per_image": 6,
                            "includes": "forward, losses, backward, SGD step with the config's "
                                        "gradient clipping; no distillation targets, no data loader",
                            "rows": rows}


def section_proposals(args, report: dict) -> None:
    from ovd.models.clip.model import load_clip
    from ovd.training.proposals import ProposalConfig, propose_image

    if (RENORM_CLIP / "manifest.json").exists():
        clip, clip_note = load_clip(str(RENORM_CLIP)), str(RENORM_CLIP.relative_to(ROOT))
    else:
        torch.manual_seed(0)
        clip = load_clip(RANDOM_CLIP)
        clip_note = (f"{RANDOM_CLIP} with RANDOM weights ({RENORM_CLIP.relative_to(ROOT)} does not "
                     "exist): speed only; with random weights the class filter keeps a different "
                     "number of proposals than a trained CLIP would")
    names = class_names(16)
    with torch.inference_mode():
        text = clip.text_embeddings(names)
    is_base = torch.arange(16) < 11
    rows = []
    for mode in ("dense", "cheap"):
        cfg = ProposalConfig(mode=mode, filter="coco", threads=0)
        images = [torch.from_numpy(np.ascontiguousarray(scene(args.proposal_size, 100 + i)
                                                        .transpose(2, 0, 1)))
                  for i in range(args.proposal_images + 1)]
        stats: list[dict] = []
        counter = iter(range(len(images)))

        def one(cfg=cfg, images=images, stats=stats, counter=counter):
            i = next(counter)
            with torch.inference_mode():
                _, s = propose_image(clip, images[i], text, is_base, torch.zeros(0, 4), cfg, i)
            stats.append(s)

        t = timed(one, repeats=args.proposal_images, warmup=1, budget_s=args.cell_budget_s * 3)
        measured = stats[1:]
        rows.append({"mode": mode, "image": t.summary(),
                     "images_per_s": _r(1 / (t.ms() / 1000), 3),
                     "clip_crops_per_image": float(np.mean([s["clip_crops"] for s in measured])),
                     "prior_forwards_per_image": float(np.mean([s["prior_forwards"] for s in measured])),
                     "anchors_per_image": float(np.mean([s["anchors"] for s in measured]))})
        print(f"  proposals {mode}: {t.ms():.0f} ms/image", flush=True)
    report["proposals"] = {"clip": clip_note, "size": args.proposal_size, "filter": "coco",
                           "vocabulary": "16 names (11 base, 5 novel), no GT boxes", "rows": rows}


# --- section 4: inference speed-ups -------------------------------------------------------------


@contextlib.contextmanager
def channels_last(model) -> Iterator[None]:
    """Backbone weights and input in channels_last for the duration (restored afterwards)."""
    backbone = model.backbone
    forward = backbone.forward
    backbone.to(memory_format=torch.channels_last)
    backbone.forward = lambda x: forward(x.contiguous(memory_format=torch.channels_last))
    try:
        yield
    finally:
        del backbone.forward
        backbone.to(memory_format=torch.contiguous_format)


def _max_diff(a: list, b: list) -> float:
    """Largest absolute difference of boxes and scores of two request outputs (inf if the
    detections differ in number)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        ix, iy = x[0]["instances"], y[0]["instances"]
        if len(ix) != len(iy) or not torch.equal(ix.pred_classes, iy.pred_classes):
            return math.inf
        for p, q in ((ix.pred_boxes.tensor, iy.pred_boxes.tensor), (ix.scores, iy.scores)):
            if len(p):
                worst = max(worst, float((p - q).abs().max()))
    return worst


def section_speedups(args, report: dict, teacher: Ours) -> None:
    size = args.throughput_size
    inputs = teacher.inputs(size, 1)
    text = teacher.text_embeddings(class_names(10))
    model = teacher.model
    reps = max(args.repeats, 2)
    results = []

    def with_no_grad():
        with torch.no_grad():
            return teacher.classify(teacher.encode(inputs), text)

    def with_inference_mode():
        return teacher.request(inputs, text)

    ref = with_inference_mode()
    a, b = alternating(with_no_grad, with_inference_mode, repeats=reps, warmup=1)
    results.append(_compare("torch.no_grad -> torch.inference_mode", a, b,
                            _max_diff(with_no_grad(), ref)))

    def contiguous():
        return teacher.request(inputs, text)

    with channels_last(model):
        out_cl = teacher.request(inputs, text)
    ta, tb = Timing(), Timing()
    for _ in range(1 + reps):  # first pair is warm-up
        start = time.perf_counter()
        contiguous()
        ta.seconds.append(time.perf_counter() - start)
        with channels_last(model):
            start = time.perf_counter()
            teacher.request(inputs, text)
            tb.seconds.append(time.perf_counter() - start)
    ta.seconds, tb.seconds = ta.seconds[1:], tb.seconds[1:]
    results.append(_compare("contiguous -> channels_last (backbone)", ta, tb, _max_diff(out_cl, ref)))

    threads = torch.get_num_threads()
    if threads > 1:
        def one_thread():
            torch.set_num_threads(1)
            try:
                return teacher.request(inputs, text)
            finally:
                torch.set_num_threads(threads)
        a, b = alternating(one_thread, with_inference_mode, repeats=reps, warmup=1)
        results.append(_compare(f"1 -> {threads} intra-op threads", a, b,
                                _max_diff(one_thread(), ref)))

    with torch.inference_mode():
        regions = teacher.encode(inputs)
    enc = timed(lambda: _no_grad_call(teacher.encode, inputs), repeats=reps, warmup=0,
                budget_s=args.cell_budget_s)
    cls = timed(lambda: _no_grad_call(teacher.classify, regions, text), repeats=reps, warmup=1,
                budget_s=args.cell_budget_s)
    share = cls.ms() / (enc.ms() + cls.ms())
    report["speedups"] = {"model": teacher.name, "size": size, "names": 10, "rows": results,
                          "classify_share": round(share, 4),
                          "classify_note": (f"classify is {100 * share:.1f}% of a request at "
                                            f"{size} px / 10 names: fusing it could save at most "
                                            "that")}
    for r in results:
        print(f"  {r['change']}: {r['before_ms']} -> {r['after_ms']} ms ({r['gain_pct']:+.1f}%), "
              f"max |diff| {r['max_abs_diff']}", flush=True)
    if args.profile:
        report["profile"] = profile_request(teacher, inputs, text)


def _compare(change: str, before: Timing, after: Timing, diff: float) -> dict:
    b, a = before.ms(), after.ms()
    return {"change": change, "before_ms": _r(b), "after_ms": _r(a), "n": before.n,
            "gain_pct": round(100 * (b - a) / b, 1), "max_abs_diff": diff}


def profile_request(ours: Ours, inputs: list[dict], text: torch.Tensor, runs: int = 2) -> dict:
    """torch.profiler (CPU) over `runs` requests: top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    ours.request(inputs, text)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            with torch.inference_mode():
                with record_function("encode"):
                    regions = ours.encode(inputs)
                with record_function("classify"):
                    ours.classify(regions, text)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    stages = {e.key: round(e.cpu_time_total / runs / 1000, 2) for e in events
              if e.key in ("encode", "classify")}
    return {"runs": runs, "stage_ms": stages,
            "top_ops": [{"op": e.key, "calls": e.count // runs,
                         "self_ms": round(e.self_cpu_time_total / runs / 1000, 2),
                         "self_pct": round(100 * e.self_cpu_time_total / total, 1)} for e in top]}


# --- report -------------------------------------------------------------------------------------


def _fmt(x, digits: int = 1) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# Speed: our detectors vs OWL-ViT, OWLv2, Grounding DINO (CPU, one process)", "",
        f"- date: {report['date']}",
        f"- machine: {host_line(m)}; {m['cores_usable']} usable; load average (1 min) at start "
        f"{m['load_avg_1m_at_start']:.2f}, at end {report['load_avg_1m_at_end']:.2f}",
        f"- command: `{report['command']}`",
        f"- settings: {json.dumps(s)}",
        "- timings: wall clock, median and p95 over n measured runs after warm-up; a cell stops "
        "early when its runs reach the cell budget (n says how many ran)",
        "",
    ]
    if "anchors" in report:
        a = report["anchors"]
        lines += ["## 1. Latency, throughput and memory", "",
                  "Latency, one image per call:", "",
                  "| model | variant | px | names | n | median ms | p95 ms | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in a["rows"]:
            if not r.get("throughput"):
                lines.append(f"| {r['model']} | {r['variant']} | {r['size']} | {r['names']} | "
                             f"{r['n']} | {_fmt(r['median_ms'])} | {_fmt(r['p95_ms'])} | "
                             f"{r['note']} |")
        if a.get("vocabulary_cost"):
            lines += ["", "What a large cached vocabulary costs us (same image, vocabularies "
                      "alternated run by run; ratio of medians):", "",
                      "| model | px | names | ms | names | ms | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
            for v in a["vocabulary_cost"]:
                lines.append(f"| {v['model']} | {v['size']} | {v['small']} | {v['small_ms']} | "
                             f"{v['large']} | {v['large_ms']} | {v['ratio']:.2f}x |")
        lines += ["", "Throughput by batch size (images/s = batch / median batch time; "
                  "**bold** = the model's best):", "",
                  "| model | variant | px | names | batch | n | median ms | ms/image | img/s | note |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        best: dict[tuple, float] = {}
        for r in a["rows"]:
            if r.get("throughput") and r["images_per_s"]:
                key = (r["model"], r["variant"])
                best[key] = max(best.get(key, 0), r["images_per_s"])
        for r in a["rows"]:
            if r.get("throughput"):
                ips = _fmt(r["images_per_s"], 2)
                if r["images_per_s"] and r["images_per_s"] == best.get((r["model"], r["variant"])):
                    ips = f"**{ips}**"
                lines.append(f"| {r['model']} | {r['variant']} | {r['size']} | {r['names']} | "
                             f"{r['batch']} | {r['n']} | {_fmt(r['median_ms'])} | "
                             f"{_fmt(r['per_image_ms'])} | {ips} | {r['note']} |")
        lines += ["", "Models (memory = peak RSS above the RSS before the model was built, while "
                  "it was built and measured):", "",
                  "| model | params (M) | peak RSS delta MiB | configuration |", "|---|---:|---:|---|"]
        for mm in a["models"]:
            conf = mm.get("config") or mm.get("note")
            extra = {k: mm[k] for k in ("native_size", "text_tokens", "regions_per_image") if k in mm}
            lines.append(f"| {mm['model']} | {mm['params_m']} | {mm['peak_rss_delta_mib']} | "
                         f"{json.dumps(conf) if isinstance(conf, dict) else conf}; "
                         f"{json.dumps(extra)} |")
        lines += ["", "Ratios ours / anchor (latency at batch 1: < 1 means ours is faster; "
                  "'best img/s' compares each model at its best batch size: > 1 means ours is "
                  "faster):", "",
                  "| anchor | variant | px | names | teacher / anchor | student / anchor |",
                  "|---|---|---:|---:|---:|---:|"]
        grouped: dict[tuple, dict] = {}
        for r in a["ratios"]:
            key = (r["anchor"], r["variant"], r["size"], r["names"])
            value = r.get("latency_ratio", r.get("throughput_ratio"))
            grouped.setdefault(key, {})[r["ours"]] = value
        for (anchor, variant, size, names), v in grouped.items():
            what = (f"{size} | {names}" if size is not None else "best img/s | —")
            lines.append(f"| {anchor} | {variant} | {what} | {_fmt(v.get('ours: teacher'), 4)} | "
                         f"{_fmt(v.get('ours: student'), 4)} |")
        lines += ["", "Ours: `encode` + per-image `classify` (matmuls, softmax, NMS) + rescale, text "
                  "embeddings cached. OWL 'text every call': the model's forward with token ids "
                  "(text tower for every name and image); 'cached queries': image_embedder + "
                  "class_predictor + box_predictor (+ objectness for OWLv2) with query embeddings "
                  "computed once. Grounding DINO: one forward per prompt of at most 256 tokens; "
                  "a vocabulary needing several prompts re-runs the whole model per prompt "
                  "(what its users must do). Anchors stop at raw outputs (no threshold/NMS). "
                  "Anchor weights are random: the speed is the published architecture's.", ""]
    if "matmul_peak" in report:
        p = report["matmul_peak"]
        lines += ["## 2-3. FLOPs, achieved FLOP/s and cost vs image size", "",
                  f"float32 matmul peak in this process: {p['best_gflops']} GFLOP/s best, "
                  f"{p['median_gflops']} median (n={p['n']}, {p['runs']} runs).", "",
                  "| model | px | regions | encode ms (median / p95) | classify ms (10 names) | "
                  "GFLOPs (encode) | backbone / RPN / ROI | achieved GFLOP/s | of peak |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in report["size_scaling"]:
            fl = r.get("flops")
            split = " / ".join(f"{v:.2f}" for v in fl["gflops_by_module"].values()) if fl else "—"
            lines.append(f"| {r['model']} | {r['size']} | {r['regions']} | "
                         f"{_fmt(r['encode']['median_ms'])} / {_fmt(r['encode']['p95_ms'])} | "
                         f"{_fmt(r['classify']['median_ms'], 2)} | {_fmt(fl['gflops'], 2) if fl else '—'} | "
                         f"{split} | {_fmt(r.get('achieved_gflops'))} | "
                         f"{_fmt(r.get('fraction_of_matmul_peak'), 3)} |")
        uncounted = {k: v for r in report["size_scaling"] if r.get("flops")
                     for k, v in r["flops"]["uncounted_ops"].items()}
        lines += ["", "FLOPs: fvcore FlopCountAnalysis of a traced `encode` (one multiply-add = "
                  "2 FLOPs here; fvcore itself reports multiply-adds). Ops fvcore does not count "
                  f"(left out of the totals): {', '.join(sorted(uncounted)) or 'none'}.", ""]
    if "classes_scaling" in report:
        c = report["classes_scaling"]
        lines += [f"### Encode vs classify vs number of names ({c['model']}, {c['size']} px, "
                  f"{c['regions']} regions; encode {c['encode']['median_ms']} ms)", "",
                  "| names | classify median ms | p95 ms | classify share of request |",
                  "|---:|---:|---:|---:|"]
        for r in c["rows"]:
            lines.append(f"| {r['names']} | {_fmt(r['classify']['median_ms'], 2)} | "
                         f"{_fmt(r['classify']['p95_ms'], 2)} | {100 * r['classify_share']:.1f}% |")
        t = report["text_encoding"]
        lines += ["", f"### Text encoding ({t['model']}'s CLIP text tower)", "",
                  "| names | new names ms | per new name ms | cached ms |", "|---:|---:|---:|---:|"]
        for r in t["rows"]:
            lines.append(f"| {r['names']} | {_fmt(r['new']['median_ms'])} | "
                         f"{_fmt(r['new_ms_per_name'], 3)} | {_fmt(r['cached']['median_ms'], 3)} |")
        lines += ["", f"Cached: {t['cached_means']}.", ""]
    if "train_step" in report:
        t = report["train_step"]
        lines += [f"### Training step ({t['config']}, {t['size']} px, {t['init']} init)", "",
                  "| batch | n | median ms | p95 ms | images/s |", "|---:|---:|---:|---:|---:|"]
        for r in t["rows"]:
            lines.append(f"| {r['batch']} | {r['step']['n']} | {_fmt(r['step']['median_ms'])} | "
                         f"{_fmt(r['step']['p95_ms'])} | {_fmt(r['images_per_s'], 2)} |")
        lines += ["", f"Includes {t['includes']}.", ""]
    if "proposals" in report:
        p = report["proposals"]
        lines += [f"### Proposal stage ({p['size']} px, filter {p['filter']}, {p['vocabulary']})", "",
                  f"CLIP: {p['clip']}.", "",
                  "| mode | n | ms/image | images/s | anchors | CLIP crops | prior forwards |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in p["rows"]:
            lines.append(f"| {r['mode']} | {r['image']['n']} | {_fmt(r['image']['median_ms'])} | "
                         f"{_fmt(r['images_per_s'], 3)} | {r['anchors_per_image']:.0f} | "
                         f"{r['clip_crops_per_image']:.0f} | {r['prior_forwards_per_image']:.0f} |")
        lines.append("")
    if "speedups" in report:
        sp = report["speedups"]
        lines += [f"## 4. Inference speed-ups ({sp['model']}, {sp['size']} px, {sp['names']} names, "
                  "one request; variants alternated run by run)", "",
                  "| change | n | before ms | after ms | gain | max abs diff of boxes/scores |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in sp["rows"]:
            lines.append(f"| {r['change']} | {r['n']} | {r['before_ms']} | {r['after_ms']} | "
                         f"{r['gain_pct']:+.1f}% | {r['max_abs_diff']:.3g} |")
        lines += ["", f"{sp['classify_note']}.", ""]
    if "profile" in report:
        pr = report["profile"]
        lines += [f"### Profile of one request (torch.profiler, CPU, mean of {pr['runs']} runs; "
                  f"stages ms: {json.dumps(pr['stage_ms'])})", "",
                  "| op | calls | self ms | self % |", "|---|---:|---:|---:|"]
        for r in pr["top_ops"]:
            lines.append(f"| {r['op']} | {r['calls']} | {r['self_ms']} | {r['self_pct']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=ROOT / "artifacts/default", help="teacher export")
    shipped = ROOT / "artifacts" / "student"
    p.add_argument("--student", type=Path, default=shipped if (shipped / "manifest.json").is_file() else None,
                   help="student export (default: artifacts/student when it exists, else a random-weight "
                        "student of the same architecture, speed only)")
    p.add_argument("--sizes", type=_ints, default=[640, 1024], help="square image sides, px")
    p.add_argument("--vocabs", type=_ints, default=[10, 1000], help="vocabulary sizes")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4],
                   help="batch sizes for images/s (at the first size and vocabulary)")
    p.add_argument("--repeats", type=int, default=5, help="measured runs per cell")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs per cell")
    p.add_argument("--cell-budget-s", type=float, default=20.0,
                   help="stop a cell's repeats once they took this long (at least one run)")
    p.add_argument("--anchors", default=",".join(ANCHORS), help=f"subset of {','.join(ANCHORS)}")
    p.add_argument("--owl-name-tokens", type=int, default=5,
                   help="BPE tokens per class name for OWL (plus BOS/EOS, padded to 16)")
    p.add_argument("--gdino-name-tokens", type=int, default=3,
                   help="WordPiece tokens per class name for Grounding DINO (plus ' .')")
    p.add_argument("--gdino-chunks", choices=("sum", "loop"), default="sum",
                   help="multi-prompt vocabularies: 'sum' times one full prompt (and the last) "
                        "and sums the forwards; 'loop' times whole loops")
    p.add_argument("--scale-sizes", type=_ints, default=[256, 512, 640, 1024])
    p.add_argument("--scale-classes", type=_ints, default=[1, 10, 100, 1000])
    p.add_argument("--text-names", type=_ints, default=[1, 10, 100, 1000])
    p.add_argument("--train-batches", type=_ints, default=[1, 2, 4])
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--proposal-images", type=int, default=2, help="measured images per mode")
    p.add_argument("--proposal-size", type=int, default=256)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch intra-op threads")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--profile", action="store_true", help="add torch.profiler's top ops")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 320 px, 10/200 names, batch 1-2, one repeat, small stages")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of speed_anchors.{json,md}")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.vocabs, args.batch_sizes = [320], [10, 200], [1, 2]
        args.repeats, args.warmup, args.cell_budget_s = 1, 1, 10.0
        args.scale_sizes, args.scale_classes, args.text_names = [256, 320], [1, 10, 100], [1, 10, 100]
        args.train_batches, args.train_steps = [1, 2], 1
        args.proposal_images, args.matmul_n = 1, 1024
    args.anchors = [a for a in args.anchors.split(",") if a]
    args.sections = [s for s in args.sections.split(",") if s]
    for a in args.anchors:
        if a not in ANCHORS:
            p.error(f"unknown anchor {a!r}; choose from {ANCHORS}")
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {SECTIONS}")
    args.throughput_size = args.sizes[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/speed_anchors.py",
                          *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    host = host_info()
    started = time.monotonic()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out",)}
    report: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "command": command, "machine": host, "settings": settings}
    print(f"{host_line(host)}; load {host['load_avg_1m_at_start']:.2f}", flush=True)
    if "anchors" in args.sections and args.anchors:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise SystemExit("the anchors need transformers: pip install -c constraints.txt "
                             "-e '.[bench]' (or --anchors '' to measure ours only)") from None
    if "anchors" in args.sections:
        print("1. latency / throughput / memory", flush=True)
        ours = section_anchors(args, report)
    else:
        teacher = load_teacher(args.teacher)
        ours = [teacher, load_student(args.student, teacher.text_embeddings)]
    teacher = ours[0]
    if "flops" in args.sections or "scaling" in args.sections:
        print("2-3. FLOPs, size and vocabulary scaling, text encoding", flush=True)
        section_flops_and_scaling(args, report, ours, "flops" in args.sections,
                                  "scaling" in args.sections)
    if "train" in args.sections:
        print("3. training step", flush=True)
        section_train(args, report)
    if "proposals" in args.sections:
        print("3. proposal stage", flush=True)
        section_proposals(args, report)
    if "speedups" in args.sections:
        print("4. inference speed-ups", flush=True)
        section_speedups(args, report, teacher)
    report["load_avg_1m_at_end"] = os.getloadavg()[0]
    report["wall_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed_anchors.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (args.out / "speed_anchors.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'speed_anchors.json'} and {args.out / 'speed_anchors.md'} "
          f"({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
