"""Recovery fine-tuning: LoRA training, merging, resuming, distillation, data checks, CLI."""

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthkit.cli.main import main
from depthkit.errors import DepthkitError
from depthkit.models.adapters import get_adapter
from depthkit.models.loading import load_tokenizer
from depthkit.models.tiny import TINY_ARCHITECTURES, tiny_model
from depthkit.recover import CARD_FILE, RecoverySettings, attach_lora, distillation_loss, recover, save_merged
from depthkit.recover.trainer import evaluate, training_blocks
from tests.conftest import interrupt_training, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def patterned_stream(length: int = 8192, period: int = 48, seed: int = 0) -> torch.Tensor:
    """A token stream with structure to learn (a repeated random phrase), within the tiny vocab."""
    phrase = torch.randint(0, 256, (period,), generator=torch.Generator().manual_seed(seed))
    return phrase.repeat(length // period + 1)[:length]


def small_settings(**overrides) -> RecoverySettings:
    values = dict(steps=20, seq_len=32, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=10,
                  eval_tokens=128, checkpoint_every=10)
    values.update(overrides)
    return RecoverySettings(**values)


def mean_loss(card, steps):
    return sum(entry["loss"] for entry in card["losses"] if entry["step"] in steps) / len(steps)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_lora_recovery_in_bf16_lowers_loss_and_perplexity(tmp_path, tokenizer, arch):
    model = tiny_model(arch, dtype=torch.bfloat16)
    stream = patterned_stream()
    card = recover(model, tokenizer, stream, stream[:512], small_settings(), tmp_path, progress=False)
    assert mean_loss(card, range(16, 21)) < mean_loss(card, range(1, 6)) - 0.3
    assert card["perplexity_after"] < 0.8 * card["perplexity_before"]
    assert card["trainable_parameters"] > 0 and card["steps"] == 20
    assert not (tmp_path / "checkpoints").exists()  # removed after success by default
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.dtype == torch.bfloat16 and not any("lora" in k for k in reloaded.state_dict())


def test_bf16_base_with_fp32_adapters_tracks_fp32_training(tmp_path, tokenizer):
    stream = patterned_stream()
    settings = small_settings(steps=20, lr=3e-4, eval_every=20)
    cards = [recover(tiny_model("llama", dtype=dtype), tokenizer, stream, stream[:512], settings, tmp_path / str(dtype),
                     progress=False) for dtype in (torch.float32, torch.bfloat16)]
    fp32, bf16 = ([entry["loss"] for entry in card["losses"]] for card in cards)
    assert fp32[-1] < fp32[0] - 0.1 and bf16[-1] < bf16[0] - 0.1
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05


def test_adapters_are_float32_on_a_bf16_base_and_only_on_block_projections():
    peft_model = attach_lora(tiny_model("qwen3", dtype=torch.bfloat16), rank=4)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    wrapped = {n.split(".layers.")[1].split(".lora_")[0].split(".", 1)[1] for n in trainable}
    assert wrapped == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    frozen = [p for n, p in peft_model.named_parameters() if not p.requires_grad and "layers" in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_merged_checkpoint_reloads_with_the_peft_models_logits(tmp_path, arch):
    peft_model = attach_lora(tiny_model(arch), rank=4)
    with torch.no_grad():  # non-zero B so the adapters change the output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    ids = random_ids(peft_model)
    expected = peft_model(input_ids=ids).logits
    base = tiny_model(arch)(ids).logits
    assert (expected - base).abs().max() > 1e-2
    save_merged(peft_model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in key or "base_layer" in key for key in reloaded.state_dict())


def test_card_perplexity_is_the_saved_models(tmp_path, tokenizer):
    stream = patterned_stream()
    card = recover(tiny_model("llama"), tokenizer, stream, stream[:512], small_settings(steps=10), tmp_path,
                   progress=False, meta={"model": "tiny"})
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert evaluate(saved, stream[:512], small_settings()) == pytest.approx(card["perplexity_after"], rel=1e-4)
    on_disk = json.loads((tmp_path / "model" / CARD_FILE).read_text())
    assert on_disk["model"] == "tiny" and on_disk["perplexity_before"] == card["perplexity_before"]
    assert [e["step"] for e in on_disk["evals"]] == [10]


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, tokenizer, monkeypatch):
    stream = patterned_stream()
    settings = small_settings(steps=16, checkpoint_every=5)
    straight = recover(tiny_model("mistral"), tokenizer, stream, stream[:512], settings, tmp_path / "a",
                       progress=False)

    interrupt_training(monkeypatch, at_step=13)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        recover(tiny_model("mistral"), tokenizer, stream, stream[:512], settings, out, progress=False)
    assert not (out / "model").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["settings.json", "step-0000005", "step-0000010"]
    monkeypatch.undo()

    with pytest.raises(DepthkitError, match="`resume`"):
        recover(tiny_model("mistral"), tokenizer, stream, stream[:512], settings, out, progress=False)
    with pytest.raises(DepthkitError, match="lr: 0.01 -> 0.02"):
        recover(tiny_model("mistral"), tokenizer, stream, stream[:512], replace(settings, lr=2e-2), out, resume=True,
                progress=False)
    resumed = recover(tiny_model("mistral"), tokenizer, stream, stream[:512], settings, out, resume=True,
                      progress=False)
    assert [e["step"] for e in resumed["losses"]] == list(range(1, 17))
    for a, b in zip(straight["losses"], resumed["losses"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert resumed["perplexity_after"] == pytest.approx(straight["perplexity_after"], rel=1e-5)


def test_too_small_data_is_an_error_unless_repeating(tmp_path, tokenizer):
    stream = patterned_stream(length=1000)  # 31 blocks of 32
    with pytest.raises(DepthkitError, match="too small.*`allow_repeat`"):
        training_blocks(stream, small_settings(steps=20, batch_size=4))
    assert training_blocks(stream, small_settings(steps=5, batch_size=4)).shape == (20, 32)
    repeated = training_blocks(stream, small_settings(steps=20, batch_size=4, allow_repeat=True))
    assert repeated.shape == (31, 32)
    card = recover(tiny_model("qwen2"), tokenizer, stream, stream[:256],
                   small_settings(steps=20, batch_size=4, allow_repeat=True), tmp_path, progress=False)
    assert card["steps"] == 20 and card["epochs"] == pytest.approx(80 / 28)  # 7 full batches per epoch
    with pytest.raises(DepthkitError, match="not even one batch"):
        training_blocks(stream[:100], small_settings(allow_repeat=True))


def test_distillation_loss_and_training_towards_a_teacher(tmp_path, tokenizer):
    teacher = tiny_model("llama", num_layers=4)
    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(2, 5, 11), temperature=2.0).item() > 0
    student = tiny_model("llama", num_layers=4)
    adapter = get_adapter(student)
    adapter.set_layers(student, list(adapter.layers(student))[:2])  # the "compressed" model
    stream = patterned_stream()
    card = recover(student, tokenizer, stream, stream[:512], small_settings(distill_weight=1.0, temperature=2.0),
                   tmp_path, teacher=teacher, progress=False)
    assert {"loss", "ce", "kl"} <= set(card["losses"][0])
    assert mean_loss(card, range(16, 21)) < 0.7 * mean_loss(card, range(1, 6))
    with pytest.raises(DepthkitError, match="needs `teacher`"):
        recover(tiny_model("llama"), tokenizer, stream, stream[:512], small_settings(distill_weight=0.5),
                tmp_path / "x", progress=False)


def test_cli_recovers_a_saved_model(tmp_path, capsys, tokenizer):
    model_dir = tmp_path / "compressed"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.\n" * 120)
    argv = ["recover", "--model", str(model_dir), "--data", str(text), "--steps", "4", "--seq-len", "32",
            "--batch-size", "2", "--eval-tokens", "64", "--cpu", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    card = json.loads((tmp_path / "run" / "model" / CARD_FILE).read_text())
    assert card["steps"] == 4 and card["data"].endswith("[calib]") and card["eval_data"].endswith("[heldout]")
    assert "perplexity after" in capsys.readouterr().out
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "other"), "--distill-weight", "0.3"]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "big"), "--steps", "500"]) == 2
    assert "--allow-repeat" in capsys.readouterr().err
    assert not (tmp_path / "big" / "model").exists()


@pytest.mark.integration
def test_recovery_of_a_truncated_smollm2_lowers_heldout_perplexity(tmp_path):
    from depthkit.data import DataSpec, token_stream
    from depthkit.models.loading import load_model

    model, tokenizer = load_model()  # a fresh copy: the session fixture must stay intact
    adapter = get_adapter(model)
    adapter.set_layers(model, [layer for i, layer in enumerate(adapter.layers(model)) if i not in (13, 14, 15, 16)])
    train = token_stream(tokenizer, DataSpec("austen:mansfieldpark", "calib"))[:4096]
    heldout = token_stream(tokenizer, DataSpec("austen:persuasion", "heldout"))
    settings = RecoverySettings(steps=6, seq_len=128, batch_size=2, lr=2e-3, warmup_steps=1, eval_every=6,
                                eval_tokens=512, checkpoint_every=6)
    card = recover(model, tokenizer, train, heldout, settings, tmp_path, progress=False)
    assert card["perplexity_after"] < 0.95 * card["perplexity_before"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    assert saved.config.num_hidden_layers == 26
    assert evaluate(saved, heldout, settings) == pytest.approx(card["perplexity_after"], rel=0.02)
