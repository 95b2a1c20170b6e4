"""Explanation benchmarks: every registered explanation method compared on the 2D chest X-ray and the 3D brain MRI
datasets (localization, faithfulness, randomization sanity check, time per image), through the same code as
``monai-kdx compare-explanations``; the markdown table and the PNG go to the results folder."""

from __future__ import annotations

import json
import time
from typing import Any

from common import benchmark, one_torch_thread, results_dir

KINDS = {"chest-xray-2d": "2d", "brain-mri-3d": "3d"}


@benchmark
def explanation_comparison(quick: bool) -> dict[str, Any]:
    """All methods against the random baseline on the bundles' teacher (trained briefly here; the quick run uses a
    small student), one torch thread so per-image times do not depend on what else the machine runs."""
    from monai_kdx.apps.compare_explanations import run_comparison
    from monai_kdx.explain.comparison import comparison_markdown, write_report

    start = time.perf_counter()
    with one_torch_thread():
        comparisons = [run_comparison(kind, quick=quick, progress=not quick) for kind in KINDS]
    seconds = time.perf_counter() - start
    paths = write_report(comparisons, results_dir(), stem="explanation_comparison_report")
    print(comparison_markdown(comparisons))
    written = json.loads(paths["json"].read_text())  # NaN already written as null
    result: dict[str, Any] = {
        "threads": 1,
        "total_seconds": seconds,
        "report": {key: str(path) for key, path in paths.items()},
        "details": {c["name"]: c["details"] for c in written},
        "rows": {c["name"]: c["rows"] for c in written},
    }
    for comparison in comparisons:
        rows = {r["method"]: r for r in comparison.rows}
        short, random, cam = KINDS[comparison.name], rows["random"], rows["gradcam"]
        scored = [r for r in comparison.rows if r["method"] != "random" and r["error"] is None]
        best = max(scored, key=lambda r: r["pointing_game"])
        result[f"best_pointing_game_{short}"] = best["method"]
        result[f"ratio_{short}_best_pointing_game_minus_random"] = best["pointing_game"] - random["pointing_game"]
        result[f"ratio_{short}_gradcam_deletion_auc_to_random"] = cam["deletion_auc"] / random["deletion_auc"]
        for other in ("integrated_gradients", "occlusion", "lrp"):
            result[f"ratio_{short}_{other}_to_gradcam_time"] = (
                rows[other]["seconds_per_image"] / cam["seconds_per_image"]
            )
        result[f"methods_failing_sanity_check_{short}"] = [
            r["method"] for r in scored if r["randomization_similarity"] > 0.5
        ]
    return result
