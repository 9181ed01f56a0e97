"""Self-distillation for chat behaviour: the teacher's answers to prompts built from the training text."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthkit.recover.self_distill as self_distill
from depthkit.cli.main import main
from depthkit.compress.common import remove_blocks
from depthkit.data import DataSpec
from depthkit.data.blocks import sample_blocks
from depthkit.errors import DepthkitError
from depthkit.evaluate.behaviour import chat_prompts
from depthkit.models.loading import load_tokenizer
from depthkit.models.tiny import tiny_model
from depthkit.recover import CARD_FILE, RecoverySettings, recover, training_blocks
from depthkit.recover.self_distill import (
    INSTRUCTIONS,
    SET_FILE,
    answer_kl,
    generate_self_distill_set,
    interleaved,
    self_distill_prompts,
)
from tests.conftest import interrupt_training

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")  # has a chat template


@pytest.fixture(scope="module")
def text(tokenizer):
    """Real training text: 40 blocks of 64 tokens of Austen's calib split."""
    return sample_blocks(tokenizer, DataSpec("austen", "calib"), 40, 64)


def teacher_and_student(tokenizer):
    """A tiny teacher with confident predictions (a random model's are nearly uniform, so that any
    student would already be close to them) and the student: the teacher without two blocks."""
    teacher = tiny_model("llama", num_layers=4, vocab_size=len(tokenizer))
    with torch.no_grad():
        teacher.model.norm.weight.mul_(10)
    student = copy.deepcopy(teacher)
    remove_blocks(student, [1, 2])
    return teacher, student


def settings(**overrides) -> RecoverySettings:
    values = dict(steps=16, seq_len=64, batch_size=2, lr=1e-2, warmup_steps=2, eval_every=16, eval_tokens=128,
                  checkpoint_every=5, distill_weight=0.0, self_distill=8, self_distill_every=2, self_distill_tokens=12)
    values.update(overrides)
    return RecoverySettings(**values)


def test_prompts_come_from_the_training_text_never_from_the_evaluation(tokenizer, text):
    prompts = self_distill_prompts(tokenizer, text, 30, seed=0)
    assert prompts == self_distill_prompts(tokenizer, text, 30, seed=0)
    assert prompts != self_distill_prompts(tokenizer, text, 30, seed=1)
    training_text = tokenizer.decode(text.flatten())
    evaluation = chat_prompts()
    for prompt in prompts:
        kind = next(t for t in INSTRUCTIONS if prompt.startswith(t.split("{passage}")[0]))
        passage = prompt[len(kind.split("{passage}")[0]):]
        assert len(passage.split()) > 20 and " ".join(passage.split()) in " ".join(training_text.split())
        assert not any(question in prompt for question in evaluation)
    assert len({prompt.split("\n")[0] for prompt in prompts}) == len(INSTRUCTIONS)  # every instruction is used


def test_generated_set_is_deterministic_and_targets_only_the_answers(tokenizer, text):
    teacher, _ = teacher_and_student(tokenizer)
    prompts = self_distill_prompts(tokenizer, text, 3, seed=0)
    made = generate_self_distill_set(teacher, tokenizer, prompts, max_new_tokens=5, progress=False)
    again = generate_self_distill_set(teacher, tokenizer, prompts, max_new_tokens=5, progress=False)
    assert torch.equal(made.ids, again.ids) and torch.equal(made.targets, again.targets)
    assert made.answers == again.answers and made.prompts == prompts
    for ids, targets in zip(made.ids, made.targets):
        first = int(targets.nonzero()[0])
        assert 1 <= int(targets.sum()) <= 5 and targets[first:first + int(targets.sum())].all()
        assert "<|im_start|>assistant" in tokenizer.decode(ids[: first + 1])  # the answer follows the chat turn


def test_steps_interleave_text_and_chat_batches_from_any_start():
    text, chat = [f"t{i}" for i in range(3)], [f"c{i}" for i in range(2)]
    straight = list(zip(range(12), interleaved(text, chat, every=3)))
    assert [batch for _, batch in straight[:7]] == ["t0", "t1", "c0", "t2", "t0", "c1", "t1"]
    for start in (1, 3, 5):
        resumed = interleaved(text, chat, every=3, start=start)
        assert [next(resumed) for _ in range(12 - start)] == [batch for _, batch in straight[start:]]


def answers_kl(model, teacher, made) -> float:
    with torch.no_grad():
        return float(answer_kl(model(input_ids=made.ids).logits, teacher(input_ids=made.ids).logits, made.targets))


