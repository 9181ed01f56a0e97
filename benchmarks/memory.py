"""Peak memory and time of FlattenGPT compression: streaming from disk vs the whole model loaded.

    .venv/bin/python benchmarks/memory.py                 # default model, then a simulated ~2B LLaMA
    .venv/bin/python benchmarks/memory.py --skip-large    # default model only (about 10 minutes here)

Every run is its own subprocess (so peaks do not mix), reporting its peak resident memory (VmHWM):
- `baseline`: imports, tokenizer and calibration tokens only (what any mode pays anyway);
- `loaded`: `from_pretrained` (bf16) + `depthkit.compress(...)` + `save_compressed`: the in-memory
  path (FlattenGPT with iterative `local` pair selection);
- `streaming`: `compress_checkpoint(...)`, i.e. `depthkit compress --offload disk`: blocks read one
  at a time from the safetensors files (FlattenGPT: pairs scored in one pass), new blocks written
  as produced.
Both remove 20% of the blocks, with FlattenGPT and with ShortGPT (whose only working memory is the
calibration activations, so it shows the streaming overhead alone). For the default model the
held-out perplexity of both results is measured too (after the peak is recorded).

The simulated larger model is a randomly initialised LLaMA (hidden 2048, MLP 5632, 40 blocks,
32 heads / 4 KV heads, vocab 49152, untied head: ~2.0B parameters) written block by block with
`StreamingWriter` in float32 (7.8 GB; many hub checkpoints are fp32, as is the cached SmolLM2)
and computed in bf16 (3.9 GB). To show "larger than memory" on a 24 GiB machine, both paths run
under a cgroup memory limit (`--limit-gib`, default 3.5) SMALLER than the model's bf16 weights:
about the ratio of a 12B model (24 GB in bf16) to this machine. The page cache is dropped before
each run so that file pages are charged to the run's group. (A bf16 checkpoint loaded in bf16
would be memory-mapped by transformers, i.e. paged from disk by the OS, which is another way
of not holding it: the fp32 checkpoint needs the conversion that forces it into memory.)
The loaded path is expected to be killed by the limit (or to stall at it, evicting its own code
pages, until `--stall-seconds` stops it); the streaming path must finish. Without
cgroup v1 access the limit is skipped (and said so). Writes benchmarks/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from depthkit.data import DataSpec, token_blocks, token_stream
from depthkit.models.loading import default_model_dir, load_tokenizer
from depthkit.models.streaming import StreamingModel, StreamingWriter, meta_skeleton, peak_memory_mb
from depthkit.utils.io import format_table, write_json

RESULTS = Path(__file__).parent / "results"
CALIB = DataSpec("austen:emma", "calib")
HELD_OUT = DataSpec("austen:persuasion", "heldout")
MODES = ("baseline", "loaded", "streaming")
DEFAULT = "smollm2-135m-instruct"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=64, help="calibration sequences (default model)")
    parser.add_argument("--block-len", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--large-blocks", type=int, default=8, help="calibration sequences for the large model")
    parser.add_argument("--large-layers", type=int, default=40, help="blocks of the simulated model")
    parser.add_argument("--large-criterion", default="magnitude",
                        help="channel criterion on the large model (ols on 11,264 neurons is slow on 2 cores)")
    parser.add_argument("--limit-gib", type=float, default=3.5, help="cgroup memory limit for the large model")
    parser.add_argument("--stall-seconds", type=int, default=1200,
                        help="stop a run under the memory limit after this long: at the limit the kernel may evict "
                             "the process's own code pages over and over (thrashing) instead of killing it")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--criterion", default="ols", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="flatten", help=argparse.SUPPRESS)
    parser.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


# -- the measured work (runs in a subprocess) ----------------------------------------------------
def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    tokenizer = load_tokenizer(DEFAULT)  # the simulated model shares the default model's vocabulary
    ids = token_blocks(tokenizer, CALIB, args.blocks, args.block_len)
    options = {"selection": "local", "criterion": args.criterion} if args.method == "flatten" else {}
    result: dict = {"mode": args.child}
    if args.child == "loaded":
        from transformers import AutoModelForCausalLM

        from depthkit.compress.api import compress, save_compressed

        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16, attn_implementation="sdpa")
        report = compress(model.eval(), args.method, ratio=args.ratio, calib_ids=ids, **options)
        save_compressed(model, None, args.out, report)
        result["blocks"] = report.details.get("flattened_groups") or report.details.get("removed_blocks")
    elif args.child == "streaming":
        from depthkit.compress.api import compress_checkpoint

        # FlattenGPT streamed with one-pass pairs, as in the recorded runs (re-scoring rereads every block per step)
        streamed = options | ({"rescore": False} if args.method == "flatten" else {})
        report = compress_checkpoint(args.folder, args.out, args.method, ratio=args.ratio, calib_ids=ids, **streamed)
        result["blocks"] = report.details.get("flattened_groups") or report.details.get("removed_blocks")
    result |= {"seconds": time.perf_counter() - began, **peak_memory_mb()}
    if args.eval and args.child != "baseline":
        result["held_out_ppl"] = held_out_perplexity(args.out, tokenizer)
    print(json.dumps(result))


def held_out_perplexity(folder: str, tokenizer) -> float:
    from transformers import AutoModelForCausalLM

    from depthkit.evaluate.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    stream = token_stream(tokenizer, HELD_OUT)
    return perplexity(model, stream, window=512, max_tokens=20 * 512, batch_size=4, progress=False).perplexity


# -- running the children ------------------------------------------------------------------------
def memory_cgroup(limit_bytes: int) -> Path | None:
    """A cgroup v1 memory group limited to `limit_bytes`, or None where it cannot be made."""
    group = CGROUP_ROOT / f"depthkit-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_bytes))
    except OSError:
        return None
    return group


def drop_page_cache() -> None:
    """Evict cached file pages (root only; skipped otherwise) so a run starts cold and its reads
    are charged to its own memory group."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def run_child(mode: str, folder: Path, out: Path, blocks: int, args: argparse.Namespace,
              method: str, criterion: str, evaluate: bool, cgroup: Path | None) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--out", str(out),
               "--blocks", str(blocks), "--block-len", str(args.block_len), "--ratio", str(args.ratio),
               "--method", method, "--criterion", criterion] + (["--eval"] if evaluate else [])
    command += ["--threads", str(args.threads)] if args.threads else []
    join = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
    if cgroup:
        drop_page_cache()
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, preexec_fn=join,
                              timeout=args.stall_seconds if cgroup else None)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "killed": True, "seconds": time.perf_counter() - began,
                "error": f"stalled at the memory limit, stopped after {args.stall_seconds} s"}
    if done.returncode == -signal.SIGKILL:
        return {"mode": mode, "killed": True, "seconds": time.perf_counter() - began,
                "error": "killed by the memory limit (OOM)"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"mode": mode, "killed": False, "seconds": time.perf_counter() - began, "error": last}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"killed": False}


