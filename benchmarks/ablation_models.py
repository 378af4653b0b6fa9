"""The ablation's trained detectors (benchmarks/ezsd_variants.py: <models>/<row>/seed<k>/), measured
one by one by the benchmarks that reuse them (example_queries.py, score_modes.py), each model's
result kept in a file so that an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path


def ablation_models(models: str | Path, rows: Iterable[str] | None = None) -> list[Path]:
    """Trained model folders (<row>/seed<k> with model_final.pth), of `rows` only when given.

    Raises:
        SystemExit: none was found (the ablation has not trained them yet).
    """
    wanted = None if rows is None else set(rows)
    folders = sorted(f for f in Path(models).glob("*/seed*")
                     if (f / "model_final.pth").is_file() and (wanted is None or f.parent.name in wanted))
    if not folders:
        raise SystemExit(f"no trained model{'' if wanted is None else f' of rows {sorted(wanted)}'} under "
                         f"{models} (run benchmarks/ezsd_variants.py first)")
    return folders


def measure_each(folders: list[Path], work: str | Path, tag: str, measure: Callable[[Path], dict]) -> list[dict]:
    """[measure(folder) for each folder], each result read from work/<row>_<seed>_<tag>.json when
    an earlier run finished it. Results carry "seconds" (printed as each model finishes)."""
    results = []
    for folder in folders:
        done = Path(work) / f"{folder.parent.name}_{folder.name}_{tag}.json"
        if not done.is_file():
            result = measure(folder)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(result))
        results.append(json.loads(done.read_text()))
        print(f"{folder}: {results[-1]['seconds']} s", flush=True)
    return results
