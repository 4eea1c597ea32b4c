"""Two augmented views of every image of a batch, made at once on the batch's uint8 tensor (the training process's
cores then run the network, not a per-image PIL pipeline): random resized crop, horizontal flip, colour jitter,
greyscale, Gaussian blur and solarization, each drawn per image.

The recipe's names and defaults are lightly's (`lightly.transforms`: SimCLRTransform, BYOLView1Transform and
BYOLView2Transform), so a method's views are the ones its library documents; `finetune.crop_scale`, `finetune.colour`
and `finetune.blur` override them. Hue jitter is left out: it is the costly one and does nothing on grey images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

RATIO = (3 / 4, 4 / 3)  # the crop's aspect ratio bounds (torchvision's and lightly's)


@dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentation, in lightly's terms."""

    min_scale: float = 0.08  # the crop keeps at least this share of the image's area (1: no crop)
    flip: float = 0.5  # probability of a horizontal flip
    cj_prob: float = 0.8  # probability of colour jitter
    cj_bright: float = 0.4
    cj_contrast: float = 0.4
    cj_sat: float = 0.2
    gray: float = 0.2  # probability of greyscale
    blur: float = 0.5  # probability of a Gaussian blur
    sigmas: tuple[float, float] = (0.1, 2.0)  # the blur's sigma at 224 px; scaled to the image's size
    solarize: float = 0.0  # probability of solarization (values at or above 128 inverted)

    def adjusted(self, crop_scale: float | None, colour: float | None, blur: float | None) -> ViewRecipe:
        """The recipe with the user's overrides: the crop's smallest share, the colour jitter's strength
        (1: lightly's, 0: none) and the blur's probability."""
        recipe = self if crop_scale is None else replace(self, min_scale=crop_scale)
        if colour is not None:
            recipe = replace(recipe, cj_prob=recipe.cj_prob if colour > 0 else 0.0, cj_bright=recipe.cj_bright * colour,
                             cj_contrast=recipe.cj_contrast * colour, cj_sat=recipe.cj_sat * colour,
                             gray=recipe.gray if colour > 0 else 0.0)
        return recipe if blur is None else replace(recipe, blur=blur)


# lightly's defaults for each method's two views
SIMCLR_VIEWS = (ViewRecipe(cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8), ViewRecipe(cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8))
BYOL_VIEWS = (ViewRecipe(blur=1.0), ViewRecipe(blur=0.1, solarize=0.2))


def crop_boxes(count: int, min_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(count, 4) crops as shares of the image (x0, y0, x1, y1): area uniform in [min_scale, 1], log aspect ratio
    uniform in RATIO, the box moved anywhere inside the image. A box that would not fit keeps its area and gives up
    aspect ratio instead (torchvision falls back to the centre crop), so every area stays within the bounds."""
    area = min_scale + (1 - min_scale) * torch.rand(count, generator=generator)
    low, high = math.log(RATIO[0]), math.log(RATIO[1])
    ratio = torch.exp(low + (high - low) * torch.rand(count, generator=generator))
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = (area / width).clamp(max=1.0)
    width = (area / height).clamp(max=1.0)
    x0 = (1 - width) * torch.rand(count, generator=generator)
    y0 = (1 - height) * torch.rand(count, generator=generator)
    return torch.stack([x0, y0, x0 + width, y0 + height], dim=1)


def _chance(count: int, probability: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(count, generator=generator) < probability


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _factors(count: int, spread: float, generator: torch.Generator | None) -> torch.Tensor:
    return _per_image(1 - spread + 2 * spread * torch.rand(count, generator=generator))


def _grey(images: torch.Tensor) -> torch.Tensor:
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).expand_as(images)


def _blurred(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own sigma: a separable Gaussian as a sum of shifted copies, weighted per image."""
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    weights = torch.exp(-(offsets[None] ** 2) / (2 * sigmas[:, None] ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)  # (B, taps)
    for dim in (-1, -2):
        padded = F.pad(images, (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius), mode="replicate")
        size = images.shape[dim]
        images = sum(_per_image(weights[:, tap]) * padded.narrow(dim, tap, size) for tap in range(2 * radius + 1))
    return images


def make_view(pixels: torch.Tensor, recipe: ViewRecipe, generator: torch.Generator | None = None) -> torch.Tensor:
    """One augmented view of each image of a uint8 (B, C, H, W) batch, uint8 out, each image's draws its own."""
    count, channels, height, width = pixels.shape
    images = pixels.float()
    flip = _chance(count, recipe.flip, generator)
    if recipe.min_scale < 1:  # crop, resize back to the image's size and flip: one bilinear resampling of the batch
        x0, y0, x1, y1 = crop_boxes(count, recipe.min_scale, generator).unbind(1)
        sign = 1 - 2 * flip.to(images.dtype)
        theta = torch.zeros(count, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = (x1 - x0) * sign, x0 + x1 - 1
        theta[:, 1, 1], theta[:, 1, 2] = y1 - y0, y0 + y1 - 1
        grid = F.affine_grid(theta, [count, channels, height, width], align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        images = torch.where(_per_image(flip), images.flip(-1), images)
    if recipe.cj_prob > 0:
        jitter = _per_image(_chance(count, recipe.cj_prob, generator))
        jittered = images * _factors(count, recipe.cj_bright, generator)
        mean = _grey(jittered).mean(dim=(1, 2, 3), keepdim=True)
        jittered = (jittered - mean) * _factors(count, recipe.cj_contrast, generator) + mean
        grey = _grey(jittered) if channels == 3 else jittered
        jittered = grey + (jittered - grey) * _factors(count, recipe.cj_sat, generator)
        images = torch.where(jitter, jittered.clamp(0, 255), images)
    if recipe.gray > 0 and channels == 3:
        images = torch.where(_per_image(_chance(count, recipe.gray, generator)), _grey(images), images)
    if recipe.blur > 0:
        blur = _chance(count, recipe.blur, generator)
        if blur.any():
            scale = min(height, width) / 224  # lightly's sigmas are for 224 px images
            low, high = recipe.sigmas[0] * scale, recipe.sigmas[1] * scale
            sigmas = (low + (high - low) * torch.rand(count, generator=generator)).clamp(min=1e-3)
            images = torch.where(_per_image(blur), _blurred(images, sigmas), images)
    if recipe.solarize > 0:
        solarize = _per_image(_chance(count, recipe.solarize, generator))
        images = torch.where(solarize & (images >= 128), 255 - images, images)
    return images.round().clamp(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)


def make_views(pixels: torch.Tensor, recipes: tuple[ViewRecipe, ...], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One view of every image per recipe (two for SimCLR and BYOL)."""
    return [make_view(pixels, recipe, generator) for recipe in recipes]
