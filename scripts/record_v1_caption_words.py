"""Record in artifacts/default/manifest.json the words the shipped model's CLIP ever read.

The shipped model predates the `text_words` record (ovd clip pretrain writes it now). Its CLIP
was pretrained from scratch on world v1's 30,000 pretraining captions (seed 0), and world v1's
generator is in git: this script checks out the commit that made the model (V1_COMMIT) into a
temporary worktree, regenerates exactly those captions with that code, and writes their
distinct words into the manifest, as `ovd export` copies them for a model trained today.

    python scripts/record_v1_caption_words.py          # needs the git history (a full clone)
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from ovd.models.model_card import words_of

ROOT = Path(__file__).resolve().parents[1]
V1_COMMIT = "64562f2"  # "Ship the lambda-0.1 default model", 2026-11-22
MANIFEST = ROOT / "artifacts" / "default" / "manifest.json"


def v1_caption_words() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "v1"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), V1_COMMIT],
                       check=True, capture_output=True)
        try:
            package = Path(tmp) / "pkg" / "ovd_v1"  # the old tree as its own package: no clash with ovd
            package.mkdir(parents=True)
            (package / "__init__.py").write_text("")
            (package / "training").symlink_to(tree / "training")
            sys.path.insert(0, str(package.parent))
            synthetic = importlib.import_module("ovd_v1.training.data.synthetic")
            world = yaml.safe_load((tree / "configs" / "synthetic.yaml").read_text())["world"]
            cfg = synthetic.WorldConfig(**{k: v for k, v in world.items()
                                           if k in synthetic.WorldConfig.__dataclass_fields__})
            words = set()
            for i in range(cfg.num_captions):  # the pretraining corpus: RNG domain 10
                words.update(words_of(synthetic.caption_sample(cfg, i, domain=10)[1]))
            return sorted(words)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def main() -> None:
    words = v1_caption_words()
    manifest = json.loads(MANIFEST.read_text())
    manifest["clip"]["text_words"] = {
        "words": words, "source": f"the 30000 pretraining captions of world v1 (seed 0), regenerated with the "
                                  f"generator of commit {V1_COMMIT} (scripts/record_v1_caption_words.py)"}
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(words)} words recorded in {MANIFEST}")


if __name__ == "__main__":
    main()
