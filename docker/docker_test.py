"""`make docker-test`: the images built and run for real, with podman (as here) or Docker.

    python docker/docker_test.py                 # both detector images, podman or docker
    python docker/docker_test.py --images onnx   # only the slim image (a few minutes)

For each image (`cpu`: Dockerfile.cpu; `onnx`: the slim Dockerfile.onnx) it
1. prepares the engine: podman from Debian packages where no engine is there, and, when no image
   registry is reachable, a local Debian base image (mmdebstrap) passed as the build argument
   PYTHON_IMAGE, plus a stand-in Redis image (Dockerfile.redis-local);
2. builds the image (cold, then again from cache) with the Dockerfile's defaults otherwise;
3. starts Redis and the detector from docker/compose.yaml (`podman-compose` or `docker compose`),
   the export mounted read-only, and waits until the healthcheck passes and /readyz says "ready";
4. sends a real /v1/detect with the export's novel class names, with an API key, and checks the
   answer against the same export served outside the container;
5. refuses a tampered weight file and an empty model folder;
6. stops the detector while a request is in flight: the request must finish (graceful drain);
7. measures image size, build times, run-to-ready time, RSS, and detect latency inside vs outside
   the container (the same request alternated between the two servers);
and cleans up the containers, network and volume it created (images stay: they are the cache).
Figures go to benchmarks/results/docker_test.json (docker/README.md quotes them).

Engine differences, in one place (`Engine`): podman here needs runc instead of crun (this host's
hybrid cgroups), a containers.conf without default ulimits and with cgroupfs, fixed ulimits, host
networking and the host's CA bundle mounted for builds; without systemd its healthchecks run only
when asked (`podman healthcheck run`). Docker needs none of that.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ovd.service.launch import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' one rule for "same detections"
from detector_testing import same_detections  # noqa: E402

WORK = ROOT / "runs" / "docker-test"
PROJECT = "ovd-docker-test"
LOCAL_BASE = "localhost/debian-base:bookworm"
LOCAL_REDIS = "localhost/ovd-redis:bookworm"
OFFICIAL_PYTHON = "python:3.11.14-slim-bookworm"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # pip's bundle on this machine kind


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} docker-test: {msg}", flush=True)


def run(cmd: list[str], *, check: bool = True, timeout: float | None = None, env: dict | None = None,
        quiet: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=quiet, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        tail = ((out.stdout or "") + (out.stderr or ""))[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {out.returncode}:\n{tail}")
    return out


@dataclass
class Engine:
    """The container CLI and the arguments this machine needs (see the module docstring)."""

    cli: str
    global_args: list[str] = field(default_factory=list)
    run_args: list[str] = field(default_factory=list)
    build_args: list[str] = field(default_factory=list)
    env: dict = field(default_factory=lambda: dict(os.environ))

    def __call__(self, *args: str, check: bool = True, timeout: float | None = None,
                 quiet: bool = True) -> subprocess.CompletedProcess:
        return run([self.cli, *self.global_args, *args], check=check, timeout=timeout, env=self.env, quiet=quiet)

    @property
    def podman(self) -> bool:
        return Path(self.cli).name == "podman"

    def version(self) -> str:
        return self("--version").stdout.strip()

    def compose(self, files: list[str], *args: str, env: dict) -> subprocess.CompletedProcess:
        paths = [a for f in files for a in ("-f", str(ROOT / "docker" / f))]
        if self.podman:
            cmd = ["podman-compose", "-p", PROJECT, *paths,
                   "--podman-args", " ".join(self.global_args),
                   "--podman-run-args", " ".join(self.run_args), *args]
        else:
            cmd = [self.cli, "compose", "-p", PROJECT, *paths, *args]
        return run(cmd, env={**self.env, **env}, timeout=600)

    def container(self, service: str) -> str:
        names = self("ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                     "--filter", f"label=com.docker.compose.service={service}",
                     "--format", "{{.Names}}").stdout.split()
        if len(names) != 1:
            raise RuntimeError(f"expected one {service} container of {PROJECT}, found {names}")
        return names[0]

    def healthy(self, container: str) -> bool:
        if self.podman:  # no systemd timers here: run the image's HEALTHCHECK now
            return self("healthcheck", "run", container, check=False, timeout=30).returncode == 0
        status = self("inspect", "--format", "{{.State.Health.Status}}", container, check=False)
        return status.stdout.strip() == "healthy"


def find_engine() -> Engine:
    docker = shutil.which("docker")
    if docker and run([docker, "info"], check=False, timeout=30).returncode == 0:
        return Engine(docker)
    if not shutil.which("podman"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise SystemExit("docker-test: no container engine; install podman (or Docker) first")
        log("installing podman, runc, mmdebstrap and podman-compose (Debian packages)")
        run(["apt-get", "install", "-y", "-qq", "podman", "runc", "mmdebstrap", "podman-compose"], timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    WORK.mkdir(parents=True, exist_ok=True)
    conf = WORK / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\n')
    runc = shutil.which("runc") or "/usr/sbin/runc"
    ulimits = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
    build = ["--network", "host", *ulimits]
    if HOST_CA.is_file():
        build += ["-v", f"{HOST_CA}:/run/ovd-build-ca.pem:ro", "--build-arg", "PIP_CERT=/run/ovd-build-ca.pem"]
    return Engine(shutil.which("podman"), ["--runtime", runc], ulimits, build,
                  {**os.environ, "CONTAINERS_CONF": str(conf)})


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    for path in [*Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list")]:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] or (words[:1] == ["deb"] and len(words) > 1):
                    uri = words[1]
                    if "security" not in uri:
                        return uri
    return "http://deb.debian.org/debian"


def base_images(engine: Engine) -> dict[str, str]:
    """Build arguments for the base images: {} where the official images can be pulled, else the
    local Debian base (made once with mmdebstrap) and the local Redis stand-in."""
    if engine("image", "inspect", OFFICIAL_PYTHON, check=False).returncode == 0 or \
            engine("pull", "-q", OFFICIAL_PYTHON, check=False, timeout=120).returncode == 0:
        return {}
    log(f"no registry reachable: local base images ({LOCAL_BASE}, {LOCAL_REDIS})")
    if engine("image", "inspect", LOCAL_BASE, check=False).returncode != 0:
        tar = WORK / "rootfs.tar"
        run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,passwd", "bookworm",
             str(tar), debian_mirror()], timeout=900)
        engine("import", str(tar), LOCAL_BASE, timeout=600)
        tar.unlink()
    # Built every time (from cache when unchanged), so a changed Dockerfile is never stale.
    engine("build", *engine.build_args, "--build-arg", f"BASE_IMAGE={LOCAL_BASE}",
           "-f", str(ROOT / "docker/Dockerfile.redis-local"), "-t", LOCAL_REDIS, str(ROOT), timeout=900)
    return {"PYTHON_IMAGE": LOCAL_BASE, "OVD_REDIS_IMAGE": LOCAL_REDIS}


def build(engine: Engine, flavour: str, bases: dict[str, str]) -> dict:
    """Build ovd-detector:<flavour> twice: as it comes (cold where nothing is cached) and again
    (every layer from cache). Returns the seconds and the image size."""
    args = [*engine.build_args, "-f", str(ROOT / f"docker/Dockerfile.{flavour}"), "-t", f"ovd-detector:{flavour}"]
    if "PYTHON_IMAGE" in bases:
        args += ["--build-arg", f"PYTHON_IMAGE={bases['PYTHON_IMAGE']}"]
    if flavour == "cpu" and "PYTHON_IMAGE" in bases:
        # The CPU-only torch index is not reachable either: PyPI's build, as in CI (bigger image).
        args += ["--build-arg", "OVD_TORCH_INDEX_URL="]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        engine("build", *args, str(ROOT), timeout=3600)
        times.append(time.perf_counter() - t0)
    size = int(engine("image", "inspect", "--format", "{{.Size}}", f"ovd-detector:{flavour}").stdout.strip())
    log(f"ovd-detector:{flavour}: {size / 1e9:.2f} GB, built in {times[0]:.0f} s, from cache in {times[1]:.0f} s")
    return {"build_s": round(times[0], 1), "cached_build_s": round(times[1], 1), "image_bytes": size,
            "torch": ("none" if flavour == "onnx" else
                      "PyPI's build (CPU index unreachable)" if "OVD_TORCH_INDEX_URL=" in args else "the Dockerfile's index")}


def model_folder(flavour: str) -> Path:
    """The export each image serves: the shipped model, with ONNX graphs for the slim image
    (made once by the host's full install: ovd export --onnx)."""
    shipped = ROOT / "artifacts" / "default"
    if flavour != "onnx":
        return shipped
    out = WORK / "onnx-default"
    manifest = out / "manifest.json"
    if not (manifest.is_file() and "onnx" in json.loads(manifest.read_text())):
        log("exporting the shipped model's ONNX graphs for the slim image")
        run([sys.executable, "-m", "ovd", "export", "--onnx", "--from-export", str(shipped), "--out", str(out)],
            timeout=1800)
    return out


def novel_names(model_dir: Path) -> list[str]:
    categories = json.loads((model_dir / "manifest.json").read_text())["categories"]
    return [c["name"] for c in categories if c.get("split") == "novel"]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total


def detect(url: str, key: str, body: dict, timeout: float = 120) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/detect", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{url}/v1/detect answered {r.status_code}: {r.text[:500]}")
    return elapsed, r.json()


