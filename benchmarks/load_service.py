"""Bounded load test of the detection service over loopback: latency and throughput per cell.

By default the script starts its own Redis (`redis-server` on a free loopback port) and a real
service process (`ovd.service.launch.ServerProcess`: uvicorn, the production app) on `--model-dir`.
When that folder does not exist it builds a detector export with random weights (the synthetic
R18-FPN architecture and the project's CLIP text tower) into a temporary folder and says so:
latencies are then those of the real architecture, the detections are meaningless.

Cells (each a fixed number of POST /v1/detect requests, JSON body with a base64 PNG):

* concurrency 1, 4 and 16 with a warm vocabulary of 10 names;
* cold vocabulary (fresh, never seen class names in every request) vs warm (the same names,
  already embedded and cached);
* 10 vs 1000 class names;
* the abuse mix (`abuse_mix`): normal requests, one at a time, while other clients send what
  costs most (batches of huge-dimension images, 1,000 never-seen names x 4 templates at score
  threshold 0) and half of them hang up after 0.5 s: the normal requests' p50/p95, the
  status codes everyone got, the server's peak RSS and the work it counted as abandoned.

The run is bounded twice: `--requests` per cell and `--time-cap-s` for the whole run (a cell
that would start after the cap is reported as skipped, one cut short says so). Only loopback
targets are accepted. Results go to stdout and to benchmarks/results/load_service.{json,md}.

Usage:
    python benchmarks/load_service.py                     # own Redis + server, defaults
    python benchmarks/load_service.py --requests 50 --model-dir runs/synthetic/export
    python benchmarks/load_service.py --url http://127.0.0.1:8000   # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from host_info import host_info
from PIL import Image, ImageDraw

from ovd.service.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black",
          "pink", "brown", "grey", "cyan", "teal", "olive", "navy", "maroon"]
SHAPES = ["disk", "ring", "square", "triangle", "star", "cross", "heart", "hexagon",
          "diamond", "arrow", "crescent", "pentagon", "oval", "frame", "bar", "spiral"]
SIZES = ["small", "large", "tiny", "huge"]
WARMUP_REQUESTS = 5  # unmeasured, before the first cell: first-call allocations, lazy imports


@dataclass(frozen=True)
class Cell:
    """One measured configuration."""

    name: str
    concurrency: int
    num_classes: int
    cold: bool


CELLS = [
    Cell("warm, 10 names, c=1", concurrency=1, num_classes=10, cold=False),
    Cell("warm, 10 names, c=4", concurrency=4, num_classes=10, cold=False),
    Cell("warm, 10 names, c=16", concurrency=16, num_classes=10, cold=False),
    Cell("cold, 10 names, c=1", concurrency=1, num_classes=10, cold=True),
    Cell("warm, 1000 names, c=1", concurrency=1, num_classes=1000, cold=False),
    Cell("cold, 1000 names, c=1", concurrency=1, num_classes=1000, cold=True),
]


@dataclass
class CellResult:
    """Latencies (ms) of the successful requests of one cell, and what went wrong."""

    cell: Cell
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.latencies_ms) + self.errors

    def summary(self) -> dict:
        """The row of the results table (percentiles by linear interpolation)."""
        lat = np.asarray(self.latencies_ms)
        ok = len(lat) > 0
        return {
            "cell": self.cell.name, "concurrency": self.cell.concurrency,
            "num_classes": self.cell.num_classes, "cold": self.cell.cold, "n": self.n,
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if ok else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if ok else None,
            "req_per_s": round(len(lat) / self.wall_s, 2) if ok and self.wall_s > 0 else None,
            "errors": self.errors, "wall_s": round(self.wall_s, 2), "note": self.note,
        }


# --- targets and the processes the script starts ------------------------------------------------


def require_loopback(url: str) -> str:
    """Return url without a trailing slash; exit when its host is not a loopback address."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing {url!r}: load tests target loopback addresses only")
    return url.rstrip("/")


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Run a throwaway redis-server on a free loopback port; yields its redis:// URL."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not found (scripts/install.sh installs it); or use --no-redis")
    sys.path.append(str(ROOT / "tests"))  # the tests' throwaway Redis: tests/redis_testing.py
    from redis_testing import redis_process

    with redis_process() as (url, _):
        yield url


