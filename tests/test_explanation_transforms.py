"""Explanation transforms: maps under new keys with the input's metadata, NIfTI heatmaps that overlay
exactly on the input (same affine and shape), and the hierarchy figure."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, SaveImaged
from torch import nn

from monai_kdx.explain import HierarchicalCAM
from monai_kdx.networks import ShallowCNN
from monai_kdx.transforms.explanation import Attributiond, HierarchicalExplanationd, SaveExplanationFigured
from monai_kdx.visualize import explanation_figure


def _nifti(path, spatial_dims: int) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(24, 20, 16)[:spatial_dims]).astype(np.float32)
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    affine[:3, 3] = [-30.0, 12.0, 5.0]
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path), affine


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_heatmaps_saved_as_nifti_overlay_the_input_exactly(tmp_path, spatial_dims):
    torch.manual_seed(0)
    network = ShallowCNN(spatial_dims, 1, 3, channels=(4, 8, 8)).eval()
    image_path, affine = _nifti(tmp_path / "case.nii.gz", spatial_dims)
    explain = HierarchicalExplanationd("image", network, mode="gradcam++", target_key="label")
    pipeline = Compose(
        [
            LoadImaged("image", ensure_channel_first=True, image_only=True),
            explain,
            SaveImaged("cam", output_dir=str(tmp_path / "out"), output_postfix="cam", separate_folder=False),
            SaveImaged("cam_levels", output_dir=str(tmp_path / "out"), output_postfix="levels", separate_folder=False),
        ]
    )
    out = pipeline({"image": image_path, "label": 2})
    assert out["cam_class"] == 2
    assert out["cam_levels"].meta["levels"] == ["blocks.0", "blocks.1", "blocks.2"]
    # the same maps as the explainer called directly on the batched image
    direct = HierarchicalCAM(network, mode="gradcam++").cam(out["image"].as_tensor()[None], 2)
    torch.testing.assert_close(out["cam"].as_tensor(), direct.fused[0])
    torch.testing.assert_close(out["cam_levels"].as_tensor(), torch.cat(list(direct.values()), 1)[0])
    # read back with nibabel: same affine and grid as the input, values as computed
    spatial = nib.load(image_path).shape
    for postfix, values in (("cam", out["cam"]), ("levels", out["cam_levels"])):
        written = nib.load(tmp_path / "out" / f"case_{postfix}.nii.gz")
        np.testing.assert_allclose(written.affine, affine)
        assert written.shape[:spatial_dims] == spatial
        array = np.asarray(written.dataobj, dtype=np.float32)
        channel_last = np.moveaxis(values.numpy(), 0, -1)
        np.testing.assert_allclose(array.reshape(channel_last.shape), channel_last, atol=1e-6)


def test_attributiond_writes_a_registered_method_map_with_metadata(tmp_path):
    network = ShallowCNN(3, 1, 2, channels=(4, 8)).eval()
    image_path, affine = _nifti(tmp_path / "vol.nii.gz", 3)
    data = LoadImaged("image", ensure_channel_first=True, image_only=True)({"image": image_path})
    out = Attributiond("image", network, method="layercam", class_idx=1)(data)
    assert out["attribution"].shape == (1, 24, 20, 16)
    np.testing.assert_allclose(out["attribution"].affine.numpy(), affine)
    assert out["attribution"].meta["filename_or_obj"] == image_path
    expected = HierarchicalCAM(network, mode="layercam").cam(data["image"].as_tensor()[None], 1).fused[0]
    torch.testing.assert_close(out["attribution"].as_tensor(), expected)
    assert "image" in out and out["image"] is data["image"]  # the input is kept as it was


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_attribution_map_smoothed_by_the_hand_computed_gaussian(spatial_dims):
    """A linear classifier's integrated gradients of a one-voxel image are that voxel's weight alone (completeness):
    smoothed, the map is the discretized Gaussian itself, value by value; CAM modes are left unsmoothed."""
    import math

    side, sigma = 9, 1.0
    network = nn.Sequential(nn.Flatten(), nn.Linear(side**spatial_dims, 2, bias=False))
    with torch.no_grad():
        network[1].weight.fill_(1.0)
    image = torch.zeros(1, *[side] * spatial_dims)
    image[(0, *[side // 2] * spatial_dims)] = 1.0
    raw = HierarchicalExplanationd("image", network, mode="integrated_gradients", class_idx=0)({"image": image})["cam"]
    assert float(raw.sum()) == pytest.approx(1.0, abs=1e-4)  # the spike alone
    smooth = HierarchicalExplanationd(
        "image", network, mode="integrated_gradients", class_idx=0, smoothing=sigma
    )({"image": image})["cam"]

    def weight(distance: int) -> float:  # the Gaussian integrated over one voxel (MONAI's "erf" kernel)
        edge = lambda t: math.erf(t / (sigma * math.sqrt(2)))  # noqa: E731
        return 0.5 * (edge(distance + 0.5) - edge(distance - 0.5))

    center = [side // 2] * spatial_dims
    for offset in range(4):
        for axis in range(spatial_dims):
            index = list(center)
            index[axis] += offset
            expected = weight(offset) / weight(0)  # min-max normalized: the peak is 1
            assert float(smooth[(0, *index)]) == pytest.approx(expected, abs=1e-4)
    diagonal = [c + 1 for c in center]
    assert float(smooth[(0, *diagonal)]) == pytest.approx((weight(1) / weight(0)) ** spatial_dims, abs=1e-4)
    assert isinstance(smooth, MetaTensor) and smooth.shape == image.shape

    torch.manual_seed(0)
    cnn = ShallowCNN(spatial_dims, 1, 2, channels=(4, 8)).eval()
    sample = {"image": torch.randn(1, *[16] * spatial_dims)}
    plain = HierarchicalExplanationd("image", cnn, mode="layercam", class_idx=1)(dict(sample))["cam"]
    kept = HierarchicalExplanationd("image", cnn, mode="layercam", class_idx=1, smoothing=2.0)(dict(sample))["cam"]
    torch.testing.assert_close(kept, plain)
    for bad in (-1.0, True, "1", 64):
        with pytest.raises(ValueError, match="smoothing must be a number of voxels"):
            HierarchicalExplanationd("image", cnn, mode="integrated_gradients", smoothing=bad)


def test_explanation_transform_errors():
    network = ShallowCNN(2, 1, 2, channels=(4,))
    with pytest.raises(KeyError, match="target_key 'label' is not in the data"):
        HierarchicalExplanationd("image", network, target_key="label")({"image": torch.randn(1, 8, 8)})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        HierarchicalExplanationd("image", "not a network")
    with pytest.raises(ValueError, match="3 spatial dimensions but ShallowCNN uses 2D"):
        HierarchicalExplanationd("image", network)({"image": torch.randn(1, 8, 8, 8)})
    with pytest.raises(KeyError, match="unknown explainer entry 'gradcamm'"):
        Attributiond("image", network, method="gradcamm")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_explanation_figure_one_png_per_image(tmp_path, spatial_dims):
    torch.manual_seed(0)
    network = ShallowCNN(spatial_dims, 1, 2, channels=(4, 8)).eval()
    image = torch.randn(1, 1, *[16] * spatial_dims)
    result = HierarchicalCAM(network).cam(image)
    maps = {name: m[0, 0].numpy() for name, m in result.items()} | {"fused": result.fused[0, 0].numpy()}
    fig = explanation_figure(image[0, 0].numpy(), maps, tmp_path / "levels.png")
    assert (tmp_path / "levels.png").stat().st_size > 1000
    rows, columns = (1, 3) if spatial_dims == 2 else (3, 3)
    assert len(fig.axes) == rows * columns + 1  # the panels and the colour bar
    assert fig.axes[-1].get_ylabel() == "relevance (scaled)"
    if spatial_dims == 3:
        titled = explanation_figure(image[0, 0].numpy(), maps, tmp_path / "t.png", title="case · label 1")
        assert titled._suptitle.get_text() == "case · label 1"
    with pytest.raises(ValueError, match="has shape"):
        explanation_figure(image[0, 0].numpy(), {"bad": np.zeros([8] * spatial_dims)})


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_figures_of_the_first_cases_only(tmp_path, spatial_dims):
    """max_figures: the first N samples get a figure each, named after their files; the rest pass through untouched."""
    save = SaveExplanationFigured("cam", str(tmp_path / "figures"), max_figures=2)
    for index in range(4):
        image = MetaTensor(torch.rand(1, *[12] * spatial_dims), meta={"filename_or_obj": f"/data/case_{index}.nii.gz"})
        sample = {"image": image, "cam": torch.rand(1, *[12] * spatial_dims)}
        assert save(sample)["cam"] is sample["cam"]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["case_0_cam.png", "case_1_cam.png"]
    assert save.drawn == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_figures must be a non-negative integer"):
            SaveExplanationFigured("cam", str(tmp_path), max_figures=bad)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_faithfulness_transform_scores_the_map_and_a_random_map_beside_it(spatial_dims):
    from monai_kdx.metrics import deletion_auc
    from monai_kdx.transforms.explanation import ExplanationFaithfulnessd

    torch.manual_seed(0)
    network = ShallowCNN(spatial_dims, 1, 3, channels=(4, 8)).eval()
    image = torch.randn(1, *[16] * spatial_dims)
    cam = torch.rand(1, *[16] * spatial_dims)
    transform = ExplanationFaithfulnessd("cam", network, steps=4, baseline="road", random_map=True, seed=1)
    out = transform({"image": image, "cam": cam, "label": 2.0})
    assert {"cam_deletion_auc", "cam_insertion_auc", "cam_random_deletion_auc", "cam_random_insertion_auc"} <= set(out)
    expected = deletion_auc(network, image[None], cam[None], 2, steps=4, baseline="road", seed=1)[0]
    torch.testing.assert_close(out["cam_deletion_auc"], expected)
    assert not torch.equal(out["cam_deletion_auc"], out["cam_random_deletion_auc"])
    with pytest.raises(ValueError, match="baseline must be a number or one of"):
        ExplanationFaithfulnessd("cam", network, baseline="grey")
    with pytest.raises(ValueError, match="not a whole-number class index"):
        transform({"image": image, "cam": cam, "label": 1.5})


def test_outputs_of_cases_with_the_same_file_name_do_not_collide(tmp_path):
    """patientA/t1 and patientB/t1, sub-01.ses-1 and sub-01.ses-2: unique, stable names from the dataset folder."""
    from monai.transforms import SaveImaged

    from monai_kdx.transforms import CaseFolderLayout, case_name

    root = tmp_path / "data"
    sources = [root / "patientA" / "t1.nii.gz", root / "patientB" / "t1.nii.gz", root / "sub-01.ses-1.nii.gz",
               root / "sub-01.ses-2.nii.gz"]  # fmt: skip
    names = [case_name(path, root) for path in sources]
    assert names == ["patientA__t1", "patientB__t1", "sub-01.ses-1", "sub-01.ses-2"]
    assert case_name(tmp_path / "elsewhere" / "x.nii", root) == "x"  # outside the root: the base name
    save = SaveImaged("cam", folder_layout=CaseFolderLayout(str(tmp_path / "out"), "cam", data_root=str(root)),
                      print_log=False)  # fmt: skip
    for index, path in enumerate(sources):
        save({"cam": MetaTensor(torch.full((1, 4, 4, 4), float(index)), meta={"filename_or_obj": str(path)})})
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"{name}_cam.nii.gz" for name in names)
    for index, name in enumerate(names):
        assert float(nib.load(tmp_path / "out" / f"{name}_cam.nii.gz").get_fdata().mean()) == index
