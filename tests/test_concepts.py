"""Concept activation vectors and TCAV: a network whose class-1 logit grows with brightness gives the
"bright lesion" concept a TCAV score of 1 for class 1, 0 for class 0, significantly different from
random concepts; patches are cut from the masks; 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_kdx.explain.concepts import TCAV, concept_patches, fit_cav


class BrightnessNet(nn.Module):
    """feat: channel 0 = local mean brightness, channel 1 = minus it; logits = (−ch0, +ch0) averaged."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.feat = conv(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.feat.weight[0].fill_(1.0 / 3**spatial_dims)
            self.feat.weight[1].fill_(-1.0 / 3**spatial_dims)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x).flatten(2).mean(-1))


def _data(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    images = torch.randn(6, 1, *[20] * spatial_dims) * 0.5
    masks = torch.zeros_like(images)
    for n in range(4):  # bright lesions in four images, two lesion-free images
        window = (n, 0, *[slice(4 + n, 10 + n)] * spatial_dims)
        masks[window] = 1
        images[window] += 3.0
    return images, masks


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_concept_patches_come_from_inside_and_outside_the_masks(spatial_dims):
    images, masks = _data(spatial_dims)
    concept, random = concept_patches(images, masks, patch_size=4, n_per_image=3, seed=1)
    assert concept.shape == (12, 1, *[4] * spatial_dims)  # 3 per image with a lesion
    assert random.shape[1:] == (1, *[4] * spatial_dims) and len(random) >= 12
    assert concept.mean() > 1.0 > random.abs().mean()  # lesion patches are bright, random ones are not
    with pytest.raises(ValueError, match="does not fit"):
        concept_patches(images, masks, patch_size=40)
    with pytest.raises(ValueError, match="all empty"):
        concept_patches(images, torch.zeros_like(masks), patch_size=4)
    with pytest.raises(ValueError, match="do not match"):
        concept_patches(images, masks[:, :, :5], patch_size=4)


def test_fit_cav_points_toward_the_concept():
    torch.manual_seed(0)
    positive = torch.randn(30, 3) + torch.tensor([2.0, 0.0, 0.0])
    negative = torch.randn(30, 3)
    cav = fit_cav(positive, negative)
    assert cav.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert cav[0] > 0.7 and cav.abs().argmax() == 0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_tcav_scores_and_significance(spatial_dims):
    images, masks = _data(spatial_dims)
    network = BrightnessNet(spatial_dims)
    concept, random = concept_patches(images, masks, patch_size=6, n_per_image=2, seed=0)
    random = torch.cat([random, concept_patches(images, masks, patch_size=6, n_per_image=2, seed=5)[1]])
    tcav = TCAV(network, ["feat"])
    grads_before = [p.grad for p in network.parameters()]
    up = tcav.run(concept, random, images, target=1, runs=12, seed=0)["feat"]
    down = tcav.run(concept, random, images, target=0, runs=12, seed=0)["feat"]
    # brightness raises logit 1 and lowers logit 0 for every input: scores 1 and 0, both significant
    assert up.score == 1.0 and down.score == 0.0
    assert up.significant and down.significant and up.p_value < 0.05
    assert 0.0 < up.random_scores.mean() < 1.0  # random directions split the inputs
    assert [p.grad for p in network.parameters()] == grads_before  # no parameter gradient written


def test_tcav_errors():
    network = BrightnessNet(2)
    with pytest.raises(ValueError, match="no submodule 'nope'|nope"):
        TCAV(network, ["nope"])
    with pytest.raises(ValueError, match="pooling"):
        TCAV(network, ["feat"], pooling="max")
    tcav = TCAV(network, ["feat"])
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match="runs must be >= 2"):
        tcav.run(x, torch.randn(8, 1, 8, 8), x, 1, runs=1)
    with pytest.raises(ValueError, match="need at least 8 random examples"):
        tcav.run(x, torch.randn(5, 1, 8, 8), x, 1)
    with pytest.raises(ValueError, match="3 spatial dimensions but BrightnessNet uses 2D"):
        tcav.run(x, torch.randn(8, 1, 8, 8), torch.randn(2, 1, 8, 8, 8), 1)