def refused(engine: Engine, flavour: str, model_dir: Path) -> tuple[int, str]:
    """Run the image on `model_dir` (no Redis); it must exit by itself. Returns (status, log)."""
    out = engine("run", "--rm", *engine.run_args, "-e", "OVD_REDIS_URL=", "-v", f"{model_dir}:/models/default:ro",
                 f"ovd-detector:{flavour}", check=False, timeout=300)
    return out.returncode, out.stdout + out.stderr


def exercise(engine: Engine, flavour: str, bases: dict[str, str], requests: int) -> dict:
    model_dir = model_folder(flavour)
    subprocess.run(["chmod", "-R", "a+rX", str(model_dir)], check=True)  # user 10001 reads the mount
    key = secrets.token_urlsafe(16)
    names = novel_names(model_dir)
    image = base64.b64encode((ROOT / "service/static/samples/scene-1.jpg").read_bytes()).decode()
    body = {"image": image, "classes": [*names, "square"], "score_threshold": 0.3}
    files = ["compose.yaml"] + (["compose.onnx.yaml"] if flavour == "onnx" else [])
    port = free_port()
    env = {"OVD_MODEL_HOST_DIR": str(model_dir), "OVD_API_KEYS": key, "OVD_PORT": str(port),
           **({"OVD_REDIS_IMAGE": bases["OVD_REDIS_IMAGE"]} if "OVD_REDIS_IMAGE" in bases else {})}
    url = f"http://127.0.0.1:{port}"
    figures: dict = {}
    t0 = time.perf_counter()
    engine.compose(files, "up", "-d", *([] if engine.podman else ["--no-build"]), env=env)
    try:
        detector = engine.container("detector")
        ready = healthy = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (ready and healthy):
            try:
                if ready is None and httpx.get(f"{url}/readyz", timeout=2).json().get("status") == "ready":
                    ready = time.perf_counter() - t0
            except (httpx.HTTPError, ValueError):
                pass
            if ready and healthy is None and engine.healthy(detector):
                healthy = time.perf_counter() - t0
            time.sleep(0.2)
        if not (ready and healthy):
            raise RuntimeError(f"not ready and healthy within 300 s (ready {ready}, healthy {healthy}):\n"
                               + engine("logs", detector, check=False).stderr[-3000:])
        figures["up_to_ready_s"] = round(ready, 1)
        log(f"{flavour}: ready {ready:.1f} s after `up` (Redis connected), healthcheck passed")
        r = httpx.post(f"{url}/v1/detect", json=body, timeout=60)
        assert r.status_code == 401, f"no API key must be refused, got {r.status_code}"
        _, answer = detect(url, key, body)
        found = sorted({d["label"] for d in answer["detections"]} & set(names))
        assert found, f"no novel class found in the sample scene: {answer['detections'][:5]}"
        log(f"{flavour}: /v1/detect found novel {found} ({len(answer['detections'])} detections)")
        figures["novel_found"] = found
        pid = int(engine("inspect", "--format", "{{.State.Pid}}", detector).stdout.strip())
        figures.update(side_by_side(flavour, model_dir, url, key, body, answer, pid, requests))
        figures["stop_drains"] = stop_while_busy(engine, detector, url, key, body)
    finally:
        try:  # keep the detector's log for a failed run; never hide the failure itself
            logs = engine("logs", engine.container("detector"), check=False)
            (WORK / f"detector-{flavour}.log").write_text(logs.stdout + logs.stderr)
        except RuntimeError as e:
            log(f"no detector log: {e}")
        engine.compose(files, "down", env=env)
        engine("volume", "rm", "-f", f"{PROJECT}_redis-data", check=False)
    figures["refuses"] = refusals(engine, flavour, model_dir)
    return figures


