"""Per-case results of an evaluation as a table: one row per case (its name, label, prediction and any per-sample
scores of the engine's output), written as CSV when the evaluation completes. The main job's report reads these
tables to give every figure its bootstrap interval and the number of cases behind it."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

__all__ = ["CaseTable", "read_case_table"]


def _scalar(value: Any) -> float:
    tensor = torch.as_tensor(value).detach().reshape(-1)
    return float(tensor[0]) if tensor.numel() == 1 else float("nan")


class CaseTable:
    """Collect one row per case from a MONAI evaluator's (decollated) output and write ``path`` when its epoch
    completes.

    Columns: ``case`` (:func:`monai_kdx.transforms.case_name` of the image's file, relative to ``data_root``),
    ``label``, ``pred`` (the argmax of the ``pred`` scores), ``correct`` and each of ``keys`` (per-sample scalars,
    e.g. ``cam_pointing_game``; NaN where a case has none).

    Args:
        path: the CSV to write (its folder is created; written atomically).
        keys: per-sample scalar entries of the output to record.
        data_root: the dataset's folder, for the case names.
        image_key: the output entry whose metadata names the case.
    """

    def __init__(
        self, path: str, keys: Sequence[str] = (), data_root: str | None = None, image_key: str = "image"
    ) -> None:
        self.path, self.keys, self.data_root, self.image_key = path, list(keys), data_root, image_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        from monai_kdx.transforms import case_name

        output = engine.state.output
        items = output if isinstance(output, Sequence) and not isinstance(output, Mapping) else [output]
        for item in items:
            image = item.get(self.image_key)
            meta = getattr(image, "meta", {}) or {}
            source = meta.get("filename_or_obj", f"case_{len(self.rows)}")
            label = _scalar(item["label"]) if "label" in item else float("nan")
            pred = int(torch.as_tensor(item["pred"]).reshape(-1).argmax()) if "pred" in item else -1
            row = {"case": case_name(source, self.data_root), "label": label, "pred": pred}
            row["correct"] = float(pred == label) if not math.isnan(label) and pred >= 0 else float("nan")
            row.update({key: _scalar(item[key]) if key in item else float("nan") for key in self.keys})
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["case", "label", "pred", "correct", *self.keys])
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(temporary, self.path)


def read_case_table(path: str) -> list[dict[str, Any]]:
    """The rows of a :class:`CaseTable` CSV, numbers as floats (``case`` stays a string)."""
    with open(path, newline="") as stream:
        return [
            {key: value if key == "case" else float(value) for key, value in row.items()}
            for row in csv.DictReader(stream)
        ]