def random_export(out: Path) -> Path:
    """Write a detector export with random weights (the synthetic world's architecture)."""
    import torch
    import torch.nn.functional as F
    from detectron2.modeling import build_model

    from ovd.models.clip.model import architecture_config, load_clip
    from ovd.models.exported import write_export
    from ovd.training.train_detector import build_config

    arch = "ovd-vit-tiny-64"
    torch.manual_seed(0)
    clip = load_clip(arch)
    cfg = build_config(ROOT / "configs/detector/synthetic_r18_fpn.yaml",
                       ["MODEL.OVD.EMBED_DIM", clip.embed_dim])
    model = build_model(cfg).eval()
    model.train_text = F.normalize(torch.randn(cfg.MODEL.ROI_HEADS.NUM_CLASSES, clip.embed_dim),
                                   dim=1)
    write_export(out, model=model, cfg=cfg, clip=clip, clip_arch=architecture_config(arch),
                 manifest_fields={"name": "random-benchmark", "version": "0", "categories": [],
                                  "metrics": {}})
    return out


# --- requests -------------------------------------------------------------------------------


def scene_png(size: int, seed: int = 0) -> str:
    """Base64 PNG of a deterministic scene: textured ground with a few coloured shapes."""
    rng = np.random.default_rng(seed)
    ground = rng.normal(110, 25, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(ground)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.integers(0, size - 40, 2)
        w = int(rng.integers(12, 40))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([int(x), int(y), int(x) + w, int(y) + w], fill=color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def vocabulary(n: int) -> list[str]:
    """n distinct, readable class names ("small red disk", ...); the same on every call."""
    names = [f"{s} {c} {h}" for s in SIZES for c in COLORS for h in SHAPES]
    if n > len(names):
        raise SystemExit(f"at most {len(names)} class names")
    return names[:n]


def fresh_names(n: int, rng: random.Random) -> list[str]:
    """n class names never sent before: the vocabulary with random suffixes (a cache miss)."""
    return [f"{name} {rng.getrandbits(40):010x}" for name in vocabulary(n)]


async def measure_cell(client: httpx.AsyncClient, url: str, cell: Cell, *, requests: int,
                       image_b64: str, deadline: float, rng: random.Random) -> CellResult:
    """Send `requests` detections with `cell.concurrency` workers; stop early at the deadline."""
    result = CellResult(cell)
    warm_names = vocabulary(cell.num_classes)

    def body() -> dict:
        names = fresh_names(cell.num_classes, rng) if cell.cold else warm_names
        return {"image": image_b64, "classes": names, "score_threshold": 0.3,
                "max_detections": 100}

    if not cell.cold:  # embed and cache the names first: the cell measures cache hits
        (await client.post(f"{url}/v1/detect", json=body())).raise_for_status()
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.monotonic() < deadline:
            issued += 1
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/detect", json=body())
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                result.latencies_ms.append((time.perf_counter() - start) * 1000)
            else:
                result.errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(cell.concurrency)))
    result.wall_s = time.perf_counter() - start
    if result.n < requests:
        result.note = f"time cap reached after {result.n} of {requests} requests"
    return result


async def run_cells(url: str, *, requests: int, time_cap_s: float, image_b64: str,
                    headers: dict, seed: int) -> list[CellResult]:
    """Warm the server up, then measure every cell in order within the total time cap."""
    deadline = time.monotonic() + time_cap_s
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=max(c.concurrency for c in CELLS))
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
        for _ in range(WARMUP_REQUESTS):
            (await client.post(f"{url}/v1/detect", json={
                "image": image_b64, "classes": vocabulary(10)})).raise_for_status()
        results = []
        for cell in CELLS:
            if time.monotonic() >= deadline:
                results.append(CellResult(cell, note="skipped: time cap reached"))
                continue
            results.append(await measure_cell(client, url, cell, requests=requests,
                                              image_b64=image_b64, deadline=deadline, rng=rng))
            print(f"  {cell.name}: done", flush=True)
    return results


# --- the abuse mix ----------------------------------------------------------------------------