def side_by_side(flavour: str, model_dir: Path, url: str, key: str, body: dict, answer: dict,
                 container_pid: int, requests: int) -> dict:
    """The same request alternated between the container and `ovd serve` on the host (same
    export, backend and threads, Redis off), after one warm-up each."""
    env = {"OVD_BACKEND": "onnx" if flavour == "onnx" else "torch", "OVD_REDIS_URL": "",
           "OVD_API_KEYS": key, "OVD_TORCH_THREADS": "2"}
    with ServerProcess(model_dir, env=env) as host:
        _, host_answer = detect(host.url, key, body)
        assert same_detections(answer["detections"], host_answer["detections"], box_tol=0.05, score_tol=1e-3), \
            "container and host answers differ"
        inside, outside = [], []
        for _ in range(requests):
            inside.append(detect(url, key, body)[0])
            outside.append(detect(host.url, key, body)[0])
        host_rss = rss_bytes(host.process.pid)
    container_rss = rss_bytes(container_pid)
    ms = lambda xs: round(1000 * statistics.median(xs), 1)  # noqa: E731
    log(f"{flavour}: detect median {ms(inside)} ms in the container, {ms(outside)} ms on the host; "
        f"RSS {container_rss / 2**20:.0f} MiB vs {host_rss / 2**20:.0f} MiB")
    return {"requests": requests, "detect_ms_container": ms(inside), "detect_ms_host": ms(outside),
            "latency_ratio": round(statistics.median(inside) / statistics.median(outside), 3),
            "rss_mib_container": round(container_rss / 2**20), "rss_mib_host": round(host_rss / 2**20),
            "same_answer_as_host": True}


