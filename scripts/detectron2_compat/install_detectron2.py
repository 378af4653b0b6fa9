#!/usr/bin/env python
"""Install detectron2 v0.6 into the running Python environment, compiling nothing.

Usage (with the project's virtual environment)::

    .venv/bin/python scripts/detectron2_compat/install_detectron2.py [--force]

Detectron2 is not on the package index under its own name. The sdist ``pb1-detectron2==0.6``
carries detectron2 v0.6's Python code and model-zoo configs but none of its C++/CUDA sources
(``detectron2/layers/csrc`` is missing), so it does not build as published. This script:

1. downloads that sdist with this interpreter's pip and checks its SHA-256;
2. applies small, explicit patches (each asserts that it found the text it replaces, so a
   changed sdist fails loudly instead of installing something half-patched);
3. copies ``_C.py`` from this directory in as ``detectron2/_C.py`` (pure-PyTorch replacement
   for the compiled extension);
4. installs detectron2's runtime dependencies with torch/torchvision pinned by a constraints
   file, then the patched tree with ``--no-build-isolation --no-deps``;
5. smoke-checks the result in a fresh interpreter: builds a small Faster R-CNN from a model-zoo
   config and runs one CPU forward pass.

It is idempotent: when ``import detectron2`` and ``from detectron2 import _C`` already work
(an official compiled build, or an earlier run of this script) it says so and exits 0.
``--force`` reinstalls anyway. Exits non-zero with a message on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

# The project pins torch exactly; nothing installed here may move it.
TORCH_PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}

# detectron2 v0.6's install_requires, minus what no runtime path needs: black (only
# LazyConfig.to_py pretty-printing), future and pydot (Caffe2 export), dataclasses (py<3.7).
# iopath's "<0.1.10" cap is dropped: fvcore 0.1.5.post20221221 only asks for iopath>=0.1.7, so
# environments already hold 0.1.10, and detectron2 v0.6 works with it (smoke check and tests).
RUNTIME_REQUIREMENTS = (
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
)

# pip >= 26.3 refuses to build this sdist's metadata because its "all" extra has a direct URL.
PIP_TOO_NEW = (26, 3)

COMPAT_C = Path(__file__).resolve().parent / "_C.py"

SMOKE_CHECK = r"""
import torch
from detectron2 import _C, model_zoo
from detectron2.config import get_cfg
from detectron2.layers import nms_rotated
from detectron2.layers.rotated_boxes import pairwise_iou_rotated
from detectron2.modeling import build_model

boxes = torch.tensor([[0.0, 0.0, 4.0, 2.0, 0.0], [0.0, 0.0, 2.0, 4.0, 90.0]])
assert torch.allclose(pairwise_iou_rotated(boxes, boxes), torch.ones(2, 2), atol=1e-5)
assert nms_rotated(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]

cfg = get_cfg()
cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
cfg.MODEL.DEVICE = "cpu"
cfg.MODEL.WEIGHTS = ""
cfg.MODEL.RESNETS.DEPTH = 18
cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
cfg.MODEL.FPN.OUT_CHANNELS = 64
cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
cfg.INPUT.MIN_SIZE_TEST = 128
cfg.INPUT.MAX_SIZE_TEST = 128
model = build_model(cfg).eval()
image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8).float()
with torch.no_grad():
    (out,) = model([{"image": image, "height": 128, "width": 128}])
instances = out["instances"]
assert instances.image_size == (128, 128), instances.image_size
print(f"{type(model).__name__} forward ok: {len(instances)} detections; "
      f"_C ovd compat: {getattr(_C, '__ovd_compat__', False)}")
