"""Bad input through the command line: one clear line on stderr and exit code 2."""

import argparse
import json

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
    assert code == 0 and len(warnings) == 1 and "one document" in warnings[0] and f"--calib {path}+mix" in warnings[0]


@pytest.mark.parametrize("method, warned", [("flatten", True), ("width", True), ("sleb", False), ("minitron", False)])
def test_one_corpus_calibration_warns_methods_that_refit(capsys, tmp_path, method, warned):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("".join(f"Line {i} of book {name}, more words.\n" for i in range(800)))
    code = main(["compress", "--model", "tiny:llama", "--ratio", "0.5", "--method", method, "--calib", str(tmp_path),
                 "--num-calib-blocks", "4", "--calib-block-len", "32"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("depthkit: warning:")]
    assert code == 0 and len(warnings) == int(warned)
    if warned:  # the advice names a mixture that exists: the user's folder and depthkit's domains
        assert "one corpus" in warnings[0] and f"--calib {tmp_path}+mix" in warnings[0]


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


def interrupted_streamed_compression(tmp_path, signum):
    """A streamed compression in a subprocess, sent `signum` once its temporary folder is owned."""
    import subprocess
    import sys
    import time

    from depthkit.models.loading import DEFAULT_MODEL, load_tokenizer
    from depthkit.models.tiny import tiny_model

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    tiny_model("llama", num_layers=16, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    command = [sys.executable, "-m", "depthkit.cli.main", "compress", "--model", str(tmp_path / "src"), "--method",
               "sleb", "--ratio", "0.5", "--offload", "disk", "--calib", "austen", "--num-calib-blocks", "64",
               "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*/.depthkit-owner")) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the compression ended before it could be interrupted"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def test_sigterm_removes_the_temporary_output_folder(tmp_path):
    """`timeout`, Docker and schedulers send SIGTERM: a streamed compression stops without debris."""
    import signal

    code, err = interrupted_streamed_compression(tmp_path, signal.SIGTERM)
    assert code == 130 and "interrupted" in err
    assert not list(tmp_path.glob(".out.tmp-*")) and not (tmp_path / "out").exists()


def test_the_next_run_removes_what_a_sigkill_left(tmp_path, capsys):
    """SIGKILL lets no handler run: its temporary folder stays, and the next run with the same --out removes it."""
    import signal

    code, _ = interrupted_streamed_compression(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL and len(list(tmp_path.glob(".out.tmp-*"))) == 1
    assert main(["compress", "--model", str(tmp_path / "src"), "--method", "shortgpt", "--target-layers", "8",
                 "--offload", "disk", "--num-calib-blocks", "2", "--calib-block-len", "32", "--out",
                 str(tmp_path / "out")]) == 0
    assert "left by a killed run" in capsys.readouterr().err
    assert not list(tmp_path.glob(".out.tmp-*")) and (tmp_path / "out" / "config.json").exists()


def subcommand_parsers(parser, path=("depthkit",)):
    """Every (command path, parser) under `parser`, the parser itself included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subcommand_parsers(child, (*path, name))


@pytest.mark.parametrize("command", sorted(__import__("depthkit.cli.main").cli.main.command_help()))
def test_every_option_has_help_that_shows_its_default(command):
    """`--help` of every subcommand documents every option, and shows each concrete default once."""
    from depthkit.cli.main import build_parser

    parser = next(child for path, child in subcommand_parsers(build_parser([command])) if path[1:] == (command,))
    missing, undated = [], []
    for path, sub in subcommand_parsers(parser, (command,)):
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.dest == "help" or isinstance(action, argparse._SubParsersAction):
                continue
            name = " ".join(path) + " " + (action.option_strings or [action.dest])[0]
            text = formatter._get_help_string(action)
            if not (action.help or "").strip():
                missing.append(name)
            elif action.default not in (None, [], False, True) and text.count("(default") != 1:
                undated.append(f"{name}: {text}")
    assert not missing, f"options without help: {missing}"
    assert not undated, f"help that does not show its default exactly once: {undated}"


DAMAGES = {
    "truncated": lambda good: good[: len(good) // 2],
    "random": lambda good: bytes(range(256)) * 16,
    "empty": lambda good: b"",
}
LOADING_COMMANDS = {
    "eval ppl": ["eval", "ppl"],
    "eval zeroshot": ["eval", "zeroshot"],
    "analyze": ["analyze", "--out", "{tmp}/analysis"],
    "compress": ["compress", "--method", "shortgpt", "--ratio", "0.5", "--out", "{tmp}/compressed"],
    "compress --offload disk": ["compress", "--method", "shortgpt", "--ratio", "0.5", "--offload", "disk", "--out",
                                "{tmp}/streamed"],
    "recover": ["recover", "--out", "{tmp}/recovered"],
}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from depthkit.models.tiny import tiny_model

    folder = tmp_path_factory.mktemp("model")
    tiny_model("llama", num_layers=2).save_pretrained(folder)
    return folder


def damaged_copy(saved_model, tmp_path, damage: str):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    if damage == "config":
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
        return folder, f"{folder / 'config.json'} is not a valid model config"
    weights = folder / "model.safetensors"
    weights.write_bytes(DAMAGES[damage](weights.read_bytes()))
    return folder, f"{weights} is not a valid safetensors file"


@pytest.mark.parametrize("damage", [*DAMAGES, "config"])
@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_damaged_model_files_are_one_clear_line(capsys, saved_model, tmp_path, command, damage):
    folder, message = damaged_copy(saved_model, tmp_path, damage)
    argv = [arg.format(tmp=tmp_path) for arg in LOADING_COMMANDS[command]] + ["--model", str(folder)]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and err.startswith("depthkit: error: ")
    assert message in err and "re-fetch or re-save the model" in err and len(err.splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "model"]  # nothing written


TEXTS = {
    "latin-1": ("caf\xe9 au lait, cr\xe8me br\xfbl\xe9e\n" * 200).encode("latin-1"),
    "binary": bytes(range(256)) * 64,
    "nul bytes": b"\x00" * 4096,
}


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("argv", [["eval", "ppl", "--model", "tiny:llama", "--data", "{file}"],
                                  ["compress", "--model", "tiny:llama", "--method", "shortgpt", "--ratio", "0.5",
                                   "--calib", "{file}"]], ids=["--data", "--calib"])
def test_text_that_is_not_utf8_is_refused(capsys, tmp_path, argv, text):
    path = tmp_path / "input.txt"
    path.write_bytes(TEXTS[text])
    code, err = run_cli(capsys, *[arg.format(file=path) for arg in argv])
    expected = "is binary, not text" if text == "nul bytes" else "is not UTF-8 text"
    assert code == 2 and f"{path} {expected}" in err and len(err.splitlines()) == 1


@pytest.fixture
def no_network(monkeypatch):
    """The hub unreachable as on an offline machine: the probe's connection fails at once. Yields the
    list of probes made, so a test can check that depthkit asked once and gave up (no retry loop)."""
    import urllib.error

    import depthkit.utils.fetch as fetch

    probes = []

    def unreachable(*args, **kwargs):
        probes.append(args)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", unreachable)
    fetch.hub_reachable.cache_clear()
    yield probes
    fetch.hub_reachable.cache_clear()


def test_a_hub_id_without_network_fails_at_once(capsys, no_network):
    code, err = run_cli(capsys, "eval", "ppl", "--model", "someorg/somemodel")
    assert code == 2 and len(no_network) == 1  # one probe, then the error: no retries
    assert err == ("depthkit: error: the Hugging Face hub is not reachable and 'someorg/somemodel' is not in the local "
                   "hub cache; give a local model folder, tiny:llama or the offline default smollm2-135m-instruct")


def test_a_hub_id_without_network_loads_from_the_hub_cache(monkeypatch, saved_model, no_network):
    import huggingface_hub

    from depthkit.models.loading import resolve_model_path

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: str(saved_model / name) if repo == "someorg/cached" else None)
    assert resolve_model_path("someorg/cached") == str(saved_model)


def test_wikitext2_without_network_fails_at_once(capsys, no_network):
    code, err = run_cli(capsys, "eval", "ppl", "--model", "tiny:llama", "--window", "256", "--data", "wikitext2")
    assert code == 2 and len(no_network) == 1 and "WikiText-2 needs the Hugging Face hub" in err


def test_standard_zeroshot_tasks_without_network_fail_at_once(capsys, no_network):
    code, err = run_cli(capsys, "eval", "zeroshot", "--model", "tiny:llama", "--tasks", "piqa", "--limit", "2")
    assert code == 2 and len(no_network) == 1 and "not reachable" in err and "piqa" in err


def test_eval_ppl_default_window_fits_a_short_context(tmp_path, capsys):
    """The default window is 1024 tokens, or the model's context where it is shorter (tiny models: 512)."""
    code, err = run_cli(capsys, "eval", "ppl", "--model", "tiny:llama", "--max-tokens", "1024",
                        "--json", str(tmp_path / "ppl.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "ppl.json").read_text())["window"] == 512