def _blank_png(side: int) -> str:
    """base64 of a few-KB PNG that decodes to side x side pixels: cheap to send, dear to decode."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def abuse_mix(url: str, image_b64: str, *, seconds: float, headers: dict | None = None,
                    abusers: int = 3, seed: int = 0) -> dict:
    """Normal requests (10 warm names, one at a time) for `seconds` while `abusers` clients loop
    over expensive requests, every other one abandoned after 0.5 s.

    Returns:
        {"normal": CellResult summary fields, "normal_statuses", "abuse_statuses" (status or
        "gone" -> count), "abandoned" (ovd_abandoned_jobs_total by stage, from /metrics)}.
    """
    rng = random.Random(seed)
    huge = {"images": [_blank_png(4000)] * 4, "classes": vocabulary(10)}
    deadline = time.monotonic() + seconds
    normal = CellResult(Cell("normal requests under the abuse mix", concurrency=1, num_classes=10, cold=False))
    normal_statuses: dict[str, int] = {}
    abuse_statuses: dict[str, int] = {}

    def count(table: dict, key) -> None:
        table[str(key)] = table.get(str(key), 0) + 1

    async with httpx.AsyncClient(headers=headers, timeout=120) as client:
        normal_body = {"image": image_b64, "classes": vocabulary(10), "score_threshold": 0.3}
        (await client.post(f"{url}/v1/detect", json=normal_body)).raise_for_status()  # warm names

        async def abuser(k: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                if (n + k) % 2:
                    route, body = "/v1/detect/batch", huge
                else:
                    route, body = "/v1/detect", {"image": image_b64, "score_threshold": 0.0,
                                                 "classes": fresh_names(1000, rng),
                                                 "templates": ["a photo of a {}", "a {}", "the {}", "a drone photo of a {}"]}
                try:
                    r = await client.post(f"{url}{route}", json=body, timeout=0.5 if n % 2 else 120)
                    count(abuse_statuses, r.status_code)
                except httpx.TimeoutException:
                    count(abuse_statuses, "gone")

        async def normal_client() -> None:
            await asyncio.sleep(1.0)  # let the abusers fill the server first
            while time.monotonic() < deadline:
                start = time.perf_counter()
                r = await client.post(f"{url}/v1/detect", json=normal_body)
                count(normal_statuses, r.status_code)
                if r.status_code == 200:
                    normal.latencies_ms.append((time.perf_counter() - start) * 1000)
                else:
                    normal.errors += 1

        start = time.perf_counter()
        await asyncio.gather(normal_client(), *(abuser(k) for k in range(abusers)))
        normal.wall_s = time.perf_counter() - start
        metrics = (await client.get(f"{url}/metrics")).text
    abandoned: dict[str, float] = {}
    for stage, value in re.findall(r'^ovd_abandoned_jobs_total\{stage="(\w+)"\} (\S+)$', metrics, re.M):
        abandoned[stage] = float(value)
    return {"normal": normal.summary(), "normal_statuses": normal_statuses, "abuse_statuses": abuse_statuses,
            "abandoned_jobs": abandoned}


# --- report -----------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    """The results as a markdown document: machine, command, server, table, notes."""
    m, s = report["machine"], report["server"]
    lines = [
        "# Load test of the detection service (loopback)", "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['platform']}, Python {m['python']}, torch {m['torch']}; load average (1 min) "
        f"before the run: {m['load_avg_1m_at_start']:.2f}",
        f"- command: `{report['command']}`",
        f"- server: {s['target']}; model: {s['model']}; torch threads: {s['torch_threads']}; "
        f"Redis: {s['redis']}",
        f"- requests: {report['requests_per_cell']} per cell, POST /v1/detect with one "
        f"{report['image_size']} px PNG (JSON, base64); total time cap {report['time_cap_s']} s",
        "",
        "| cell | n | p50 ms | p95 ms | req/s | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["cells"]:
        values = [row["p50_ms"], row["p95_ms"], row["req_per_s"]]
        cols = " | ".join("—" if v is None else str(v) for v in values)
        lines.append(f"| {row['cell']} | {row['n']} | {cols} | {row['errors']} |")
    notes = [f"{row['cell']}: {row['note']}" for row in report["cells"] if row["note"]]
    lines += ["", "Warm: the names were embedded by a request before the cell (cache hits). Cold: "
              "every request sends names never seen before (random suffixes), so each one "
              "embeds all of its names. Latency is client-side, from send to full response; the "
              "client runs on the same cores as the server."]
    lines += [f"- {note}" for note in notes]
    abuse = report.get("abuse_mix")
    if abuse:
        n = abuse["normal"]
        lines += ["", "## Abuse mix", "",
                  "Normal requests (10 warm names, one at a time) while 3 clients loop over batches of 4 PNGs "
                  "of 4000x4000 px and requests with 1,000 never-seen names x 4 templates at score threshold 0, "
                  "every other one abandoned after 0.5 s.", "",
                  f"- normal requests: n {n['n']}, p50 {n['p50_ms']} ms, p95 {n['p95_ms']} ms, statuses "
                  f"{abuse['normal_statuses']}",
                  f"- abusive requests: statuses {abuse['abuse_statuses']} (gone: the client hung up)",
                  f"- work dropped because its client left (ovd_abandoned_jobs_total): {abuse['abandoned_jobs']}",
                  f"- server peak RSS: {abuse.get('server_peak_rss_mb', 'not measured (server not started here)')} MiB"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "artifacts/default",
                   help="export folder; a random-weight export is built when it does not exist")
    p.add_argument("--url", help="measure a server already running here (loopback only) "
                                 "instead of starting Redis and a server")
    p.add_argument("--api-key", default=os.environ.get("OVD_BENCH_API_KEY", ""),
                   help="bearer key for --url (the started server gets a random one)")
    p.add_argument("--requests", type=int, default=40, help="requests per cell")
    p.add_argument("--time-cap-s", type=float, default=240, help="total measuring time cap")
    p.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="OVD_TORCH_THREADS of the started server")
    p.add_argument("--image-size", type=int, default=256, help="side of the test image, px")
    p.add_argument("--no-redis", action="store_true", help="start the server without Redis")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--abuse-s", type=float, default=30, help="seconds of the abuse mix (0: skip it)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of load_service.{json,md}")
    return p.parse_args(argv)


@contextlib.contextmanager
def started_server(args: argparse.Namespace, api_key: str) -> Iterator[tuple[str, dict]]:
    """Start Redis (unless --no-redis) and the service; yields (base URL, what was started)."""

    with contextlib.ExitStack() as stack:
        model_dir, model_note = args.model_dir, str(args.model_dir)
        if not (model_dir / "manifest.json").exists():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ovd-bench-")))
            print(f"{model_dir} has no export: building one with random weights in {tmp}",
                  flush=True)
            model_dir = random_export(tmp / "export")
            model_note = (f"random-weight export (synthetic R18-FPN, 256 px; {args.model_dir} "
                          "did not exist): latency only, detections meaningless")
        redis_url = "" if args.no_redis else stack.enter_context(redis_server())
        env = {"OVD_REDIS_URL": redis_url, "OVD_API_KEYS": api_key,
               "OVD_TORCH_THREADS": str(args.torch_threads)}
        server = stack.enter_context(ServerProcess(model_dir, env=env))
        yield server.url.rstrip("/"), {
            "pid": server.process.pid,
            "target": "started here (ovd.service.launch.ServerProcess, uvicorn)",
            "model": model_note, "torch_threads": args.torch_threads,
            "redis": "none" if args.no_redis else "redis-server on loopback (started here)",
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/load_service.py",
                          *(sys.argv[1:] if argv is None else argv)])
    image_b64 = scene_png(args.image_size, args.seed)
    host = host_info()
    if args.url:
        stack = contextlib.nullcontext((require_loopback(args.url), {
            "target": f"{args.url} (already running)", "model": "as configured there",
            "torch_threads": "as configured there", "redis": "as configured there"}))
        api_key = args.api_key
    else:
        api_key = f"bench-{random.Random().getrandbits(64):016x}"
        stack = started_server(args, api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with stack as (url, server):
        require_loopback(url)
        print(f"measuring {url}: {len(CELLS)} cells x {args.requests} requests, "
              f"cap {args.time_cap_s:.0f} s", flush=True)
        results = asyncio.run(run_cells(url, requests=args.requests, time_cap_s=args.time_cap_s,
                                        image_b64=image_b64, headers=headers, seed=args.seed))
        abuse = None
        if args.abuse_s > 0:
            print(f"  abuse mix for {args.abuse_s:.0f} s", flush=True)
            abuse = asyncio.run(abuse_mix(url, image_b64, seconds=args.abuse_s, headers=headers, seed=args.seed))
            if "pid" in server:
                abuse["server_peak_rss_mb"] = round(peak_rss_mb(server.pop("pid")), 1)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "machine": host, "server": server,
        "requests_per_cell": args.requests, "time_cap_s": args.time_cap_s,
        "image_size": args.image_size, "cells": [r.summary() for r in results], "abuse_mix": abuse,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_service.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "load_service.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'load_service.json'} and {args.out / 'load_service.md'}")
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
