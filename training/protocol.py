"""The measurement protocol every training benchmark follows.

* **val for choices, test for reports.** A benchmark makes every choice (lambda, schedule,
  thresholds) on ``val`` and reports ``test``; a cell records which split it measured.
* **Paired seeds.** A cell is one row (a training recipe) trained and evaluated with one seed;
  the seed fixes initialisation and data order, so seed k of row A and seed k of row B see the
  same images in the same order, and their difference is a paired sample.
* **Intervals, not rankings.** A row is reported as its mean over seeds with a 95% Student-t
  interval; a contrast (row B - row A) as the mean of the per-seed differences with its own
  t interval. A claim is made only where that interval excludes 0 (`verdict`); otherwise the
  words are "no measurable effect".
* **Cells are resumable and committed.** Each finished cell's metrics are one small JSON file
  under ``benchmarks/results/cells/<benchmark>/<split>/<row>/seed<k>.json``, written atomically
  with the digest of the recipe that produced it; a cell whose recipe changed is stale and is
  re-run. A table that takes many hours on 2 cores is completed over several sessions.

Metric keys (percent): ``ap50_<group>`` and ``ap_<group>`` for the groups ``all``, ``base``,
``novel`` and each tagged novel tier (``novel_comp``, ``novel_shape``, ``novel_both``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from scipy import stats

#: The table's headline metrics, in display order.
HEADLINE = ("ap50_novel_comp", "ap50_novel_shape", "ap50_novel_both", "ap50_novel", "ap50_base",
            "ap50_all", "ap_novel", "ap_all")


def flat_metrics(result: Mapping) -> dict[str, float]:
    """`ovd.training.evaluate.evaluate`'s nested result -> {"ap50_novel": 31.2, "ap_novel": ...}."""
    out = {}
    for group, r in result.items():
        if isinstance(r, Mapping) and "AP50" in r:
            out[f"ap50_{group}"] = round(float(r["AP50"]), 3)
            out[f"ap_{group}"] = round(float(r["AP"]), 3)
    return out


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Mean and two-sided Student-t interval of independent samples (one per seed).

    One sample has no interval: (value, (nan, nan)).
    """
    x = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    if len(x) == 0:
        return float("nan"), (float("nan"), float("nan"))
    mean = float(x.mean())
    if len(x) < 2:
        return mean, (float("nan"), float("nan"))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, (mean - half, mean + half)


def verdict(diff: float, ci: tuple[float, float], what: str = "") -> str:
    """The words a README may use for a contrast: a signed effect only where its CI excludes 0."""
    lo, hi = ci
    figure = f"{diff:+.1f} [{lo:+.1f}, {hi:+.1f}]"
    if math.isnan(lo) or lo <= 0 <= hi:
        return f"no measurable effect{' on ' + what if what else ''} ({figure})"
    return f"{'higher' if diff > 0 else 'lower'}{' ' + what if what else ''}: {figure}"


def recipe_digest(recipe: Mapping) -> str:
    """Short sha256 of a JSON-able recipe: what a cell's result depends on."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CellStore:
    """Finished cells of one benchmark: ``<folder>/<split>/<row>/seed<k>.json``.

    Each file holds {"row", "seed", "split", "recipe", "metrics", ...info}; `get` returns it
    only when its recipe digest matches the caller's (otherwise the cell is stale).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, split: str, row: str, seed: int) -> Path:
        return self.folder / split / row / f"seed{seed}.json"

    def get(self, split: str, row: str, seed: int, recipe: str) -> dict | None:
        path = self.path(split, row, seed)
        if not path.is_file():
            return None
        cell = json.loads(path.read_text())
        return cell if cell.get("recipe") == recipe else None

    def put(self, split: str, row: str, seed: int, recipe: str, metrics: Mapping[str, float],
            **info) -> Path:
        path = self.path(split, row, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        cell = {"row": row, "seed": seed, "split": split, "recipe": recipe, "metrics": dict(metrics),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cell, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path


def summarise_row(per_seed: Mapping[int, Mapping[str, float]]) -> dict:
    """{"seeds": [{"seed": k, metric: x, ...}, ...], "mean": {metric: x}, "ci95": {metric: [lo, hi]}}."""
    metrics = sorted({k for m in per_seed.values() for k in m})
    summary: dict = {"seeds": [{"seed": s, **m} for s, m in per_seed.items()], "mean": {}, "ci95": {}}
    for k in metrics:
        mean, (lo, hi) = mean_ci(m.get(k, float("nan")) for m in per_seed.values())
        summary["mean"][k] = round(mean, 2)
        summary["ci95"][k] = [round(lo, 2), round(hi, 2)]
    return summary


def paired_contrast(a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]],
                    metrics: Iterable[str] = HEADLINE) -> dict:
    """B - A over the seeds both rows finished: per metric the mean paired difference, its
    95% t interval and the verdict.

    Returns:
        {"seeds": [...], "diff_mean": {m: x}, "diff_ci95": {m: [lo, hi]}, "verdict": {m: str}}.
    """
    seeds = sorted(set(a) & set(b))
    out: dict = {"seeds": seeds, "diff_mean": {}, "diff_ci95": {}, "verdict": {}}
    for m in metrics:
        diffs = [b[s][m] - a[s][m] for s in seeds if m in a[s] and m in b[s]]
        mean, ci = mean_ci(diffs)
        out["diff_mean"][m] = round(mean, 2)
        out["diff_ci95"][m] = [round(ci[0], 2), round(ci[1], 2)]
        out["verdict"][m] = verdict(mean, ci)
    return out


def commit_cell(path: Path, message: str) -> bool:
    """`git commit` one finished cell file (nothing else) in the repository that holds it, so
    a run that outlives its session leaves every finished cell in history (also when the run
    itself executes from another checkout). Returns False (and leaves the file) when git
    refuses, e.g. outside a repository or while another commit holds the index."""
    repo = path.resolve().parent
    for _ in range(5):
        add = subprocess.run(["git", "-C", str(repo), "add", "--", str(path)], capture_output=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "-C", str(repo), "commit", "-q", "-m", message, "--", str(path)],
            capture_output=True).returncode == 0
        if done:
            return True
        time.sleep(2)
    return False