"""

PROBE = r"""
import detectron2
from detectron2 import _C
print(detectron2.__version__, getattr(_C, "__ovd_compat__", False), _C.__file__, sep="\n")
"""


class InstallError(RuntimeError):
    """Any failure that should end the install with a message and a non-zero exit."""


def log(message: str) -> None:
    print(f"[install_detectron2] {message}", flush=True)


def run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run ``cmd``; return its stdout, or raise InstallError with the output's tail."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise InstallError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def pip(*args: str, what: str) -> str:
    base = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    return run([*base, *args], what)


# --------------------------------------------------------------------------------------------
# Patches. Each takes the unpacked sdist root and edits it in place.


def _replace(path: Path, old: str, new: str, count: int = 1) -> None:
    """Replace exactly ``count`` occurrences of ``old`` in ``path``, or raise."""
    text = path.read_text()
    found = text.count(old)
    if found != count:
        raise InstallError(
            f"patch target not found as expected in {path.name}: expected {count} occurrence(s) "
            f"of {old!r}, found {found}. The sdist changed; review the patches."
        )
    path.write_text(text.replace(old, new))


def patch_setup_build_no_extension(src: Path) -> None:
    """setup.py: build no C++ extension; ``detectron2/_C.py`` replaces it.

    The sdist lacks ``detectron2/layers/csrc``, so ``get_extensions()`` would compile nothing
    useful (and needs a compiler and, for CUDA, nvcc).
    """
    _replace(
        src / "setup.py",
        "    ext_modules=get_extensions(),\n"
        '    cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},\n',
        "    ext_modules=[],\n",
    )


def patch_setup_package_data(src: Path) -> None:
    """setup.py: list the model-zoo configs as package data explicitly.

    ``get_model_zoo_configs()`` symlinks a top-level ``configs/`` into the package and globs
    ``configs/**`` relative to the working directory; the sdist has no top-level ``configs/``
    (it carries the copy under ``detectron2/model_zoo/configs``), so that glob is empty and no
    config would be installed.
    """
    configs = src / "detectron2" / "model_zoo" / "configs"
    n_yaml = len(list(configs.rglob("*.yaml"))) if configs.is_dir() else 0
    if n_yaml == 0:
        raise InstallError(
            f"the sdist carries no model-zoo configs (expected YAML files under {configs}); "
            "model_zoo.get_config_file() could not work, so the install is stopped."
        )
    _replace(
        src / "setup.py",
        '    package_data={"detectron2.model_zoo": get_model_zoo_configs()},\n',
        '    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},\n',
    )


def patch_setup_requirements(src: Path) -> None:
    """setup.py: declare the requirements actually installed (see RUNTIME_REQUIREMENTS), and drop
    the "all" extra's direct-URL requirement, which newer pips refuse in metadata."""
    setup_py = src / "setup.py"
    text = setup_py.read_text()
    block = re.compile(r"    install_requires=\[\n.*?\n    \],\n", re.DOTALL)
    matches = block.findall(text)
    if len(matches) != 1 or '"black==21.4b2"' not in matches[0]:
        raise InstallError("setup.py: install_requires block not found as expected; review")
    listed = "".join(f"        {json.dumps(req)},\n" for req in RUNTIME_REQUIREMENTS)
    text = block.sub(lambda _: f"    install_requires=[\n{listed}    ],\n", text)
    url_req = re.compile(r'\n\s*"panopticapi @ [^"\n]+",')
    if len(url_req.findall(text)) != 1:
        raise InstallError("setup.py: panopticapi direct-URL extra not found as expected")
    setup_py.write_text(url_req.sub("", text))


def patch_pillow_linear(src: Path) -> None:
    """Pillow >= 10 removed ``Image.LINEAR``, an alias of ``Image.BILINEAR`` (same filter)."""
    _replace(
        src / "detectron2" / "data" / "transforms" / "transform.py",
        "interp=Image.LINEAR,",
        "interp=Image.BILINEAR,",
    )


_NUMPY_ALIASES = re.compile(r"\bnp\.(bool|int|float|str|object)\b")


def patch_numpy_aliases(src: Path) -> None:
    """numpy >= 1.24 removed ``np.bool/int/float/str/object``, aliases of the builtins."""
    changed = []
    for path in sorted([*src.glob("detectron2/**/*.py"), *src.glob("projects/**/*.py")]):
        text = path.read_text()
        new, n = _NUMPY_ALIASES.subn(r"\1", text)
        if n:
            path.write_text(new)
            changed.append(f"{path.relative_to(src)} ({n})")
    if not changed:
        raise InstallError("numpy alias patch found no np.bool/np.int/np.float; review")
    log(f"  numpy aliases replaced in: {', '.join(changed)}")


