"""Tests for ovd.models.clip.crops: EZSD crop geometry and the RoIAlign crop-and-resize."""

from __future__ import annotations

import pytest
import torch

from ovd.models.clip.crops import crop_and_resize, square_crop_boxes

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _normalised(rgb: tuple[float, float, float]) -> torch.Tensor:
    return (torch.tensor(rgb) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)


# ---------------------------------------------------------------- geometry

def test_wide_box_enlarged_and_squared():
    boxes = torch.tensor([[40.0, 45.0, 60.0, 55.0]])  # 20 x 10 at centre (50, 50)
    crop, square = square_crop_boxes(boxes, (100, 100), enlarge=1.2)
    assert torch.allclose(crop, torch.tensor([[38.0, 44.0, 62.0, 56.0]]))  # 24 x 12
    assert torch.allclose(square, torch.tensor([[38.0, 38.0, 62.0, 62.0]]))  # side 24


def test_tall_box_squares_on_its_height():
    boxes = torch.tensor([[45.0, 30.0, 55.0, 70.0]])  # 10 x 40
    crop, square = square_crop_boxes(boxes, (100, 100), enlarge=1.0)
    assert torch.allclose(crop, boxes)
    assert torch.allclose(square, torch.tensor([[30.0, 30.0, 70.0, 70.0]]))


def test_crop_is_clipped_at_the_border_and_square_centred_on_the_clipped_crop():
    boxes = torch.tensor([[0.0, 40.0, 20.0, 60.0],     # left edge: x range -2..22 -> 0..22
                          [90.0, 90.0, 100.0, 100.0]])  # bottom-right corner
    crop, square = square_crop_boxes(boxes, (100, 100), enlarge=1.2)
    assert torch.allclose(crop, torch.tensor([[0.0, 38.0, 22.0, 62.0],
                                              [89.0, 89.0, 100.0, 100.0]]))
    # Side = max(22, 24) = 24, centred on the clipped crop (11, 50).
    assert torch.allclose(square, torch.tensor([[-1.0, 38.0, 23.0, 62.0],
                                                [89.0, 89.0, 100.0, 100.0]]))


def test_non_square_image_clips_each_axis_separately():
    boxes = torch.tensor([[10.0, 2.0, 30.0, 12.0]])  # in an image 20 high, 200 wide
    crop, _ = square_crop_boxes(boxes, (20, 200), enlarge=2.0)
    assert torch.allclose(crop, torch.tensor([[0.0, 0.0, 40.0, 17.0]]))


def test_min_size_floor_applies_before_the_enlargement():
    """EZSD floors the raw box at 10 px, then enlarges: a 4 x 2 box becomes a 12 x 12 crop
    (flooring after the enlargement would give 10 x 10)."""
    boxes = torch.tensor([[48.0, 49.0, 52.0, 51.0]])  # 4 x 2 at (50, 50)
    crop, square = square_crop_boxes(boxes, (100, 100), enlarge=1.2, min_size=10.0)
    assert torch.allclose(crop, torch.tensor([[44.0, 44.0, 56.0, 56.0]]))
    assert torch.allclose(square, crop)
    crop, _ = square_crop_boxes(boxes, (100, 100), enlarge=1.2, min_size=2.0)
    assert torch.allclose(crop, torch.tensor([[47.6, 48.8, 52.4, 51.2]]))
    # A box above the floor is only enlarged.
    crop, _ = square_crop_boxes(torch.tensor([[40.0, 40.0, 60.0, 60.0]]), (100, 100), enlarge=1.2)
    assert torch.allclose(crop, torch.tensor([[38.0, 38.0, 62.0, 62.0]]))


# ---------------------------------------------------------------- crop_and_resize

def test_constant_image_wide_box_padding_rows_are_black():
    rgb = (200.0, 100.0, 30.0)
    image = torch.tensor(rgb).view(3, 1, 1).expand(3, 100, 100).to(torch.uint8)
    boxes = torch.tensor([[40.0, 45.0, 60.0, 55.0]])  # crop 38..62 x 44..56, square 38..62
    out = crop_and_resize(image, boxes, out_size=24, mean=MEAN, std=STD)
    assert out.shape == (1, 3, 24, 24) and out.dtype == torch.float32
    # Output row j has its centre at y = 38.5 + j: rows 6..17 lie in the crop (44..56).
    expected = _normalised(rgb).view(3, 1, 1)
    assert torch.allclose(out[0, :, 6:18, :], expected.expand(3, 12, 24), atol=1e-5)
    # EZSD pads with black pixels before normalising (not with CLIP's mean colour).
    black = _normalised((0.0, 0.0, 0.0)).view(3, 1, 1)
    assert torch.allclose(out[0, :, :6, :], black.expand(3, 6, 24), atol=1e-6)
    assert torch.allclose(out[0, :, 18:, :], black.expand(3, 6, 24), atol=1e-6)


