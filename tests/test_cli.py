"""Bad input through the command line: one clear line on stderr and exit code 2."""

import pytest

from depthkit.cli.main import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "ppl", "--model", "/no/such/folder"], "model folder /no/such/folder does not exist"),
        (["eval", "ppl", "--model", "tiny:gpt2"], "no tiny config for 'gpt2'"),
        (["eval", "ppl", "--model", "tiny:llama", "--data", "/no/such.txt"], "unknown corpus"),
        (["eval", "ppl", "--model", "tiny:llama", "--window", "4096"], "larger than the model's context"),
        (["eval", "ppl", "--model", "tiny:llama", "--dtype", "int3"], "unknown dtype"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("depthkit: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_unsupported_architecture_folder(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    code, err = run_cli(capsys, "eval", "ppl", "--model", str(tmp_path))
    assert code == 2 and "unsupported architecture 'gpt2'" in err


def test_text_shorter_than_one_window(capsys, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Only a few words here.")
    code, err = run_cli(capsys, "eval", "ppl", "--model", "tiny:llama", "--data", str(path),
                        "--data-split", "all", "--window", "128")
    assert code == 2 and "less than one window of 128" in err


def test_existing_output_folder_is_refused(capsys, tmp_path):
    code, err = run_cli(capsys, "analyze", "--model", "tiny:llama", "--out", str(tmp_path))
    assert code == 2 and "already exists" in err