def patch_model_zoo_pkg_resources(src: Path) -> None:
    """model_zoo.py: locate configs next to the module instead of via ``pkg_resources``.

    setuptools >= 81 no longer ships ``pkg_resources``. The error now names the directory
    searched, and says when the configs are missing altogether.
    """
    model_zoo = src / "detectron2" / "model_zoo" / "model_zoo.py"
    _replace(model_zoo, "import pkg_resources\n", "")
    _replace(
        model_zoo,
        "    cfg_file = pkg_resources.resource_filename(\n"
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        "    )\n"
        "    if not os.path.exists(cfg_file):\n"
        '        raise RuntimeError("{} not available in Model Zoo!".format(config_path))\n',
        '    configs_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")\n'
        "    if not os.path.isdir(configs_dir):\n"
        "        raise RuntimeError(\n"
        '            "detectron2 model-zoo configs are not installed (no directory {}); "\n'
        '            "reinstall with ovd\'s scripts/detectron2_compat/install_detectron2.py "\n'
        '            "--force".format(configs_dir)\n'
        "        )\n"
        "    cfg_file = os.path.join(configs_dir, config_path)\n"
        "    if not os.path.exists(cfg_file):\n"
        "        raise RuntimeError(\n"
        '            "{} not available in Model Zoo (looked in {})!".format(config_path, configs_dir)\n'
        "        )\n",
    )


def patch_nms_rotated(src: Path) -> None:
    """layers/nms.py: call ``_C.nms_rotated``; ``torch.ops.detectron2`` only exists when the
    compiled extension registered it."""
    nms_py = src / "detectron2" / "layers" / "nms.py"
    _replace(
        nms_py,
        "from torchvision.ops import nms  # BC-compat\n",
        "from torchvision.ops import nms  # BC-compat\n\nfrom detectron2 import _C\n",
    )
    _replace(
        nms_py,
        "return torch.ops.detectron2.nms_rotated(boxes, scores, iou_threshold)",
        "return _C.nms_rotated(boxes, scores, iou_threshold)",
    )


def add_compat_extension(src: Path) -> None:
    """Copy the pure-PyTorch ``_C.py`` in as ``detectron2/_C.py``."""
    package = src / "detectron2"
    existing = sorted(p.name for p in package.glob("_C*"))
    if existing or (package / "layers" / "csrc").exists():
        raise InstallError(f"the sdist unexpectedly ships extension files: {existing or 'csrc'}")
    shutil.copyfile(COMPAT_C, package / "_C.py")


PATCHES: tuple[Callable[[Path], None], ...] = (
    patch_setup_build_no_extension,
    patch_setup_package_data,
    patch_setup_requirements,
    patch_pillow_linear,
    patch_numpy_aliases,
    patch_model_zoo_pkg_resources,
    patch_nms_rotated,
    add_compat_extension,
)


# --------------------------------------------------------------------------------------------
# Steps.


