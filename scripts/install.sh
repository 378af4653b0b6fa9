#!/usr/bin/env bash
# The one install step of the project: the README's commands, CI and the Dockerfiles all run it.
#
#   scripts/install.sh            venv + pinned torch + Detectron2 + the project (+ dev tools)
#   scripts/install.sh --serve-onnx    venv + the project's torch-free runtime only: onnxruntime
#                                      serves an export's ONNX graphs (no torch, no Detectron2)
#   OVD_VENV=/opt/ovd scripts/install.sh --no-dev --no-redis    (e.g. in an image: docker/)
#   ... --deps-only    everything but the project itself (an image's cached dependency layer)
#
# Idempotent: a second run only checks what is there. Needs python3 >= 3.10 with venv; installs
# redis-server through apt where it is missing (the service and its tests use a real Redis), and
# with the dev tools chromium + chromedriver (the web page is tested in a headless browser).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${OVD_VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEV=1
WITH_REDIS=1
FLAVOUR=full
DEPS_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --no-dev) DEV=0 ;;
    --no-redis) WITH_REDIS=0 ;;
    --serve-onnx) FLAVOUR=serve-onnx; DEV=0 ;;  # the tests need the full install
    --deps-only) DEPS_ONLY=1 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# pip is pinned below 26.3: newer pips refuse Detectron2's sdist (a direct-URL extra). The
# project installs without build isolation (no second download of its build backend), so the
# backend lives in the venv.
"$PY" -m pip install -q --disable-pip-version-check "pip==25.3" "setuptools>=69" wheel

if [ "$FLAVOUR" = full ]; then
  step "torch + torchvision (pinned exactly; see constraints.txt)"
  # OVD_TORCH_INDEX_URL selects the wheel index of the torch build (the Dockerfiles pass the
  # CPU-only or a CUDA index); unset, pip's configured index is used, as before.
  if [ -n "${OVD_TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install -q -c constraints.txt --index-url "$OVD_TORCH_INDEX_URL" torch torchvision
  else
    "$PY" -m pip install -q -c constraints.txt torch torchvision
  fi

  step "Detectron2 (official build if present, else patched v0.6 sdist + pure-PyTorch _C)"
  "$PY" scripts/detectron2_compat/install_detectron2.py
fi

extras=$FLAVOUR
[ "$DEV" = 1 ] && extras="$extras,dev"
if [ "$DEPS_ONLY" = 1 ]; then
  step "the project's dependencies ($extras), without the project"
  # pip has no --only-deps: the requirements are read from pyproject.toml (extras that name the
  # project itself, ovd[...], are expanded), so this layer does not need the sources.
  mapfile -t requirements < <("$PY" - "$extras" <<'PY'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the TOML reader pip itself vendors
    from pip._vendor import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted, seen, out = sys.argv[1].split(","), set(), list(project["dependencies"])
while wanted:
    extra = wanted.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for req in project["optional-dependencies"][extra]:
        if req.startswith(project["name"] + "["):
            wanted += req[len(project["name"]) + 1:-1].split(",")
        else:
            out.append(req)
print("\n".join(out))
PY
)
  "$PY" -m pip install -q -c constraints.txt "${requirements[@]}"
else
  step "the project ($extras)"
  "$PY" -m pip install -q -c constraints.txt --no-build-isolation -e ".[$extras]"
fi

if [ "$WITH_REDIS" = 1 ] && ! command -v redis-server >/dev/null 2>&1; then
  step "redis-server (Debian package)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ "$DEV" = 1 ] && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  step "chromium + chromedriver (Debian packages; the web page's browser test)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

if [ "$FLAVOUR" = full ]; then
  "$PY" - <<'PY'
import detectron2, open_clip, torch, torchvision
print(f"ready: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__}, open_clip {open_clip.__version__}")
PY
else
  "$PY" - <<'PY'
import importlib.util, onnxruntime
torch = "no torch" if importlib.util.find_spec("torch") is None else "torch present from an earlier full install"
print(f"ready (serve-onnx): onnxruntime {onnxruntime.__version__}, {torch}")
PY
fi
