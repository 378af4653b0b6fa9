"""A PNG that shows a generated world at a glance: detection scenes with their boxes (each
novel tier its own line style and tag), a category legend by tier, and caption-corpus samples
with their captions.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

# Line style and tag of a box per tier; a category with no tier is drawn by its split.
TIER_STYLE = {"base": ("-", ""), "novel": ("--", "N"), "novel_comp": ("--", "C"),
              "novel_shape": (":", "S"), "novel_both": ("-.", "B")}


def _tier(category: dict) -> str:
    return category.get("tier", category["split"])


def write_preview(world_dir: str | Path, out_png: str | Path, *, num_scenes: int = 4,
                  num_captions: int = 8) -> Path:
    """Render the preview of the world in world_dir to out_png and return its path."""
    world_dir = Path(world_dir)
    world = json.loads((world_dir / "world.json").read_text())
    cats = {c["id"]: c for c in world["categories"]}
    cmap = plt.get_cmap("tab20")
    colour = {cid: cmap(i % 20) for i, cid in enumerate(sorted(cats))}
    val = json.loads((world_dir / "detection" / "annotations" / "val.json").read_text())
    cap_images = np.load(world_dir / "captions" / "pretrain.npy", mmap_mode="r")
    cap_rows = (world_dir / "captions" / "pretrain.jsonl").read_text().splitlines()[:num_captions]

    fig = plt.figure(figsize=(4 * num_scenes, 4 * 1.9 + 2.2), dpi=80)
    per_row = max(1, -(-len(cap_rows) // 2))  # caption images per row, two rows
    grid = fig.add_gridspec(3, max(num_scenes, per_row) * 2, height_ratios=[4, 1.6, 1.6])
    for k, img_info in enumerate(val["images"][:num_scenes]):
        ax = fig.add_subplot(grid[0, 2 * k:2 * k + 2])
        ax.imshow(Image.open(world_dir / "detection" / "val" / img_info["file_name"]))
        for a in (a for a in val["annotations"] if a["image_id"] == img_info["id"]):
            x, y, w, h = a["bbox"]
            style, tag = TIER_STYLE[_tier(cats[a["category_id"]])]
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.5, ec=colour[a["category_id"]],
                                   ls=style))
            if tag:
                ax.text(x, y - 1, tag, color="white", fontsize=8, weight="bold")
        ax.set_title(f"val {img_info['file_name']}", fontsize=9)
        ax.axis("off")
    for k, row in enumerate(cap_rows):
        r, c = divmod(k, per_row)
        ax = fig.add_subplot(grid[1 + r, 2 * c:2 * c + 1])
        ax.imshow(cap_images[k])
        ax.set_title(json.loads(row)["caption"], fontsize=7, loc="left")
        ax.axis("off")
    handles = [Patch(fc="none", ec=colour[cid], ls=TIER_STYLE[_tier(c)][0],
                     label=f"{c['name']} ({_tier(c)})")
               for cid, c in sorted(cats.items(), key=lambda kv: (list(TIER_STYLE).index(_tier(kv[1])), kv[0]))]
    fig.legend(handles=handles, loc="lower right", ncol=2, fontsize=8, frameon=False,
               title="categories by tier (C/S/B tags: novel, never boxed in training)", title_fontsize=8)
    fig.suptitle("synthetic open-vocabulary world: detection scenes (top), caption corpus (bottom)")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")
    plt.close(fig)
    return out_png