def stop_while_busy(engine: Engine, detector: str, url: str, key: str, body: dict) -> dict:
    """SIGTERM (`stop`) while a request is being answered: it must still get its 200."""
    # 1,400 names never asked before: seconds of text encoding, so the stop lands mid-request.
    nonce = secrets.token_hex(4)
    busy = {**body, "classes": [f"{c} {i} {nonce}" for i in range(700) for c in ("object", "thing")]}
    result: dict = {}

    def send():
        try:
            result["seconds"], _ = detect(url, key, busy)
            result["status"] = 200
        except Exception as e:  # noqa: BLE001 (reported below)
            result["error"] = repr(e)
        result["done"] = time.perf_counter()

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    engine("stop", "-t", "40", detector, timeout=120)
    stop_s = time.perf_counter() - t0
    thread.join(120)
    code = int(engine("inspect", "--format", "{{.State.ExitCode}}", detector).stdout.strip())
    assert result.get("status") == 200, f"the in-flight request was dropped: {result}"
    assert result["done"] > t0, "the request finished before the stop: nothing was drained"
    assert code == 0, f"the detector exited {code} on SIGTERM (137: killed after the grace period)"
    log(f"stop while busy: the in-flight request finished (200 after {result['seconds']:.1f} s), "
        f"exit {code} after {stop_s:.1f} s")
    return {"request_s": round(result["seconds"], 1), "stop_s": round(stop_s, 1), "exit_code": code}


def refusals(engine: Engine, flavour: str, model_dir: Path) -> dict:
    tampered = WORK / f"tampered-{flavour}"
    shutil.rmtree(tampered, ignore_errors=True)
    shutil.copytree(model_dir, tampered)
    weights = tampered / ("detector.onnx" if flavour == "onnx" else "detector.safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    empty = WORK / "empty-model"
    shutil.rmtree(empty, ignore_errors=True)
    empty.mkdir()
    subprocess.run(["chmod", "-R", "a+rX", str(tampered), str(empty)], check=True)
    code, text = refused(engine, flavour, tampered)
    assert code != 0 and "sha256" in text, f"a tampered {weights.name} was not refused ({code}): {text[-1500:]}"
    empty_code, empty_text = refused(engine, flavour, empty)
    assert empty_code == 78 and "manifest.json missing" in empty_text, (empty_code, empty_text[-1500:])
    weights.write_bytes(model_dir.joinpath(weights.name).read_bytes())
    weights.chmod(0o600)  # root's file, as a careless copy leaves it: user 10001 cannot read it
    private_code, private_text = refused(engine, flavour, tampered)
    assert private_code == 78 and "not readable by uid 10001" in private_text, (private_code, private_text[-1500:])
    log(f"{flavour}: a tampered {weights.name} is refused (exit {code}), an empty folder and an "
        "unreadable weight file too (exit 78, naming the fix)")
    shutil.rmtree(tampered)
    return {"tampered_exit": code, "empty_exit": empty_code, "unreadable_exit": private_code}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="+", choices=["onnx", "cpu"], default=["onnx", "cpu"])
    parser.add_argument("--requests", type=int, default=20, help="timed requests per server")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/docker_test.json"))
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    engine = find_engine()
    log(f"engine: {engine.version()}")
    bases = base_images(engine)
    results = {"command": "make docker-test", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
               "engine": engine.version(), "base_images": bases or "official", "images": {}}
    for flavour in args.images:
        results["images"][flavour] = {**build(engine, flavour, bases), **exercise(engine, flavour, bases, args.requests)}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    log(f"passed; figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
