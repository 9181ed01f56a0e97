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


@pytest.mark.parametrize(
    "calib, message",
    [
        ("austen+novels", "unknown corpus 'novels'"),
        ("mix+austen", "names a corpus twice"),
    ],
)
def test_bad_calibration_mixture_writes_nothing(capsys, tmp_path, calib, message):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "compress", "--model", "tiny:llama", "--ratio", "0.5", "--calib", calib,
                        "--out", str(out))
    assert code == 2 and err.startswith("depthkit: error: ") and message in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_calibration_too_short_and_empty_file(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("Only a few words here.\n" * 20)
    code, err = run_cli(capsys, "compress", "--model", "tiny:llama", "--ratio", "0.5", "--calib", str(tmp_path),
                        "--calib-split", "all", "--method", "shortgpt")
    assert code == 2 and "text too short" in err
    (tmp_path / "b.txt").write_text("")
    code, err = run_cli(capsys, "compress", "--model", "tiny:llama", "--ratio", "0.5", "--calib", str(tmp_path),
                        "--method", "shortgpt")
    assert code == 2 and "b.txt is empty" in err


def test_single_document_calibration_warns_once(capsys, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"Line {i} of one long book, with a few more words.\n" for i in range(3000)))
    code = main(["compress", "--model", "tiny:llama", "--ratio", "0.5", "--method", "shortgpt", "--calib", str(path),
                 "--num-calib-blocks", "4", "--calib-block-len", "32"])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("depthkit: warning:")]
    assert code == 0 and len(warnings) == 1 and "one document" in warnings[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "ppl", "--model", "tiny:llama", "--device", "bogus"], "unknown device 'bogus'"),
        (["eval", "ppl", "--model", "tiny:llama", "--batch-size", "0"], "--batch-size: must be >= 1"),
        (["eval", "ppl", "--model", "tiny:llama", "--max-tokens", "-1"], "--max-tokens: must be >= 0"),
        (["analyze", "--model", "tiny:llama", "--sample-tokens", "0", "--out", "x"], "must be >= 1"),
        (["recursive", "generate", "ckpt", "--prompt", "Hi", "--loops", "0"], "--loops: must be >= 1"),
        (["recursive", "eval", "ckpt", "--exit-threshold", "nan"], "--exit-threshold: must be a finite number"),
    ],
)
def test_out_of_range_numbers_and_devices_are_refused_before_any_work(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "error: argument" in err[-1] and message in err[-1]


def test_an_unexpected_failure_is_one_line_without_a_traceback(capsys, monkeypatch):
    import depthkit.cli.eval as eval_cli

    def broken(*args, **kwargs):
        raise ValueError("something inside torch went wrong\nwith a second line")

    monkeypatch.setattr(eval_cli, "load_model", broken)
    code, err = run_cli(capsys, "eval", "ppl", "--model", "tiny:llama")
    assert code == 1 and err == ("depthkit: error: ValueError: something inside torch went wrong "
                                 "(set DEPTHKIT_DEBUG=1 for the traceback)")


def test_flatten_groups_that_are_not_a_list_are_a_clear_error(capsys):
    code, err = run_cli(capsys, "compress", "--model", "tiny:llama", "--method", "flatten", "--ratio", "0.25",
                        "--option", "groups=abc")
    assert code == 2 and "groups must be a JSON list of lists" in err


def test_help_lists_every_command_without_importing_torch():
    """`depthkit --help` reads each command's HELP from its source: no torch, no transformers."""
    import subprocess
    import sys

    code = ("import sys; from depthkit.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "compress" in out and "recursive" in out and out.strip().endswith("False False")


def test_library_option_names_become_the_commands_flags(capsys, tmp_path):
    """The library says `target_layers`; the command line user reads --target-layers."""
    code, err = run_cli(capsys, "compress", "--model", "tiny:llama", "--method", "shortgpt", "--target-layers", "9",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "--target-layers must be in 1..3" in err and "`" not in err


def test_sigterm_removes_the_temporary_output_folder(tmp_path):
    """`timeout`, Docker and schedulers send SIGTERM: a streamed compression stops without debris."""
    import signal
    import subprocess
    import sys
    import time

    from depthkit.models.loading import DEFAULT_MODEL, load_tokenizer
    from depthkit.models.tiny import tiny_model

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    tiny_model("llama", num_layers=16, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "depthkit.cli.main", "compress", "--model", str(tmp_path / "src"), "--method",
               "sleb", "--ratio", "0.5", "--offload", "disk", "--calib", "austen", "--num-calib-blocks", "64",
               "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the compression ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err
    assert not list(tmp_path.glob(".out.tmp-*")) and not out.exists()
