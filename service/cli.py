"""`ovd serve` and `ovd demo`: the service's commands (registered by ovd.training.cli).

Nothing heavy is imported at module level: building the parser must stay fast (`ovd --help`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from pathlib import Path

from ovd.models.registry import REGISTERED, registered_or_path

logger = logging.getLogger("ovd")


# --------------------------------------------------------------------------- demo

def cmd_demo(args: argparse.Namespace) -> int:
    """Serve a trained export and ask it, over HTTP, for classes it never saw boxes of.

    Renders a fresh scene of the synthetic world (a seed no training image used), starts
    `ovd serve` on a free loopback port, sends one POST /v1/detect with the export's novel
    class names plus two base ones, prints the detections and draws them to a PNG."""
    import base64

    import httpx
    from PIL import Image, ImageDraw

    from ovd.models.exported import verify_export
    from ovd.service.launch import ServerProcess
    from ovd.training.data.synthetic import WorldConfig, generate_world

    model_dir = registered_or_path(args.model_dir)
    manifest = verify_export(model_dir)
    out = Path(args.out)
    world_cfg = {**(_load_config(args.config).get("world") or {}), "seed": args.seed, "num_train": 1,
                 "num_val": 1, "num_test": 1, "num_captions": 16, "num_caption_eval": 16}
    generate_world(out / "world", WorldConfig.from_dict(world_cfg), workers=1)
    image_path = out / "world" / "detection" / "val" / "000000.png"
    novel = [c["name"] for c in manifest.get("categories", []) if c["split"] == "novel"]
    base = [c["name"] for c in manifest.get("categories", []) if c["split"] == "base"][:2]
    classes = args.classes or novel + base
    logger.info("serving %s %s (%s) on loopback", manifest["name"], manifest["version"], model_dir)
    with ServerProcess(model_dir, env={"OVD_REDIS_URL": os.environ.get("OVD_REDIS_URL", "")}) as server:
        t0 = time.time()
        r = httpx.post(f"{server.url}/v1/detect", timeout=120, json={
            "image": base64.b64encode(image_path.read_bytes()).decode(), "classes": classes,
            "score_threshold": args.score_threshold})
        latency = time.time() - t0
    if r.status_code != 200:
        logger.error("the service answered %d: %s", r.status_code, r.text)
        return 1
    answer = r.json()
    print(f"POST {server.url}/v1/detect  image {image_path} "
          f"({answer['image']['width']}x{answer['image']['height']}), {latency * 1000:.0f} ms")
    print(f"classes sent: {classes}  (* = novel: no box of it was seen in training)")
    print(f"{'label':<18}{'score':>7}  box [x1, y1, x2, y2] px")
    for d in answer["detections"]:
        mark = "*" if d["label"] in novel else " "
        print(f"{mark}{d['label']:<17}{d['score']:>7.3f}  {[round(v, 1) for v in d['box']]}")
    if not answer["detections"]:
        print(f"(no detection scored >= {args.score_threshold})")
    image = Image.open(image_path).convert("RGB").resize((512, 512), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    scale = 512 / answer["image"]["width"]
    for d in answer["detections"]:
        colour = "red" if d["label"] in novel else "dodgerblue"
        box = [v * scale for v in d["box"]]
        draw.rectangle(box, outline=colour, width=2)
        draw.text((box[0] + 2, box[1] + 1), f"{d['label']} {d['score']:.2f}", fill=colour)
    image.save(out / "detections.png")
    print(f"drawn: {out / 'detections.png'}   serve it yourself: ovd serve --model-dir {model_dir}")
    return 0


# --------------------------------------------------------------------------- serve

def cmd_serve(args: argparse.Namespace) -> int:
    """The detection service: uvicorn running the app of `ovd.service.app.create_app`. Settings
    other than the flags come from OVD_* environment variables (service/settings.py)."""
    import math

    import uvicorn

    from ovd.models.manifest import verify_export
    from ovd.service.settings import Settings

    settings = Settings(**({"model_dir": args.model_dir} if args.model_dir else {}))
    if settings.backend == "torch" and importlib.util.find_spec("torch") is None:
        raise ValueError("OVD_BACKEND=torch needs the full install (scripts/install.sh); this "
                         "environment has no torch (the serve-onnx install): set OVD_BACKEND=onnx")
    manifest = verify_export(settings.model_dir)  # a missing or tampered export fails here, not in a running server
    if settings.backend == "onnx" and "onnx" not in manifest:
        raise ValueError(f"OVD_BACKEND=onnx, but {settings.model_dir} has no ONNX graphs: "
                         f"ovd export --onnx --from-export {settings.model_dir}")
    # h11 rather than httptools: it bounds the headers' size, and our subclass their read time
    # (service/http_protocol.py); the model, not HTTP parsing, is this service's cost.
    options = dict(host=args.host, port=args.port,
                   timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
                   http="ovd.service.http_protocol:HeaderLimitsH11Protocol",
                   h11_max_incomplete_event_size=settings.max_header_bytes)
    if args.workers == 1:
        from ovd.service.app import create_app

        uvicorn.run(create_app(settings), **options)
    else:
        # Each worker is a fresh (spawned) interpreter that imports the app by name and calls the
        # factory without arguments, so its Settings can only come from the environment: the
        # --model-dir flag travels as OVD_MODEL_DIR, like every other setting.
        os.environ["OVD_MODEL_DIR"] = str(settings.model_dir)
        uvicorn.run("ovd.service.app:create_app", factory=True, workers=args.workers, **options)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `demo` to the `ovd` sub-command table."""
    p = sub.add_parser("serve", help="run the detection service (FastAPI + uvicorn)",
                       description="Serve an exported detector over HTTP: POST /v1/detect, a web "
                                   "page at /, API docs at /docs. Other settings come from OVD_* "
                                   "environment variables (service/settings.py).")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-dir", default=None,
                   help="export folder or a shipped model's name "
                        f"({', '.join(sorted(REGISTERED))}; default: $OVD_MODEL_DIR, else default)")
    p.add_argument("--workers", type=int, default=1, help="processes, each holding its own model")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("demo", help="serve a trained export and query it with novel class names",
                       description="Start the service on an export (default: the shipped "
                                   "artifacts/default), send one image of a fresh synthetic scene "
                                   "with novel class names, print and draw the detections.")
    p.add_argument("--config", default=None, help="pipeline config whose world: section renders "
                   "the scene (default: configs/synthetic.yaml)")
    p.add_argument("--model-dir", default="default",
                   help=f"export folder or a shipped model's name ({', '.join(sorted(REGISTERED))}; default: default)")
    p.add_argument("--classes", nargs="*", default=None,
                   help="class names (default: the export's novel classes and two base ones)")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=2026, help="scene seed (training used 0)")
    p.add_argument("--out", default="runs/demo", help="scene and drawing folder (relative to the working directory)")
    p.set_defaults(func=cmd_demo)



def _load_config(path: str | None) -> dict:
    from ovd.training.config import load_config

    return load_config(path)
