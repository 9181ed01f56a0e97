"""The VLM on the recursion machinery: token-type routing in the connector, exactness at R = 1,
per-step evaluation, save/reload, the CLI's errors, and one fast end-to-end run on SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthkit.cli.main import main as cli
from depthkit.errors import DepthkitError
from depthkit.models.loading import load_tokenizer
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from depthkit.vlm.batches import VQABatches
from depthkit.vlm.data import VQAConfig, build_vqa
from depthkit.vlm.evaluate import evaluate_steps, representation_stats, step_inputs
from depthkit.vlm.model import VISION_TOKEN, EncodedExample, VisionLanguageModel, build_vlm, collate, load_vlm
from depthkit.vlm.projector import Projector
from depthkit.vlm.train import VLMTrainSettings, train_stage1, train_stage2
from tests.conftest import interrupt_training

TINY_VQA = VQAConfig(seed=1, num_mnist=40, num_digits=20, num_pairs=12, photo_variants=2)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def tiny_vlm(tokenizer, model_type: str = "llama") -> VisionLanguageModel:
    model = tiny_model(model_type, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    return VisionLanguageModel(model, tokenizer, Projector(1280, model.config.hidden_size), num_image_tokens=49)


def random_batch(vlm: VisionLanguageModel, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    examples = [vlm.encode("What digit is this?", "7"), vlm.encode("Which is larger, the left or the right digit?",
                                                                   "Left")]
    return collate(examples, [torch.rand(49, 1280, generator=generator) for _ in examples], vlm.pad_id)


@pytest.fixture(scope="module")
def fake_features():
    dataset = build_vqa(TINY_VQA)
    generator = torch.Generator().manual_seed(0)
    return dataset, {i: torch.rand(49, 1280, generator=generator).to(torch.bfloat16) for i in dataset.image_ids()}


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_one_step_is_exactly_the_plain_decoder(tokenizer, model_type):
    vlm = tiny_vlm(tokenizer, model_type)
    batch = random_batch(vlm)
    embeddings = vlm.input_embeddings(batch)
    expected = vlm.language_model(inputs_embeds=embeddings).logits
    (step,) = list(vlm.steps(batch, 1))
    torch.testing.assert_close(vlm.decode(step.hidden), expected, rtol=1e-5, atol=1e-5)


def test_visual_tokens_land_exactly_on_the_image_positions(tokenizer):
    vlm = tiny_vlm(tokenizer)
    batch = random_batch(vlm)
    embeddings = vlm.input_embeddings(batch)
    vision = batch.token_types == VISION_TOKEN
    torch.testing.assert_close(embeddings[vision], vlm.projector(batch.features).reshape(-1, 64))
    text = vlm.language_model.model.embed_tokens(batch.input_ids)
    torch.testing.assert_close(embeddings[~vision], text[~vision])


def test_connector_starts_as_a_repeated_pass_and_routes_by_modality(tokenizer):
    vlm = tiny_vlm(tokenizer)
    connector = vlm.make_recursive(3, "connector", modality_specific=True, residual="embeddings",
                                   scale_init=0.0).connector
    assert connector.num_modalities == 2
    batch = random_batch(vlm)
    logits = vlm(batch)
    torch.testing.assert_close(logits[1], logits[0])  # scale 0: step 2 input = embeddings
    with torch.no_grad():
        connector.scale.fill_(1.0)
        for tap in range(len(connector.positions)):
            connector.projections[connector._index(tap, VISION_TOKEN)].weight.zero_()
    inputs = step_inputs(vlm, batch, 2)
    vision = batch.token_types == VISION_TOKEN
    torch.testing.assert_close(inputs[1][vision], inputs[0][vision])  # vision projection zeroed: no change
    assert (inputs[1][~vision] - inputs[0][~vision]).abs().amax(-1).min() > 0  # every text token changed


def test_shared_connector_and_vanilla_feedback(tokenizer):
    vlm = tiny_vlm(tokenizer)
    assert vlm.make_recursive(3, "connector", modality_specific=False).connector.num_modalities == 1
    vlm.make_recursive(3, "vanilla")
    batch = random_batch(vlm)
    hiddens = [s.hidden for s in vlm.steps(batch)]
    inputs = step_inputs(vlm, batch, 3)
    torch.testing.assert_close(inputs[1], hiddens[0])
    torch.testing.assert_close(inputs[2], hiddens[1])


def reference_answer(vlm: VisionLanguageModel, features: torch.Tensor, question: str, loops: int, count: int) -> str:
    """Greedy decoding that re-runs the whole prefix for every new token (no cache)."""
    example = vlm.encode(question)
    ids, types = example.input_ids, example.token_types
    for _ in range(count):
        batch = collate([EncodedExample(ids, types, torch.full_like(ids, -100))], [features], vlm.pad_id)
        *_, last = vlm.steps(batch, loops)
        token = int(vlm.decode(last.hidden[:, -1]).argmax(-1))
        ids, types = torch.cat([ids, torch.tensor([token])]), torch.cat([types, torch.tensor([0])])
    return vlm.tokenizer.decode(ids[len(example.input_ids):], skip_special_tokens=True).strip()


@pytest.mark.parametrize("feedback", ["connector", "vanilla"])
def test_cached_answer_equals_rerunning_the_prefix(tokenizer, feedback):
    vlm = tiny_vlm(tokenizer)
    recursive = vlm.make_recursive(3, feedback, modality_specific=True)
    if recursive.connector is not None:
        with torch.no_grad():
            recursive.connector.scale.fill_(0.5)  # a connector that changes every step's input
    features = torch.rand(49, 1280, generator=torch.Generator().manual_seed(3))
    vlm.image_features = lambda images: features.unsqueeze(0)
    expected = reference_answer(vlm, features, "What digit is this?", 3, 6)
    assert expected
    assert vlm.answer(np.zeros((8, 8), dtype=np.uint8), "What digit is this?", num_loops=3,
                      max_new_tokens=6) == expected


def test_evaluation_counts_and_perplexity(tokenizer, fake_features):
    dataset, features = fake_features
    vlm = tiny_vlm(tokenizer)
    vlm.make_recursive(2, "connector", lora_rank=2)
    heldout = VQABatches(vlm, dataset, "heldout", features, limit=6)
    quality = evaluate_steps(vlm, heldout, 2, batch_size=4, progress=False)
    assert [q.step for q in quality] == [1, 2]
    batch = heldout.batch(list(range(len(heldout))))
    with torch.no_grad():
        logits = vlm.language_model(inputs_embeds=vlm.input_embeddings(batch)).logits[:, :-1]
    targets = batch.labels[:, 1:]
    mask = targets != -100
    expected = torch.exp(F.cross_entropy(logits[mask].float(), targets[mask]))
    assert quality[0].perplexity == pytest.approx(float(expected), rel=1e-4)
    right = [bool((logits[i][mask[i]].argmax(-1) == targets[i][mask[i]]).all()) for i in range(len(heldout))]
    assert quality[0].accuracy == pytest.approx(sum(right) / len(right))
    stats = representation_stats(vlm, heldout, 2, batch_size=4, max_examples=4)
    assert set(stats) == {"text", "vision"}
    assert stats["vision"][0]["cka_to_embeddings"] == pytest.approx(1.0)


def test_training_lowers_the_loss(tokenizer, fake_features, tmp_path):
    dataset, features = fake_features
    vlm = build_vlm("tiny:llama", dtype="float32", with_encoder=False)
    train_set = VQABatches(vlm, dataset, "train", features)
    log = train_stage1(vlm, train_set, VLMTrainSettings(steps=12, batch_size=4, lr=3e-3, loss="sum"), progress=False)
    assert np.mean(log.losses[-3:]) < np.mean(log.losses[:3])
    log = train_stage2(vlm, train_set, VLMTrainSettings(steps=3, batch_size=4), num_loops=2, lora_rank=2,
                       progress=False)
    assert len(log.step_losses[0]) == 2
    with pytest.raises(DepthkitError, match="checkpoint"):
        load_vlm(tmp_path)


def test_interrupted_two_stage_training_resumes_to_the_same_weights(fake_features, tmp_path, monkeypatch):
    """Both stages as `depthkit vlm train` runs them, killed in stage 2: the resumed run takes stage 1
    from its last checkpoint and stage 2 from its own, and ends with the uninterrupted run's weights."""
    dataset, features = fake_features

    def run(folder=None, resume=False):
        vlm = build_vlm("tiny:llama", dtype="float32", with_encoder=False)
        train_set = VQABatches(vlm, dataset, "train", features)

        def stage(name):
            return {"checkpoint_dir": None if folder is None else folder / name, "resume": resume}

        first = train_stage1(vlm, train_set, VLMTrainSettings(steps=4, batch_size=4, lr=3e-3, loss="sum",
                                                               checkpoint_every=2),
                             progress=False, checkpointing=stage("stage1"))
        second = train_stage2(vlm, train_set, VLMTrainSettings(steps=5, batch_size=4, seed=1, checkpoint_every=2),
                              num_loops=2, lora_rank=2, progress=False, checkpointing=stage("stage2"))
        return vlm, [first.losses, second.step_losses]

    straight, straight_losses = run()
    folder = tmp_path / "vlm.checkpoints"
    interrupt_training(monkeypatch, at_step=4 + 4)  # stage 2's 4th step
    with pytest.raises(KeyboardInterrupt):
        run(folder)
    monkeypatch.undo()
    assert [p.name for p in sorted(folder.rglob("step-*"))] == ["step-0000002", "step-0000004", "step-0000002"]
    with pytest.raises(DepthkitError, match="earlier run"):
        run(folder)
    resumed, resumed_losses = run(folder, resume=True)
    assert resumed_losses == straight_losses
    theirs = dict(straight.named_parameters())
    assert all(torch.equal(p, theirs[name]) for name, p in resumed.named_parameters() if p.requires_grad)
    batch = random_batch(resumed)
    assert all(torch.equal(a, b) for a, b in zip(resumed(batch), straight(batch)))


