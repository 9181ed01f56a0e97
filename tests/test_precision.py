"""The `auto` dtype: bf16 only where the hardware multiplies it natively (emulated bf16 is slower than fp32)."""

import pytest
import torch

from depthkit.cli.main import main
from depthkit.errors import DepthkitError
from depthkit.models.loading import load_model, resolve_dtype
from depthkit.recursive.train import RecursiveTrainSettings
from depthkit.utils.precision import (
    bf16_in_cpu_flags,
    dtype_name,
    fast_dtype,
    native_bfloat16,
    resolve_mixed_precision,
)

AVX2_EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
NEOVERSE_V2 = "Features\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [(AVX2_EPYC, False), (SAPPHIRE_RAPIDS, True), (NEOVERSE_V2, True),
                                             ("flags: avx512f avx512bw\n", False), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert bf16_in_cpu_flags(cpuinfo) is native


def test_auto_is_bf16_exactly_where_it_is_native():
    expected = torch.bfloat16 if native_bfloat16("cpu") else torch.float32
    assert fast_dtype("cpu") == resolve_dtype("auto") == resolve_dtype("auto", "cpu") == expected
    assert resolve_mixed_precision("auto", "cpu") == ("bf16" if expected == torch.bfloat16 else "no")
    assert not native_bfloat16("meta")  # no arithmetic at all: never bf16 for speed


def test_named_dtypes_and_precisions_are_kept_as_asked():
    assert resolve_dtype("bfloat16") == torch.bfloat16 and resolve_dtype("float32") == torch.float32
    assert resolve_mixed_precision("bf16") == "bf16" and resolve_mixed_precision("no") == "no"
    with pytest.raises(DepthkitError, match="choose from auto"):
        resolve_dtype("float8")
    with pytest.raises(DepthkitError, match="mixed precision must be one of auto"):
        RecursiveTrainSettings(mixed_precision="bf15").validate()


def test_models_load_in_the_auto_dtype_by_default():
    model, _ = load_model("tiny:llama")
    assert model.dtype == fast_dtype()
    assert load_model("tiny:llama", dtype="bfloat16")[0].dtype == torch.bfloat16


def test_commands_record_the_dtype_that_ran(tmp_path):
    """`--dtype auto` is resolved before the command runs, so its JSON says bfloat16 or float32."""
    path = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", "tiny:qwen3", "--max-tokens", "64", "--window", "32",
                 "--json", str(path)]) == 0
    assert f'"dtype": "{dtype_name(fast_dtype())}"' in path.read_text()