def measure(folder: Path, blocks: int, args: argparse.Namespace, method: str, criterion: str, evaluate: bool,
            cgroup: Path | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthkit-memory-out-") as tmp:
        for mode in MODES:
            row = run_child(mode, folder, Path(tmp) / mode, blocks, args, method, criterion, evaluate, cgroup)
            rows.append(row | {"method": method})
            peak = row.get("vmhwm_mb", row.get("ru_maxrss_mb"))
            status = row.get("error") or f"peak {peak:.0f} MiB"
            print(f"  {method} {mode}: {status}, {row['seconds']:.1f} s", flush=True)
    return rows


# -- the simulated larger model ----------------------------------------------------------------
def large_config(num_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=num_layers,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="bfloat16")


@torch.no_grad()
def write_large_model(out: Path, num_layers: int) -> int:
    """A random LLaMA written block by block (never whole in memory); returns its parameter count."""
    from torch import nn
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = large_config(num_layers)
    skeleton = meta_skeleton(config)
    skeleton.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=torch.bfloat16)
    skeleton.model.norm.weight = nn.Parameter(torch.ones(config.hidden_size, dtype=torch.bfloat16))
    skeleton.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=torch.bfloat16)
    count = 0
    with StreamingWriter(out, config, dtype="float32") as writer:
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


