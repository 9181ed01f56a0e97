"""Peak resident memory of block-by-block calibration capture: streaming vs fully loaded model.

    .venv/bin/python benchmarks/memory.py                 # default model + a simulated ~1.2B LLaMA
    .venv/bin/python benchmarks/memory.py --skip-large    # default model only

Every measurement runs in its own subprocess (so peaks do not mix) that captures every block's
input and output on calibration tokens, one block at a time, and reports its peak resident
memory (VmHWM and ru_maxrss):
- `baseline`: imports, tokenizer and calibration tokens only (what any mode pays anyway);
- `loaded`: `from_pretrained` in bf16, then `blockwise.iterate_blocks`;
- `streaming`: `StreamingModel.open` (meta skeleton, one block materialised at a time).
Both capture modes must produce the same final hidden states (checked, reported).
The simulated larger model is a randomly initialised LLaMA config (hidden 2048, MLP 5632, 22
blocks, 32 heads / 4 KV heads, vocab 49152, untied head; ~1.2B parameters) written to disk in
bf16 block by block with `StreamingWriter`, so even creating it never holds it whole.
Writes benchmarks/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from depthkit.data import DataSpec, token_blocks
from depthkit.models.loading import default_model_dir, load_tokenizer
from depthkit.models.streaming import StreamingModel, StreamingWriter, meta_skeleton, peak_memory_mb
from depthkit.utils.io import format_table, write_json

RESULTS = Path(__file__).parent / "results"
CALIB = DataSpec("austen:emma", "calib")
MODES = ("baseline", "loaded", "streaming")
DEFAULT = "smollm2-135m-instruct"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=16, help="calibration sequences")
    parser.add_argument("--block-len", type=int, default=256)
    parser.add_argument("--large-blocks", type=int, default=4, help="calibration sequences for the large model")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser.parse_args()


# -- the measured work (runs in a subprocess) ----------------------------------------------------
def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    ids = token_blocks(load_tokenizer(DEFAULT), CALIB, args.blocks, args.block_len)
    final = None
    if args.child == "loaded":
        from transformers import AutoModelForCausalLM

        from depthkit.models.blockwise import iterate_blocks

        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16, attn_implementation="sdpa")
        for _index, _block_in, block_out in iterate_blocks(model.eval(), ids):
            final = block_out
    elif args.child == "streaming":
        for _index, _block_in, block_out in StreamingModel.open(args.folder, dtype="bfloat16").iterate_blocks(ids):
            final = block_out
    result = {"mode": args.child, "seconds": time.perf_counter() - began, **peak_memory_mb()}
    if final is not None:
        result["final_sum"] = final.float().sum().item()
        result["final_head"] = final[0, -1, :8].float().tolist()
    print(json.dumps(result))


def measure(folder: Path, blocks: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    for mode in MODES:
        command = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--blocks", str(blocks),
                   "--block-len", str(args.block_len)] + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {mode}: peak {rows[-1].get('vmhwm_mb', rows[-1]['ru_maxrss_mb']):.0f} MiB, "
              f"{rows[-1]['seconds']:.1f} s", flush=True)
    return rows


# -- the simulated larger model ----------------------------------------------------------------
def large_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="bfloat16")


@torch.no_grad()
def write_large_model(out: Path) -> int:
    """A random ~1.2B LLaMA written block by block (never whole in memory); returns its parameter count."""
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = large_config()
    skeleton = meta_skeleton(config)
    skeleton.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=torch.bfloat16)
    skeleton.model.norm.weight = nn.Parameter(torch.ones(config.hidden_size, dtype=torch.bfloat16))
    skeleton.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=torch.bfloat16)
    count = 0
    with StreamingWriter(out, config, dtype="bfloat16") as writer:
        for module in (skeleton.model.embed_tokens, skeleton.lm_head):
            module.weight.normal_(0, 0.02)
        writer.write_non_layer(skeleton)
        count += sum(p.numel() for n, p in skeleton.named_parameters() if ".layers." not in n)
        for index in range(config.num_hidden_layers):
            layer = LlamaDecoderLayer(config, index).to(torch.bfloat16)
            for name, param in layer.named_parameters():
                if "proj" in name:
                    param.normal_(0, 0.02)
                else:
                    param.fill_(1.0)
            writer.write_layer(index, layer)
            count += sum(p.numel() for p in layer.parameters())
    return count


def summarise(name: str, params: int, rows: list[dict], tokens: str) -> list[dict]:
    by_mode = {row["mode"]: row for row in rows}
    base = by_mode["baseline"].get("vmhwm_mb", by_mode["baseline"]["ru_maxrss_mb"])
    out = []
    for mode in ("loaded", "streaming"):
        row = by_mode[mode]
        peak = row.get("vmhwm_mb", row["ru_maxrss_mb"])
        out.append({"model": name, "params (M)": params / 1e6, "calibration": tokens, "mode": mode,
                    "peak RSS (MiB)": peak, "above baseline (MiB)": peak - base, "seconds": row["seconds"]})
    same = by_mode["loaded"]["final_head"] == by_mode["streaming"]["final_head"] and (
        by_mode["loaded"]["final_sum"] == by_mode["streaming"]["final_sum"])
    for row in out:
        row["outputs identical"] = same
        row["baseline (MiB)"] = base
    return out


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    table, raw = [], {}
    folder = default_model_dir()
    print(f"default model ({folder})", flush=True)
    raw["default"] = measure(folder, args.blocks, args)
    params = sum(p.numel() for p in meta_skeleton(StreamingModel.open(folder).config).parameters())
    table += summarise(DEFAULT, params, raw["default"], f"{args.blocks}x{args.block_len}")
    if not args.skip_large:
        with tempfile.TemporaryDirectory(prefix="depthkit-large-") as tmp:
            print("writing the simulated ~1.2B model (block by block)", flush=True)
            began = time.perf_counter()
            large_params = write_large_model(Path(tmp) / "llama-1.2b")
            write_peak = peak_memory_mb()
            raw["large_write"] = {"seconds": time.perf_counter() - began, **write_peak}
            raw["large"] = measure(Path(tmp) / "llama-1.2b", args.large_blocks, args)
        table += summarise("random LLaMA 22x2048 (bf16)", large_params, raw["large"],
                           f"{args.large_blocks}x{args.block_len}")
    result = {"rows": table, "raw": raw,
              "machine": f"{platform.machine()}, torch {torch.__version__}, threads {args.threads or 'default'}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "memory.json", result)
    columns = ["model", "params (M)", "calibration", "mode", "peak RSS (MiB)", "above baseline (MiB)", "seconds",
               "outputs identical"]
    text = format_table(table, columns)
    note = ""
    if "large_write" in raw:
        note = (f"\n\nWriting the simulated model with `StreamingWriter` (random blocks created one at a time) "
                f"peaked at {raw['large_write'].get('vmhwm_mb', raw['large_write']['ru_maxrss_mb']):.0f} MiB "
                f"(imports, embeddings, head, one block and a 512 MiB shard buffer) in "
                f"{raw['large_write']['seconds']:.0f} s.")
    (RESULTS / "memory.md").write_text(
        "# Peak memory of block-by-block calibration capture\n\n"
        "Each row is a separate process capturing every block's input and output on calibration tokens of "
        f"{CALIB.describe()}, bf16. Peak RSS is VmHWM; the baseline (imports, tokenizer, tokens) is "
        "subtracted in 'above baseline'. `loaded` = `from_pretrained` + `blockwise.iterate_blocks`; "
        f"`streaming` = `StreamingModel` (one block materialised at a time).\n\n{text}{note}\n")
    print(text)


if __name__ == "__main__":
    main()