def test_stage2_variants_can_start_from_one_lora(tokenizer, fake_features):
    """Building a connector draws random numbers first: without `lora_init` the LoRA starts would differ."""
    dataset, features = fake_features
    vlm = tiny_vlm(tokenizer)
    train_set = VQABatches(vlm, dataset, "train", features)
    torch.manual_seed(3)
    start = {k: v.clone() for k, v in vlm.make_recursive(1, "vanilla", lora_rank=2).adapters.state_dict().items()}
    torch.manual_seed(3)
    unaligned = vlm.make_recursive(2, "connector", lora_rank=2).adapters.state_dict()
    assert any(not torch.equal(unaligned[k], start[k]) for k in start)
    no_steps = VLMTrainSettings(steps=0)
    for feedback in ("vanilla", "connector"):
        train_stage2(vlm, train_set, no_steps, num_loops=2, feedback=feedback, lora_rank=2, lora_init=start,
                     progress=False)
        loaded = vlm.recursive.adapters.state_dict()
        assert all(torch.equal(loaded[k], start[k]) for k in start)
        assert all(p.requires_grad for p in vlm.recursive.adapters.parameters())


# -- CLI errors -------------------------------------------------------------------------------

def test_ask_rejects_bad_images_in_one_line(tmp_path, capsys):
    from PIL import Image

    text = tmp_path / "question.txt"
    text.write_text("hello")
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    truncated = tmp_path / "truncated.png"  # a valid header, then the pixel data cut short: undecodable
    truncated.write_bytes(whole.read_bytes()[:200])
    for path in (text, truncated, tmp_path / "nope.png"):
        assert cli(["vlm", "ask", "--image", str(path), "--question", "What?", "--model", "tiny:llama"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("depthkit: error:") and "\n" not in err


def test_ask_rejects_a_question_longer_than_the_context(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    code = cli(["vlm", "ask", "--image", str(image), "--question", "seven " * 600, "--model", "tiny:llama"])
    assert code == 2
    assert "context" in capsys.readouterr().err


# -- end to end on the real model ---------------------------------------------------------------

@pytest.mark.integration
def test_recursive_vlm_end_to_end_on_smollm2(tmp_path, capsys):
    """Real EfficientNet features + SmolLM2 (2 layers kept): stage 1, stage 2 at R = 2, evaluate, save, ask."""
    from depthkit.vlm.data import dataset_features

    dataset = build_vqa(VQAConfig(seed=5, num_mnist=16, num_digits=4, num_pairs=4, photo_variants=1))
    vlm = build_vlm(num_layers=2, with_encoder=True)
    features = dataset_features(dataset, vlm.encoder, progress=False)
    assert next(iter(features.values())).shape == (49, 1280)
    train_set = VQABatches(vlm, dataset, "train", features)
    train_stage1(vlm, train_set, VLMTrainSettings(steps=2, batch_size=4, loss="sum"), progress=False)
    log = train_stage2(vlm, train_set, VLMTrainSettings(steps=2, batch_size=4), num_loops=2, lora_rank=2,
                       progress=False)
    assert all(np.isfinite(log.losses))
    quality = evaluate_steps(vlm, VQABatches(vlm, dataset, "heldout", features, limit=8), 2, progress=False)
    assert len(quality) == 2 and all(np.isfinite(q.perplexity) for q in quality)
    vlm.save(tmp_path / "ckpt")
    from PIL import Image

    Image.fromarray(dataset.images[dataset.image_ids("heldout")[0]]).save(tmp_path / "digit.png")
    assert cli(["vlm", "ask", "--image", str(tmp_path / "digit.png"), "--question", "What digit is this?",
                "--loops", "2", "--checkpoint", str(tmp_path / "ckpt"), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
