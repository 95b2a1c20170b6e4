"""Tests of monai_kdx.data: anatomy, lesions, gaze, determinism, splits, shortcut markers and dataset files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import monai_kdx.data as data
from monai_kdx.data import (
    BrainMRIGenerator,
    ChestXRayGenerator,
    DatasetExistsError,
    RetinaGenerator,
    SyntheticGenerator,
    ensure_dataset,
    fixations_to_binary_map,
    fixations_to_heatmap,
    generate_dataset,
    generate_sample,
    load_datalist,
    write_dataset,
)
from monai_kdx.data.gaze import fixation_indices
from monai_kdx.data.synthetic import assign_splits, label_of
from monai_kdx.registry import DATASETS

SMALL = {"brain-mri-3d": {"spatial_size": 32}, "chest-xray-2d": {"spatial_size": 64}, "retina-2d": {"spatial_size": 64}}
KINDS = list(SMALL)


@pytest.fixture(scope="module")
def small_datasets() -> dict[str, list]:
    """Two label blocks of every kind at small sizes."""
    return {kind: generate_dataset(kind, n=2 * len(data.class_names(kind)), seed=3, **SMALL[kind]) for kind in KINDS}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------ registry
def test_registry_entries_are_generator_classes():
    assert DATASETS.get("brain-mri-3d") is BrainMRIGenerator
    assert DATASETS.get("chest-xray-2d") is ChestXRayGenerator
    assert DATASETS.get("retina-2d") is RetinaGenerator
    assert all(issubclass(DATASETS.get(kind), SyntheticGenerator) for kind in KINDS)
    assert DATASETS.get("retina-2d").class_names == ("normal", "microaneurysms", "exudates")
    assert BrainMRIGenerator.class_names == ("no_tumor", "glioma", "meningioma", "pituitary")
    assert (BrainMRIGenerator.spatial_dims, ChestXRayGenerator.spatial_dims, RetinaGenerator.spatial_dims) == (3, 2, 2)
    assert data.class_names("chest-xray-2d") == ["normal", "nodule", "consolidation"]


def test_unknown_kind_and_bad_knobs():
    with pytest.raises(ValueError, match="valid kinds.*brain-mri-3d"):
        generate_sample("brain-mri-2d", 0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        generate_sample("retina-2d", 0, lesion_radius=3)
    with pytest.raises(ValueError, match="lesion_contrast"):
        generate_sample("retina-2d", 0, lesion_contrast=(0.3, 0.1))
    with pytest.raises(ValueError, match="spatial_size"):
        generate_sample("retina-2d", 0, spatial_size=(64, 64, 64))
    with pytest.raises(ValueError, match="n must be"):
        generate_dataset("brain-mri-3d", n=3)
    with pytest.raises(ValueError, match="split"):
        generate_sample("retina-2d", 0, split="train")


# ---------------------------------------------------------------------------------------- samples, masks
@pytest.mark.parametrize("kind", KINDS)
def test_sample_shapes_and_masks(small_datasets, kind):
    generator = DATASETS.get(kind)
    size = SMALL[kind]["spatial_size"]
    for sample in small_datasets[kind]:
        shape = (size,) * generator.spatial_dims
        assert sample.image.shape == sample.mask.shape == sample.anatomy_mask.shape == sample.gaze.shape == shape
        assert (sample.image.dtype, sample.mask.dtype, sample.gaze.dtype) == (np.float32, np.uint8, np.float32)
        assert sample.affine.shape == (4, 4) and sample.marker_mask is None
        assert sample.class_name == generator.class_names[sample.label]
        assert sample.anatomy_mask.sum() > 0.05 * sample.mask.size
        if sample.label == 0:
            assert sample.mask.sum() == 0
        else:
            assert sample.mask.sum() > 0
            assert np.all(sample.anatomy_mask[sample.mask > 0] == 1), "lesion voxels outside the anatomy mask"


def test_brain_lesions_change_the_image_inside_the_mask():
    """Same index and seed, lesion contrast off vs on: the image differs only near the lesion."""
    knobs = {"spatial_size": 32, "noise": 0.0}
    index = next(i for i in range(8) if label_of(i, 5, 4) == 1)  # a glioma
    plain = generate_sample("brain-mri-3d", index, seed=5, lesion_contrast=0.0, **knobs)
    lesion = generate_sample("brain-mri-3d", index, seed=5, lesion_contrast=0.3, **knobs)
    np.testing.assert_array_equal(plain.mask, lesion.mask)
    changed = np.abs(lesion.image - plain.image) > 1e-4
    assert changed[lesion.mask > 0].mean() > 0.5
    assert np.all(lesion.anatomy_mask[changed] == 1)


def test_brain_lesion_locations():
    """Meningiomas touch the brain surface, pituitary lesions sit low near the midline (RAS axes)."""
    knobs = {"spatial_size": 48, "max_rotation_deg": 0.0, "max_translation": 0.0, "max_scale": 0.0}
    generator = BrainMRIGenerator(**knobs)
    from scipy import ndimage

    for index in range(12):
        sample = generator.sample(index, seed=1)
        if sample.class_name == "meningioma":
            surface = sample.anatomy_mask.astype(bool) & ~ndimage.binary_erosion(sample.anatomy_mask.astype(bool))
            assert (surface & (sample.mask > 0)).any()
        if sample.class_name == "pituitary":
            center_mm = sample.affine[:3, :3] @ np.argwhere(sample.mask).mean(0) + sample.affine[:3, 3]
            assert abs(center_mm[0]) < 10 and center_mm[2] < -5  # MNI x near 0, below the AC-PC plane


# --------------------------------------------------------------------------------- labels, splits, seeds
def test_labels_are_balanced_in_blocks():
    labels = [label_of(i, 7, 4) for i in range(10)]
    assert sorted(labels[:4]) == sorted(labels[4:8]) == [0, 1, 2, 3]
    assert len(set(labels[8:])) == 2  # the partial last block: two different classes
    counts = np.bincount(labels, minlength=4)
    assert sorted(counts.tolist()) == [2, 2, 3, 3] and set(np.flatnonzero(counts == 3)) == set(labels[8:])
    blocks = {tuple(label_of(i, 7, 4) for i in range(4 * b, 4 * b + 4)) for b in range(20)}
    assert len(blocks) > 1  # the order within blocks is shuffled, not i % 4
    assert [label_of(i, 7, 4) for i in range(40)] != [label_of(i, 8, 4) for i in range(40)]


def test_splits_are_stratified():
    labels = [i % 3 for i in range(60)]  # 20 per class
    splits = assign_splits(labels, seed=0)
    for label in range(3):
        members = [s for s, y in zip(splits, labels, strict=True) if y == label]
        assert (members.count("training"), members.count("validation"), members.count("test")) == (14, 3, 3)
    small = assign_splits([0, 0, 0, 1, 1, 2], seed=0)  # 3, 2 and 1 samples per class
    assert sorted(small[:3]) == ["test", "training", "validation"]
    assert sorted(small[3:5]) == ["test", "training"]
    assert small[5] == "training"
    assert assign_splits(labels, seed=0) == splits and assign_splits(labels, seed=1) != splits
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(labels, seed=0, fractions=(0.5, 0.2, 0.2))


def test_dataset_splits_and_labels(small_datasets):
    samples = generate_dataset("chest-xray-2d", n=9, seed=3, spatial_size=64)
    labels = [s.label for s in samples]
    assert np.bincount(labels).tolist() == [3, 3, 3]
    assert [s.split for s in samples] == assign_splits(labels, seed=3)
    assert {s.split for s in samples} == {"training", "validation", "test"}
    assert [s.index for s in samples] == list(range(9))


def test_determinism_and_independence_of_n(small_datasets):
    again = generate_dataset("retina-2d", n=6, seed=3, **SMALL["retina-2d"])
    for a, b in zip(small_datasets["retina-2d"], again, strict=True):
        for field in ("image", "mask", "anatomy_mask", "gaze", "affine"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert a.fixations == b.fixations and a.label == b.label
    bigger = generate_dataset("retina-2d", n=12, seed=3, **SMALL["retina-2d"])
    for a, b in zip(small_datasets["retina-2d"], bigger[:6], strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert a.label == b.label
    single = generate_sample("brain-mri-3d", 5, seed=3, split="test", **SMALL["brain-mri-3d"])
    np.testing.assert_array_equal(single.image, small_datasets["brain-mri-3d"][5].image)
    other_seed = generate_sample("retina-2d", 0, seed=4, **SMALL["retina-2d"])
    assert not np.array_equal(other_seed.image, small_datasets["retina-2d"][0].image)


# ---------------------------------------------------------------------------------------------- affines
def test_affines_match_the_field_of_view():
    brain = generate_sample("brain-mri-3d", 0, spatial_size=32)
    np.testing.assert_allclose(brain.spacing, [6.0, 6.0, 6.0])  # 192 mm / 32
    np.testing.assert_allclose(brain.affine[:3, :3], np.diag([6.0, 6.0, 6.0]))
    centre_mm = brain.affine @ np.array([15.5, 15.5, 15.5, 1.0])
    assert np.all(np.abs(centre_mm[:3] - [0.0, -18.0, 8.0]) < 12)  # roughly the MNI brain's centre
    chest = generate_sample("chest-xray-2d", 0, spatial_size=64, field_of_view_mm=160)
    np.testing.assert_allclose(chest.spacing, [2.5, 2.5], rtol=1e-3)
    np.testing.assert_allclose(chest.affine[2:, 2:], np.eye(2))


# -------------------------------------------------------------------------------------------------- gaze
def test_heatmap_single_fixation_matches_hand_computation():
    sigma = 1.0
    heatmap = fixations_to_heatmap([[5.3, 6.6]], [250.0], (11, 15), sigma=sigma, box_radius=0)
    i, j = np.indices((11, 15))
    di, dj = i - 5, j - 7  # (5.3, 6.6) rounds to pixel (5, 7)
    # scipy's kernel is truncated at 4 sigma and normalized; the normalization cancels in the min-max scaling
    expected = np.exp(-(di**2 + dj**2) / (2 * sigma**2)) * (np.abs(di) <= 4) * (np.abs(dj) <= 4)
    np.testing.assert_allclose(heatmap, expected, atol=1e-6)
    assert heatmap.dtype == np.float32 and np.unravel_index(heatmap.argmax(), heatmap.shape) == (5, 7)
    window = heatmap[1:10, 3:12]
    np.testing.assert_allclose(window, window[::-1, :], atol=1e-7)
    np.testing.assert_allclose(window, window[:, ::-1], atol=1e-7)


def test_heatmap_3d_box_durations_and_anisotropic_sigma():
    heatmap = fixations_to_heatmap([[6.0, 6.0, 6.0]], None, (13, 13, 13), sigma=1.5, box_radius=0)
    assert np.unravel_index(heatmap.argmax(), heatmap.shape) == (6, 6, 6)
    np.testing.assert_allclose(heatmap, heatmap.transpose(1, 2, 0), atol=1e-7)
    np.testing.assert_allclose(heatmap[6, 6, 4], np.exp(-4 / (2 * 1.5**2)), atol=1e-6)

    box = fixations_to_heatmap([[2.0, 3.0, 4.0]], [100.0], (6, 6, 8), sigma=0, box_radius=1)
    expected = np.zeros((6, 6, 8))
    expected[1:4, 2:5, 3:6] = 1
    np.testing.assert_array_equal(box, expected)

    weighted = fixations_to_heatmap([[1, 1], [3, 4.49]], [100.0, 300.0], (5, 6), sigma=0, box_radius=0)
    expected = np.zeros((5, 6))
    expected[1, 1], expected[3, 4] = 1 / 3, 1.0
    np.testing.assert_allclose(weighted, expected, atol=1e-7)

    along_rows = fixations_to_heatmap([[5, 5]], None, (11, 11), sigma=(1.0, 0.0), box_radius=0)
    assert np.count_nonzero(along_rows[:, 4]) == 0 and np.count_nonzero(along_rows[:, 5]) == 9  # +-4 sigma rows


def test_heatmap_empty_and_invalid_inputs():
    for points, durations in (([], []), ([[1.0, 2.0]], [0.0]), ([[-3.0, 2.0], [1.0, 9.6]], [50.0, 50.0])):
        heatmap = fixations_to_heatmap(points, durations, (4, 10), sigma=2.0)
        assert heatmap.shape == (4, 10) and not np.isnan(heatmap).any() and np.all(heatmap == 0)
    assert np.all(fixations_to_heatmap(np.zeros((0, 3)), None, (3, 3, 3), sigma=1.0) == 0)
    with pytest.raises(ValueError, match="durations"):
        fixations_to_heatmap([[1, 1]], [1.0, 2.0], (4, 4), sigma=1.0)
    with pytest.raises(ValueError, match="shape"):
        fixations_to_heatmap([[1, 1, 1]], None, (4, 4), sigma=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        fixations_to_heatmap([[1, 1]], [-5.0], (4, 4), sigma=1.0)


def test_binary_fixation_map():
    binary = fixations_to_binary_map([[0.4, 1.5], [2.0, 2.0], [2.2, 1.8], [9.0, 0.0], [-0.6, 1.0]], (3, 4))
    expected = np.zeros((3, 4), dtype=np.uint8)
    expected[0, 2] = expected[2, 2] = 1  # (0.4, 1.5) -> (0, 2); (2.2, 1.8) -> (2, 2); the others are outside
    np.testing.assert_array_equal(binary, expected)
    assert fixations_to_binary_map([[1, 2, 3]], (2, 3, 4))[1, 2, 3] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_gaze_mostly_on_the_lesion(small_datasets, kind):
    for sample in small_datasets[kind]:
        points, durations = sample.fixation_points, sample.fixation_durations
        indices, inside = fixation_indices(points, sample.image.shape)
        assert inside.all() and 10 <= len(points) <= 20 and np.all(durations >= 80)
        on_anatomy = sample.anatomy_mask[tuple(indices.T)] > 0
        on_lesion = sample.mask[tuple(indices.T)] > 0
        assert on_anatomy.all()
        if sample.label == 0:
            assert not on_lesion.any()
        else:
            assert 0.65 <= on_lesion.mean() <= 0.9
        sigma = DATASETS.get(kind)().knobs["gaze_sigma_mm"] / sample.spacing
        np.testing.assert_allclose(
            sample.gaze, fixations_to_heatmap(points, durations, sample.image.shape, sigma), atol=1e-6
        )
        peak = np.array(np.unravel_index(sample.gaze.argmax(), sample.gaze.shape))
        assert np.min(np.linalg.norm((indices - peak) / sigma, axis=1)) < 2.0  # the peak sits near a fixation


# ------------------------------------------------------------------------------------------- shortcut
def test_shortcut_marker_encodes_the_class_in_training_only():
    knobs = {"spatial_size": 64, "shortcut_p": 1.0}
    for index in range(6):
        training = generate_sample("chest-xray-2d", index, seed=2, split="training", **knobs)
        validation = generate_sample("chest-xray-2d", index, seed=2, split="validation", **knobs)
        assert training.marker_corner == validation.marker_corner == training.label % 4
        row, col = training.marker_corner // 2, training.marker_corner % 2
        rows, cols = (slice(2, 6), slice(58, 62))[row], (slice(2, 6), slice(58, 62))[col]  # side 4, margin 2
        expected = np.zeros((64, 64), dtype=np.uint8)
        expected[rows, cols] = 1
        np.testing.assert_array_equal(training.marker_mask, expected)
        np.testing.assert_allclose(training.image[rows, cols], 1.5)
        test = generate_sample("chest-xray-2d", index, seed=2, split="test", **knobs)
        outside = (training.marker_mask == 0) & (test.marker_mask == 0)
        np.testing.assert_array_equal(training.image[outside], test.image[outside])  # only the marker moves
    corners = [generate_sample("retina-2d", i, split="test", **knobs) for i in range(24)]
    matches = sum(s.marker_corner == s.label % 4 for s in corners)
    assert matches < 12 and len({s.marker_corner for s in corners}) == 4  # about 1/4 by chance
    brain = generate_sample("brain-mri-3d", 1, spatial_size=32, shortcut_p=1.0)
    assert brain.marker_mask[:, :, 29:31].sum() == brain.marker_mask.sum() == 8  # side 2, margin 1, top slab
    no_marker = generate_sample("chest-xray-2d", 0, spatial_size=64, shortcut_p=0.5)
    unmarked = generate_sample("chest-xray-2d", 0, spatial_size=64)
    assert unmarked.marker_mask is None and no_marker.marker_mask is not None
    keep = no_marker.marker_mask == 0
    np.testing.assert_array_equal(no_marker.image[keep], unmarked.image[keep])


# ------------------------------------------------------------------------------------------------ files
@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datasets")
    return {
        "brain": write_dataset(root / "brain", "brain-mri-3d", n=4, seed=0, progress=False, spatial_size=32),
        "retina": write_dataset(
            root / "retina", "retina-2d", n=3, seed=0, progress=False, spatial_size=64, shortcut_p=0.5
        ),
    }


def test_written_files_keep_affine_and_shape_through_monai(written):
    from monai.transforms import LoadImaged

    loader = LoadImaged(keys=["image", "mask", "gaze"], ensure_channel_first=True)
    for name, size in (("brain", (1, 32, 32, 32)), ("retina", (1, 64, 64))):
        metadata = json.loads(written[name].read_text())["metadata"]
        entries = [e for split in ("training", "validation", "test") for e in load_datalist(written[name], split)]
        assert sorted(e["index"] for e in entries) == list(range(metadata["n"]))
        for entry in entries:
            sample = generate_sample(
                metadata["kind"],
                entry["index"],
                seed=0,
                split="training",
                **{k: v for k, v in metadata["knobs"].items() if k != "shortcut_p"},
            )
            loaded = loader(entry)
            assert tuple(loaded["image"].shape) == size
            np.testing.assert_allclose(np.asarray(loaded["image"].affine), sample.affine, atol=1e-5)
            np.testing.assert_allclose(np.asarray(loaded["image"].meta["affine"]), sample.affine, atol=1e-5)
            np.testing.assert_array_equal(np.asarray(loaded["mask"][0]), sample.mask)
            if "marker" not in entry:
                np.testing.assert_array_equal(np.asarray(loaded["image"][0]), sample.image)
            np.testing.assert_allclose(np.asarray(loaded["gaze"][0]), sample.gaze, atol=1e-7)
            assert entry["fixations"] == sample.fixations and entry["label"] == sample.label


def test_datalist_content_and_load_datalist(written):
    content = json.loads(written["retina"].read_text())
    metadata = content["metadata"]
    assert metadata["kind"] == "retina-2d" and metadata["n"] == 3 and metadata["seed"] == 0
    assert metadata["class_names"] == ["normal", "microaneurysms", "exudates"]
    assert metadata["spatial_size"] == [64, 64] and metadata["knobs"]["shortcut_p"] == 0.5
    np.testing.assert_allclose(metadata["spacing"], [14.0 / 64] * 2)
    assert "generator_version" in metadata
    entry = content["training"][0]
    assert entry["image"].startswith("images/") and entry["marker"].startswith("markers/")
    assert not Path(entry["image"]).is_absolute()
    resolved = load_datalist(written["retina"], "training")[0]
    for key in ("image", "mask", "anatomy", "gaze", "marker"):
        assert Path(resolved[key]).is_absolute() and Path(resolved[key]).is_file()
        assert resolved[key] == str((written["retina"].parent / entry[key]).resolve())
    with pytest.raises(ValueError, match=r"unknown datalist section 'train'.*'test', 'training', 'validation'"):
        load_datalist(written["retina"], "train")


def test_rewriting_the_same_dataset_is_a_no_op(written, monkeypatch):
    folder = written["brain"].parent
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    monkeypatch.setattr(SyntheticGenerator, "sample", lambda *a, **k: pytest.fail("generated again"))
    assert (
        write_dataset(folder, "brain-mri-3d", n=4, seed=0, spatial_size=32, noise=BrainMRIGenerator.defaults["noise"])
        == written["brain"]
    )
    assert ensure_dataset(folder, "brain-mri-3d", 4, 0, spatial_size=32) == str(written["brain"])
    with pytest.raises(DatasetExistsError, match=r"different dataset \(differs in \['seed'\]"):
        write_dataset(folder, "brain-mri-3d", n=4, seed=1, spatial_size=32)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_write_errors_happen_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(SyntheticGenerator, "sample", lambda *a, **k: pytest.fail("work started"))
    small = {"n": 3, "spatial_size": 64, "progress": False}
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "datalist.json").write_text(json.dumps({"metadata": {"kind": "retina-2d", "n": 99}, "training": []}))
    before = _listing(tmp_path)
    cases = [
        (ValueError, "valid kinds", dict(out_dir=tmp_path / "x", kind="brain-ct-3d")),
        (ValueError, "at least the number of classes", dict(out_dir=tmp_path / "x", kind="chest-xray-2d", n=2)),
        (NotADirectoryError, "is a file", dict(out_dir=a_file, kind="retina-2d")),
        (NotADirectoryError, "is a file", dict(out_dir=a_file / "sub" / "data", kind="retina-2d")),
        (DatasetExistsError, "not empty", dict(out_dir=unrelated, kind="retina-2d")),
        (DatasetExistsError, "different dataset.*'n'", dict(out_dir=other, kind="retina-2d")),
    ]
    for error, message, arguments in cases:
        with pytest.raises(error, match=message):
            write_dataset(**{**small, **arguments})
        assert _listing(tmp_path) == before, arguments


def test_write_to_a_read_only_parent(tmp_path, monkeypatch):
    import os

    from monai_kdx.data import io

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root can write anywhere: let os.access report the folder as read-only
        real_access = os.access
        monkeypatch.setattr(io.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    try:
        with pytest.raises(PermissionError, match="not writable"):
            write_dataset(locked / "data", "retina-2d", n=3, spatial_size=64, progress=False)
        assert _listing(tmp_path) == ["locked"]
    finally:
        locked.chmod(0o700)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    original = SyntheticGenerator.sample

    def interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SyntheticGenerator, "sample", interrupt)
    empty = tmp_path / "empty_existing"
    empty.mkdir()
    for target in (tmp_path / "new", empty):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            write_dataset(target, "retina-2d", n=3, spatial_size=64, progress=False)
        assert _listing(tmp_path) == ["empty_existing"]
    monkeypatch.setattr(SyntheticGenerator, "sample", original)
    datalist = write_dataset(empty, "retina-2d", n=3, spatial_size=64, progress=False)
    assert datalist == empty.absolute() / "datalist.json" and _listing(tmp_path)[0] == "empty_existing"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