def summarise(name: str, params: int, rows: list[dict], tokens: str, limit: str) -> list[dict]:
    by_mode = {row["mode"]: row for row in rows}
    base = by_mode["baseline"].get("vmhwm_mb")
    out = []
    for mode in ("loaded", "streaming"):
        row = by_mode[mode]
        peak = row.get("vmhwm_mb")
        out.append({
            "model": name, "params (M)": params / 1e6, "calibration": tokens, "memory limit": limit,
            "method": row["method"], "mode": mode,
            "result": row.get("error") or "compressed", "peak RSS (MiB)": peak,
            "above baseline (MiB)": peak - base if peak is not None and base is not None else None,
            "seconds": row["seconds"], "held-out ppl": row.get("held_out_ppl"),
            "blocks merged or removed": row.get("blocks"),
        })
    return out


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    table, raw = [], {}
    folder = default_model_dir()
    print(f"default model ({folder}), ratio {args.ratio}", flush=True)
    params = StreamingModel.open(folder).parameter_count()
    for method in ("flatten", "shortgpt"):
        raw[f"default_{method}"] = measure(folder, args.blocks, args, method, "ols", evaluate=True)
        table += summarise(DEFAULT, params, raw[f"default_{method}"], f"{args.blocks}x{args.block_len}", "none")
    if not args.skip_large:
        with tempfile.TemporaryDirectory(prefix="depthkit-large-") as tmp:
            print(f"writing the simulated {args.large_layers}-block model (block by block)", flush=True)
            began = time.perf_counter()
            large_params = write_large_model(Path(tmp) / "llama-large", args.large_layers)
            raw["large_write"] = {"seconds": time.perf_counter() - began, **peak_memory_mb()}
            cgroup = memory_cgroup(int(args.limit_gib * 2**30))
            limit = f"{args.limit_gib:g} GiB (cgroup)" if cgroup else "none (no cgroup access)"
            print(f"  {large_params / 1e9:.2f}B parameters; memory limit: {limit}", flush=True)
            try:
                raw["large"] = measure(Path(tmp) / "llama-large", args.large_blocks, args, "flatten",
                                       args.large_criterion, evaluate=False, cgroup=cgroup)
            finally:
                if cgroup:
                    cgroup.rmdir()
        name = f"random LLaMA {args.large_layers}x2048 (fp32 file, bf16 compute)"
        table += summarise(name, large_params, raw["large"], f"{args.large_blocks}x{args.block_len}", limit)
    result = {"rows": table, "raw": raw, "ratio": args.ratio,
              "machine": f"{platform.machine()}, torch {torch.__version__}, threads {args.threads or 'default'}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "memory.json", result)
    columns = ["model", "params (M)", "calibration", "memory limit", "method", "mode", "result", "peak RSS (MiB)",
               "above baseline (MiB)", "seconds", "held-out ppl"]
    text = format_table(table, columns)
    (RESULTS / "memory.md").write_text(
        f"# Peak memory of depth compression (ratio {args.ratio}): streaming vs loaded\n\n"
        f"Each row is a separate process. Calibration: {CALIB.describe()}; held-out: {HELD_OUT.describe()} "
        "(20 x 512 tokens). Peak RSS is VmHWM; the baseline process (imports, tokenizer, tokens) is subtracted in "
        "'above baseline'. `loaded` = `from_pretrained` + in-memory compression (FlattenGPT: iterative local "
        "selection) + save; `streaming` = `depthkit compress --offload disk` (FlattenGPT: one-pass local selection; "
        "blocks read and written one at a time).\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
