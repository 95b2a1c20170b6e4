"""The comparison report of explanation methods: rows, markdown, PNG, the CLI subcommand and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from monai_kdx.apps.compare_explanations import network_spec_for, run_comparison
from monai_kdx.cli import main
from monai_kdx.explain.comparison import (
    METRICS,
    RANDOM_BASELINE,
    ExplainerComparison,
    compare_explainers,
    comparison_markdown,
    write_report,
)
from monai_kdx.networks import ShallowCNN, build_network
from monai_kdx.registry import EXPLAINERS

# cheap settings of the costly methods, so every registered method runs in seconds
CHEAP = {
    "integrated_gradients": {"n_steps": 3},
    "smoothgrad": {"n_samples": 2},
    "gradient_shap": {"n_samples": 2},
    "occlusion": {"grid": 4},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _tiny_case(
    spatial_dims: int, size: int, batch: int = 3
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    network = ShallowCNN(spatial_dims, 1, 3, channels=(4, 8, 8), hidden=8).eval()
    images = torch.randn(batch, 1, *[size] * spatial_dims)
    masks = torch.zeros_like(images)
    masks[(slice(None), 0, *[slice(2, 7)] * spatial_dims)] = 1
    return network, images, masks, torch.arange(batch) % 3


@pytest.fixture(scope="module")
def tiny_rows() -> dict[int, list[dict]]:
    """Rows of every registered method on a tiny 2D and a tiny 3D network (one torch thread, restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: the per-test one_thread fixture does not cover it
    rows = {}
    try:
        for dims, size in ((2, 32), (3, 16)):
            network, images, masks, labels = _tiny_case(dims, size)
            rows[dims] = compare_explainers(
                network, images, masks, labels, options=CHEAP, faithfulness_steps=3, sanity_images=1, progress=False
            )
    finally:
        torch.set_num_threads(threads)
    return rows


@pytest.mark.parametrize("dims", [2, 3])
def test_every_method_gives_finite_numbers(tiny_rows, dims):
    rows = tiny_rows[dims]
    assert [r["method"] for r in rows] == [*EXPLAINERS.names(), RANDOM_BASELINE]
    for row in rows:
        assert row["error"] is None, row
        for key in METRICS:
            if row["method"] == RANDOM_BASELINE and key == "randomization_similarity":
                assert math.isnan(row[key])  # a baseline, not a method: no sanity check
                continue
            assert math.isfinite(row[key]), (row["method"], key, row[key])
        assert 0 <= row["pointing_game"] <= 1 and 0 <= row["relevance_mass"] <= 1
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
        assert 0 <= row.get("randomization_similarity", 0) <= 1 or math.isnan(row["randomization_similarity"])
        assert row["seconds_per_image"] >= 0
    assert rows[0]["seconds_per_image"] > 0


def test_markdown_has_one_row_per_method_and_the_metric_columns(tiny_rows):
    text = comparison_markdown([ExplainerComparison("tiny 2D", tiny_rows[2], {"network": "ShallowCNN"})], "Title")
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["method", *(title for title, _ in METRICS.values()), "options"]
    assert set(table[1].replace("|", "")) == {"-"}
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [cells[0] for cells in body] == [r["method"] for r in tiny_rows[2]]
    assert all(len(cells) == len(header) for cells in body)
    gradcam = next(cells for cells in body if cells[0] == "gradcam")
    row = next(r for r in tiny_rows[2] if r["method"] == "gradcam")
    assert float(gradcam[1]) == pytest.approx(row["pointing_game"], abs=5e-4)
    assert float(gradcam[3]) == pytest.approx(row["deletion_auc"], abs=5e-4)
    assert "- network: ShallowCNN" in text and text.startswith("# Title")
    assert "n_steps=3" in text  # the options used are stated


def test_write_report_writes_markdown_a_real_png_and_json(tmp_path, tiny_rows):
    import matplotlib.image

    comparisons = [ExplainerComparison("2D", tiny_rows[2]), ExplainerComparison("3D", tiny_rows[3])]
    paths = write_report(comparisons, tmp_path / "out")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(paths["png"])
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels[..., :3].std() > 0.05  # something is drawn
    payload = json.loads(paths["json"].read_text())
    assert [c["name"] for c in payload] == ["2D", "3D"]
    assert payload[1]["rows"][-1]["randomization_similarity"] is None  # NaN is written as null
    assert paths["markdown"].read_text().count("| gradcam |") == 2


class SpotDetector(nn.Module):
    """Class 1 scores the brightest 3x3 neighbourhood of the image (a fixed box filter, then a global max); class 0
    is a constant. The evidence for class 1 is exactly where the bright spot is."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1] = 1.0 / 9
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
            self.head.bias.copy_(torch.tensor([2.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).amax(dim=(2, 3)))


def test_methods_that_localize_beat_random_on_a_network_with_a_known_answer():
    generator = torch.Generator().manual_seed(1)
    batch, size = 8, 32
    images = 0.1 * torch.rand(batch, 1, size, size, generator=generator)
    masks = torch.zeros_like(images)
    corners = torch.randint(0, size - 4, (batch, 2), generator=generator)
    for i, (row, column) in enumerate(corners.tolist()):  # rows and columns differ: a transposed map would miss
        images[i, 0, row : row + 4, column : column + 4] += 4.0
        masks[i, 0, row : row + 4, column : column + 4] = 1
    assert not torch.equal(corners[:, 0], corners[:, 1])
    network = SpotDetector().eval()
    rows = compare_explainers(
        network,
        images,
        masks,
        torch.ones(batch, dtype=torch.long),
        methods=["occlusion", "gradcam"],
        options={"occlusion": {"window": 4, "stride": 2, "grid": None}, "gradcam": {"layers": ["conv"]}},
        tolerance=0,
        faithfulness_steps=10,
        sanity_images=0,
        progress=False,
    )
    by_method = {r["method"]: r for r in rows}
    random = by_method[RANDOM_BASELINE]
    assert random["pointing_game"] <= 0.25  # the spot covers 16 of 1024 pixels
    for name in ("occlusion", "gradcam"):
        row = by_method[name]
        assert row["error"] is None, row
        assert row["pointing_game"] >= 0.875, row
        assert row["relevance_mass"] > random["relevance_mass"] + 0.2, row
        assert row["deletion_auc"] < random["deletion_auc"] - 0.1, row  # deleting the spot first kills the score
        assert row["insertion_auc"] > random["insertion_auc"] + 0.1, row


def test_a_failing_method_is_reported_not_fatal():
    class Broken:
        def __init__(self, network: nn.Module) -> None:
            pass

        def attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("out of luck")

    EXPLAINERS.register("broken_for_test", Broken)
    try:
        network, images, masks, labels = _tiny_case(2, 32, batch=2)
        rows = compare_explainers(
            network, images, masks, labels, methods=["broken_for_test", "saliency"], sanity_images=0, progress=False
        )
    finally:
        EXPLAINERS.unregister("broken_for_test")
    assert rows[0]["error"] == "RuntimeError: out of luck"
    assert all(math.isnan(rows[0][key]) for key in METRICS)
    assert rows[1]["error"] is None and math.isfinite(rows[1]["pointing_game"])
    assert "| broken_for_test | failed: RuntimeError: out of luck |" in comparison_markdown(
        [ExplainerComparison("x", rows)]
    )


class CountingNetwork(ShallowCNN):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CountingNetwork.calls += 1
        return super().forward(x)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["gradcam", "grad_cam"]}, "valid methods: .*'gradcam'.*'occlusion'"),
        ({"methods": []}, "no methods"),
        ({"images": torch.zeros(0, 1, 32, 32)}, "no images"),
        ({"masks": torch.ones(2, 1, 16, 16)}, r"expected \(2, 1, 32, 32\)"),
        ({"masks": torch.zeros(2, 1, 32, 32)}, "every mask is empty"),
        ({"masks": torch.full((2, 1, 32, 32), 0.5)}, "binary"),
        ({"labels": torch.tensor([0, 1, 2])}, "labels has 3 entries for a batch of 2"),
        ({"labels": torch.tensor([0.0, 1.7])}, "labels entry 1 is 1.7, not a whole-number class index"),
        ({"labels": torch.tensor([0, 7])}, "out of range"),
        ({"images": torch.zeros(2, 1, 8, 8, 8)}, "spatial dimensions"),
    ],
)
def test_bad_input_fails_before_any_forward_pass(change, message):
    network = CountingNetwork(2, 1, 3, channels=(4, 8))
    arguments = {
        "images": torch.randn(2, 1, 32, 32),
        "masks": torch.ones(2, 1, 32, 32),
        "labels": torch.tensor([0, 1]),
        "methods": None,
        **change,
    }
    CountingNetwork.calls = 0
    with pytest.raises(ValueError, match=message):
        compare_explainers(network, **arguments, progress=False)
    assert CountingNetwork.calls == 0


def test_masks_without_channel_axis_are_accepted():
    network, images, masks, labels = _tiny_case(2, 32, batch=2)
    rows = compare_explainers(
        network, images, masks[:, 0], labels, methods=["saliency"], include_random=False, sanity_images=0,
        progress=False,
    )  # fmt: skip
    assert [r["method"] for r in rows] == ["saliency"] and rows[0]["error"] is None


def test_run_comparison_explains_a_bundle_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save({"model": build_network(network_spec_for("teacher", 2, 3)).state_dict()}, path)
    comparison = run_comparison("chest-xray-2d", quick=True, checkpoint=path, methods=["gradcam"], progress=False)
    assert comparison.name == "chest-xray-2d"
    assert "DenseNet121" in comparison.details["network"] and str(path) in comparison.details["weights"]
    assert [r["method"] for r in comparison.rows] == ["gradcam", RANDOM_BASELINE]
    assert comparison.rows[0]["error"] is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_comparison("chest-xray-2d", quick=True, checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="valid kinds"):
        run_comparison("knee-ct", quick=True)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--methods", "gradcam,nope"], "valid methods"),
        (["--kind", "knee-ct"], "valid kinds"),
        (["--checkpoint", "missing.pt"], "KIND=PATH"),
        (["--kind", "brain-mri-3d", "--checkpoint", "missing.pt"], "no file"),
        (["--n-images", "0"], "--n-images must be >= 1"),
        (["--tracking-uri", "http://127.0.0.1:9"], "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    ],
)
def test_cli_bad_input_fails_clearly_before_work(tmp_path, capsys, arguments, message):
    out = tmp_path / "report"
    assert main(["compare-explanations", "--quick", "--out", str(out), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_names_a_corrupt_checkpoint_before_work(tmp_path, capsys):
    out, checkpoint = tmp_path / "report", tmp_path / "model.pt"
    checkpoint.write_bytes(b"PK\x03\x04 truncated")
    arguments = ["--kind", "brain-mri-3d", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main(["compare-explanations", *arguments]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "model.pt' is corrupt or not a PyTorch checkpoint" in error[0]
    assert not out.exists() and not (tmp_path / "data").exists()


def test_cli_quick_writes_the_three_files(tmp_path, subprocess_env):
    command = [
        sys.executable, "-m", "monai_kdx.cli", "compare-explanations", "--quick", "--threads", "1",
        "--methods", "gradcam,occlusion,integrated_gradients", "--out", str(tmp_path / "report"),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = tmp_path / "report"
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "report.md", "report.png"]
    markdown = (folder / "report.md").read_text()
    assert "## chest-xray-2d" in markdown and "## brain-mri-3d" in markdown
    for method in ("gradcam", "occlusion", "integrated_gradients", RANDOM_BASELINE):
        assert markdown.count(f"| {method} |") == 2
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"
    payload = json.loads((folder / "report.json").read_text())
    assert [c["name"] for c in payload] == ["chest-xray-2d", "brain-mri-3d"]
    for comparison in payload:
        for row in comparison["rows"][:-1]:
            assert row["error"] is None and all(isinstance(row[key], float) for key in METRICS), row
    assert "| gradcam |" in result.stdout and "report.png" in result.stdout
    # the same tables and every score in an MLflow run
    from monai_kdx.tracking import latest_run, run_summary

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    logged = run_summary(uri, latest_run(uri, "compare_explanations"))
    assert {"report/report.md", "report/report.png", "report/report.json"} <= set(logged["artifacts"])
    gradcam = next(row for row in payload[1]["rows"] if row["method"] == "gradcam")
    assert logged["metrics"]["brain-mri-3d/gradcam/pointing_game"] == pytest.approx(gradcam["pointing_game"])


def test_run_comparison_is_reproducible_for_a_seed():
    results = []
    for noise in range(2):
        torch.manual_seed(100 + noise)  # the global random state must not matter
        comparison = run_comparison("chest-xray-2d", quick=True, methods=["gradcam", "saliency"], progress=False)
        results.append(
            (
                comparison.details["test accuracy"],
                [(r["pointing_game"], r["relevance_mass"], r["deletion_auc"]) for r in comparison.rows],
            )
        )
    assert results[0] == results[1]