def test_padding_outside_the_image_is_black():
    image = torch.full((3, 100, 100), 255, dtype=torch.uint8)
    # Crop x 0..22 (clipped at the left edge), square -1..23: the 22 px wide crop is centred,
    # one padding column each side, the left one outside the image.
    boxes = torch.tensor([[0.0, 40.0, 20.0, 60.0]])
    out = crop_and_resize(image, boxes, out_size=24, mean=MEAN, std=STD)
    black = _normalised((0.0, 0.0, 0.0)).view(3, 1)
    assert torch.allclose(out[0, :, :, 0], black.expand(3, 24), atol=1e-6)
    assert torch.allclose(out[0, :, :, 23], black.expand(3, 24), atol=1e-6)
    white = _normalised((255.0,) * 3).view(3, 1, 1).expand(3, 24, 22)
    assert torch.allclose(out[0, :, :, 1:23], white, atol=1e-5)


def test_gradient_image_orientation_and_resampling():
    """Channel 0 = x, channel 1 = y, channel 2 = 128: the crop reproduces the ramps exactly
    (bilinear RoIAlign averages of a linear ramp) and keeps x along the last axis."""
    H = W = 100
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                            torch.arange(W, dtype=torch.float32), indexing="ij")
    image = torch.stack([xx, yy, torch.full((H, W), 128.0)])
    box = torch.tensor([[10.0, 20.0, 42.0, 52.0]])  # 32 x 32, pixel-aligned
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    out = crop_and_resize(image, box, out_size=32, mean=MEAN, std=STD, enlarge=1.0)
    pixels = out[0] * s + m  # back to [0, 1]
    j = torch.arange(32, dtype=torch.float32)
    assert torch.allclose(pixels[0] * 255, (10 + j).view(1, 32).expand(32, 32), atol=1e-3)
    assert torch.allclose(pixels[1] * 255, (20 + j).view(32, 1).expand(32, 32), atol=1e-3)
    assert torch.allclose(pixels[2] * 255, torch.full((32, 32), 128.0), atol=1e-3)

    # Downsampling by 2: each output pixel averages two source pixels, 10 + 2j + 0.5.
    out = crop_and_resize(image, box, out_size=16, mean=MEAN, std=STD, enlarge=1.0)
    pixels = out[0] * s + m
    j = torch.arange(16, dtype=torch.float32)
    assert torch.allclose(pixels[0] * 255, (10.5 + 2 * j).view(1, 16).expand(16, 16), atol=1e-3)
    assert torch.allclose(pixels[1] * 255, (20.5 + 2 * j).view(16, 1).expand(16, 16), atol=1e-3)


def test_several_boxes_and_dtypes_agree():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    boxes = torch.tensor([[5.0, 5.0, 30.0, 20.0], [40.0, 10.0, 70.0, 60.0], [0.0, 0.0, 80.0, 64.0]])
    out = crop_and_resize(image, boxes, out_size=20, mean=MEAN, std=STD)
    assert out.shape == (3, 3, 20, 20)
    # Each box alone gives the same crop as in the batch; float input equals uint8 input.
    for k in range(3):
        alone = crop_and_resize(image, boxes[k:k + 1], out_size=20, mean=MEAN, std=STD)
        assert torch.allclose(out[k:k + 1], alone, atol=1e-6)
    as_float = crop_and_resize(image.float(), boxes, out_size=20, mean=MEAN, std=STD)
    assert torch.allclose(out, as_float, atol=1e-6)
    # Different boxes of a random image give different crops.
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("boxes", [torch.zeros((0, 4)), torch.zeros(0)])
def test_no_boxes(boxes):
    image = torch.zeros((3, 32, 32), dtype=torch.uint8)
    out = crop_and_resize(image, boxes, out_size=16, mean=MEAN, std=STD)
    assert out.shape == (0, 3, 16, 16)
    assert out.dtype == torch.float32