def test_training_on_the_teachers_answers_brings_the_student_closer_to_them(tmp_path, tokenizer, text):
    run = settings(lr=3e-3)
    teacher, _ = teacher_and_student(tokenizer)
    prompts = self_distill_prompts(tokenizer, training_blocks(text.flatten(), run), run.self_distill, run.seed)
    made = generate_self_distill_set(teacher, tokenizer, prompts, run.self_distill_tokens, progress=False)
    kl, cards = {}, {}
    for name, count in (("self-distilled", run.self_distill), ("text only", 0)):
        teacher, student = teacher_and_student(tokenizer)
        kl["before"] = answers_kl(student, teacher, made)
        cards[name] = recover(student, tokenizer, text.flatten(), text[:2].flatten(), replace(run, self_distill=count),
                              tmp_path / name, teacher=teacher, progress=False)
        kl[name] = answers_kl(AutoModelForCausalLM.from_pretrained(tmp_path / name / "model"), teacher, made)
    assert kl["self-distilled"] < 0.5 * kl["before"] and kl["self-distilled"] < 0.5 * kl["text only"]
    card = cards["self-distilled"]
    assert [e["step"] for e in card["losses"] if "self_distill_kl" in e] == list(range(2, 17, 2))
    assert card["self_distill"]["examples"] == 8 and card["self_distill"]["example"]["prompt"] == prompts[0]
    assert card["tokens_trained"] == 8 * 2 * 64  # the 8 text steps'


def test_interrupted_self_distillation_resumes_on_the_saved_set(tmp_path, tokenizer, text, monkeypatch):
    run = settings(steps=10)
    teacher, student = teacher_and_student(tokenizer)
    straight = recover(student, tokenizer, text.flatten(), text[:2].flatten(), run, tmp_path / "a", teacher=teacher,
                       progress=False)
    interrupt_training(monkeypatch, at_step=8)
    out = tmp_path / "b"
    teacher, student = teacher_and_student(tokenizer)
    with pytest.raises(KeyboardInterrupt):
        recover(student, tokenizer, text.flatten(), text[:2].flatten(), run, out, teacher=teacher, progress=False)
    monkeypatch.undo()
    assert (out / "checkpoints" / SET_FILE).exists()

    def no_generation(*args, **kwargs):
        raise AssertionError("a resumed run must train on the saved set")

    monkeypatch.setattr(self_distill, "generate_self_distill_set", no_generation)
    teacher, student = teacher_and_student(tokenizer)
    resumed = recover(student, tokenizer, text.flatten(), text[:2].flatten(), run, out, teacher=teacher, resume=True,
                      progress=False)
    assert [e["step"] for e in resumed["losses"]] == list(range(1, 11))
    for a, b in zip(straight["losses"], resumed["losses"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert not (out / "checkpoints").exists()


def test_self_distillation_needs_a_teacher_and_enough_examples(tmp_path, tokenizer, text):
    with pytest.raises(DepthkitError, match="`self_distill` needs `teacher`"):
        recover(tiny_model("llama"), tokenizer, text.flatten(), text[:2].flatten(), settings(), tmp_path,
                progress=False)
    for bad, message in (({"self_distill": -1}, "`self_distill` must be >= 0"),
                         ({"self_distill": 1}, "at least one step's 2 sequences"),
                         ({"self_distill_every": 1}, "`self_distill_every` must be >= 2"),
                         ({"self_distill_tokens": 0}, "`self_distill_tokens` must be >= 1")):
        with pytest.raises(DepthkitError, match=message):
            settings(**bad).validate()


@pytest.mark.parametrize(("extra", "message"), [
    (["--self-distill", "4"], "--self-distill needs --teacher"),
    (["--teacher", "{missing}", "--self-distill", "-1"], "--self-distill must be >= 0"),
    (["--teacher", "{missing}", "--self-distill", "4", "--self-distill-every", "1"],
     "--self-distill-every must be >= 2"),
    (["--teacher", "{missing}", "--self-distill", "1", "--batch-size", "2"], "--self-distill (1) must be at least"),
])
def test_cli_refuses_bad_self_distillation_before_loading_anything(tmp_path, capsys, extra, message):
    missing = str(tmp_path / "no-such-model")
    argv = ["recover", "--model", missing, "--out", str(tmp_path / "run"), *(a.format(missing=missing) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("depthkit: error:") and message in err[0]


def test_cli_self_distills_from_the_teacher(tmp_path, capsys, tokenizer):
    teacher_dir, model_dir = tmp_path / "teacher", tmp_path / "compressed"
    teacher, student = teacher_and_student(tokenizer)
    for model, folder in ((teacher, teacher_dir), (student, model_dir)):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    argv = ["recover", "--model", str(model_dir), "--teacher", str(teacher_dir), "--self-distill", "4",
            "--self-distill-tokens", "4", "--data", "austen", "--steps", "4", "--seq-len", "32", "--batch-size", "2",
            "--eval-tokens", "64", "--cpu", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    card = json.loads((tmp_path / "run" / "model" / CARD_FILE).read_text())
    assert card["self_distill"]["examples"] == 4 and card["settings"]["self_distill_every"] == 4
    assert [e["step"] for e in card["losses"] if "self_distill_kl" in e] == [4]
    assert "perplexity after" in capsys.readouterr().out
