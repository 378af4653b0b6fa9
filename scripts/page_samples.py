"""Write the web page's sample scenes (service/static/samples/scene-*.jpg) from the synthetic
world's test split: `python scripts/page_samples.py` (deterministic: the world is seeded)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ovd.training.data.synthetic import WorldConfig, detection_sample

OUT = Path(__file__).resolve().parents[1] / "service" / "static" / "samples"
SCENES = (0, 1, 2)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for k, index in enumerate(SCENES, 1):
        image, _ = detection_sample(WorldConfig(), "test", index)
        Image.fromarray(image).save(OUT / f"scene-{k}.jpg", quality=92)
        print(OUT / f"scene-{k}.jpg")


if __name__ == "__main__":
    main()