def installed_detectron2() -> tuple[str, bool, str] | None:
    """``(version, is_ovd_compat, _C file)`` if detectron2 and its ``_C`` import, else None."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if proc.returncode != 0:
        return None
    version, compat, c_file = proc.stdout.strip().splitlines()[-3:]
    return version, compat == "True", c_file


def check_environment() -> None:
    pip_version = importlib.metadata.version("pip")
    if tuple(int(p) for p in re.findall(r"\d+", pip_version)[:2]) >= PIP_TOO_NEW:
        raise InstallError(
            f"pip {pip_version} refuses the {SDIST_NAME} sdist (direct-URL extra in its "
            f"metadata); install pip<{'.'.join(map(str, PIP_TOO_NEW))} in this environment."
        )
    for name, pin in TORCH_PINS.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or have.split("+")[0] != pin:
            raise InstallError(
                f"{name}=={pin} must be installed first (found {have}); the sdist's setup.py "
                "imports torch, and this installer must not change the torch stack."
            )


def download_sdist(dest: Path) -> Path:
    requirement = f"{SDIST_NAME}=={SDIST_VERSION}"
    # Building the sdist's metadata runs its setup.py, which imports torch: no build isolation.
    pip(
        *("download", "--quiet", "--no-deps", "--no-build-isolation", "--no-binary", ":all:"),
        *(requirement, "-d", str(dest)),
        what=f"downloading {requirement}",
    )
    archives = list(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise InstallError(f"expected one sdist archive in {dest}, found {archives}")
    digest = hashlib.sha256(archives[0].read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise InstallError(
            f"{archives[0].name} has SHA-256 {digest}, expected {SDIST_SHA256}; refusing to "
            "patch an sdist that differs from the one the patches were written for."
        )
    return archives[0]


def unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        # The archive matched the pinned SHA-256, so its members are known; the "data" filter is
        # defence in depth where Python has it (3.10.12+ / 3.11.4+; Debian bookworm's 3.11.2 lacks it).
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    roots = [p for p in dest.iterdir() if p.is_dir()]
    if len(roots) != 1 or not (roots[0] / "setup.py").is_file():
        raise InstallError(f"unexpected sdist layout in {archive.name}: {roots}")
    return roots[0]


def install(src: Path, constraints: Path) -> None:
    common = ("install", "--quiet", "--progress-bar", "off", "-c", str(constraints))
    pip(*common, *RUNTIME_REQUIREMENTS, what="installing detectron2's runtime dependencies")
    pip(
        *common,
        *("--no-build-isolation", "--no-deps", "--force-reinstall", str(src)),
        what="installing the patched detectron2",
    )


def smoke_check() -> str:
    out = run([sys.executable, "-c", SMOKE_CHECK], "smoke check", cwd=Path(tempfile.gettempdir()))
    return out.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 works")
    args = parser.parse_args(argv)
    start = time.monotonic()

    def step(message: str) -> None:
        log(f"{message} [{time.monotonic() - start:.1f} s]")

    try:
        found = installed_detectron2()
        if found and not args.force:
            version, compat, c_file = found
            kind = "ovd pure-PyTorch _C" if compat else "compiled _C"
            log(f"detectron2 {version} already installed ({kind}: {c_file}); nothing to do.")
            if compat and Path(c_file).read_bytes() != COMPAT_C.read_bytes():
                log(f"note: installed _C.py differs from {COMPAT_C}; rerun with --force.")
            return 0

        check_environment()
        with tempfile.TemporaryDirectory(prefix="ovd-detectron2-") as tmp_name:
            tmp = Path(tmp_name)
            step(f"downloading {SDIST_NAME}=={SDIST_VERSION}")
            archive = download_sdist(tmp / "download")
            src = unpack(archive, tmp / "src")
            for patch in PATCHES:
                step(f"patch: {patch.__name__}")
                patch(src)
            constraints = tmp / "constraints.txt"
            constraints.write_text("".join(f"{n}=={v}\n" for n, v in TORCH_PINS.items()))
            step("installing runtime dependencies and the patched detectron2")
            install(src, constraints)

        step("smoke check: model-zoo Faster R-CNN forward on CPU")
        log(f"  {smoke_check()}")
        step("done")
        return 0
    except (InstallError, OSError, tarfile.TarError) as err:
        print(f"[install_detectron2] FAILED: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
