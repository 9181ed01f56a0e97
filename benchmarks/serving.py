"""Serving under load: depthkit serve beside transformers serve, a compressed model, a looped model.

    .venv/bin/python benchmarks/serving.py             # every server below, 8 clients
    .venv/bin/python benchmarks/serving.py --quick     # smoke run: 2 clients, few short requests
    .venv/bin/python benchmarks/serving.py --servers original flatten24
    .venv/bin/python benchmarks/serving.py --looped r8 --servers "looped fixed R" "looped exit hidden, depthwise"

Each server (`SERVERS`) is started as its own process on the loopback address and warmed up; then,
for `--rounds` rounds, each is loaded in turn (an idle server uses no CPU) by `--clients` concurrent
clients, each sending `--requests` streaming completions back to back (throughput: the median over rounds):
prompts of `--prompt-tokens` held-out tokens sampled over every offline domain (never calibration
or training text), `--max-tokens` new tokens, greedy. Measured per server: throughput (completion
tokens of all clients over the wall time of the load), latency and time to first token (p50/p95),
loops per token (depthkit's usage), and the quality of what was generated: the continuations of
every looped server are scored by the looped model at full depth (teacher-forced perplexity,
relative to the exact full-depth decoding's own continuations) and compared token by token with
them. The teacher-forced perplexity cost of the early-exit threshold on held-out text is measured
too: each rule's threshold is the largest of a grid within 1% of full depth on CALIBRATION text, then
its cost is measured on held-out text (`early_exit_nll`, token by token with the KV reuse, as served).

Models (built once, cached under the depthkit cache's `bench/`): the original SmolLM2-135M, its
30 -> 24 FlattenGPT model (`depthkit compress`, default options), and a looped model of
`LOOPED_MODELS` (`--looped`; `depthkit recursive train`, 6 stepwise layers of which the first and last
run once around a 4-layer loop, 300 steps): `r4`, the README's (R = 4, connector), `r8` (R = 8, the
last hidden state fed back, trained with the monotonic loss over every step), both trained on Austen
alone, or `r8mix`, `r8`'s recipe trained on calibration text of every offline domain. The looped
model's perplexity after every step is reported too (whether deeper steps still help). The two
`looped mixed R` servers load the looped model with clients that ask for different depths (client i
asks for i mod R + 1 loops): what depth-wise batching gains when rows need different numbers of steps, apart
from any exit rule. Tokens are the completion tokens each server reports generating (OpenAI's
`usage`, asked for with `stream_options.include_usage`; a server that reports none has its text
re-tokenized, which undercounts: byte-level BPE merges some generated token pairs when it
re-tokenizes, e.g. 1520 tokens for 1536 generated).
Writes benchmarks/results/serving{,_r8,_r8mix}{,_TAG}{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from depthkit.data import DataSpec  # noqa: E402
from depthkit.data.blocks import sample_blocks, token_stream  # noqa: E402
from depthkit.data.corpora import MIX_COMPONENTS  # noqa: E402
from depthkit.models.loading import default_model_dir, load_tokenizer  # noqa: E402
from depthkit.paths import cache_dir  # noqa: E402
from depthkit.recursive.generate import LoopsReport, early_exit_nll  # noqa: E402
from depthkit.recursive.model import RecursiveModel, tokenizer_folder  # noqa: E402
from depthkit.recursive.train import step_perplexities  # noqa: E402
from depthkit.serve.engine import HEAD_PATIENCE, Engine, GenerationParams, Sequence  # noqa: E402
from depthkit.serve.models import load_servable  # noqa: E402
from depthkit.utils.figures import save_figure  # noqa: E402
from depthkit.utils.io import format_table, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BENCH = cache_dir() / "bench"
FLATTEN24 = BENCH / "smollm2-flatten24"
CLI = [sys.executable, "-m", "depthkit.cli.main"]
# name -> (server kind, model, depthkit serve options, early-exit rule or None)
SERVERS: dict[str, tuple[str, str, list[str], str | None]] = {
    "original (transformers serve)": ("transformers", "original", [], None),
    "original (transformers serve, CB)": ("transformers", "original", ["--continuous-batching"], None),
    "original": ("depthkit", "original", [], None),
    "flatten24": ("depthkit", "flatten24", [], None),
    "looped fixed R": ("depthkit", "looped", ["--schedule", "lockstep"], None),
    # requests ask for the depth with the lowest perplexity on CALIBRATION text (`loops`, the API's extra field)
    "looped fixed best R": ("depthkit", "looped", ["--schedule", "lockstep"], None),
    "looped exit kl, depthwise": ("depthkit", "looped", ["--schedule", "depthwise"], "kl"),
    "looped exit hidden, lockstep": ("depthkit", "looped", ["--schedule", "lockstep"], "hidden"),
    "looped exit hidden, depthwise": ("depthkit", "looped", ["--schedule", "depthwise"], "hidden"),
    # the same without the batched LM head (`depthkit serve --head-patience 0`): the head runs whenever a token is done
    "looped exit hidden, depthwise, head at once": ("depthkit", "looped", ["--schedule", "depthwise",
                                                                          "--head-patience", "0"], "hidden"),
    # clients asking for different depths (client i: `loops` = i mod R + 1), no early exit: every token is
    # exact at its request's depth; lockstep waits for the deepest row, depth-wise lets the others move on
    "looped mixed R, lockstep": ("depthkit", "looped", ["--schedule", "lockstep"], None),
    "looped mixed R, depthwise": ("depthkit", "looped", ["--schedule", "depthwise"], None),
}
EXACT = "looped fixed R"
BEST_DEPTH = "looped fixed best R"
MIXED_DEPTHS = ("looped mixed R, lockstep", "looped mixed R, depthwise")


@dataclass(frozen=True)
class LoopedRecipe:
    """A looped model the benchmark serves: its folder in the cache, its depth R and how it is trained."""

    folder: Path
    loops: int
    train: tuple[str, ...]


TRAINING = ("--layers", "6", "--layer-pick", "stepwise", "--ends", "1", "--interleave", "--seq-len", "128",
            "--steps", "300", "--lr", "5e-4")
AUSTEN = ("--data", "austen", "--eval-data", "austen:persuasion")  # `recursive train`'s default before mix
LOOPED_MODELS = {
    "r4": LoopedRecipe(BENCH / "looped-r4", 4, TRAINING + AUSTEN + ("--loops", "4")),
    "r8": LoopedRecipe(BENCH / "looped-r8", 8, TRAINING + AUSTEN + ("--loops", "8", "--feedback", "vanilla",
                                                                    "--loss", "monotonic")),
    "r8mix": LoopedRecipe(BENCH / "looped-r8-mix", 8, TRAINING + ("--loops", "8", "--feedback", "vanilla",
                                                                 "--loss", "monotonic", "--data", "mix",
                                                                 "--eval-data", "mix")),
}
# Early-exit thresholds tried on CALIBRATION text; the largest whose perplexity cost stays under
# `EXIT_BUDGET` is served (held-out text then says what it really costs).
EXIT_GRID = {"kl": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "hidden": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]}
EXIT_BUDGET = 0.01


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS), metavar="NAME")
    p.add_argument("--looped", default="r4", choices=list(LOOPED_MODELS), help="the looped model served")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=3, help="requests per client, back to back")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rows", type=int, default=8, help="depthkit serve --rows")
    p.add_argument("--rounds", type=int, default=3, help="times each server is loaded, in turn (median)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one server's load may take")
    p.add_argument("--exit-tokens", type=int, default=128,
                   help="tokens per domain for choosing the exit thresholds (calib) and measuring their cost (heldout)")
    p.add_argument("--tag", default="", help="added to the output files' name (a run of some servers only)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.prompt_tokens, args.exit_tokens = 2, 1, 8, 16, 32
        args.rounds = 1
    args.recipe = LOOPED_MODELS[args.looped]
    return args


# -- models -------------------------------------------------------------------------------------------
def model_folder(kind: str, recipe: LoopedRecipe) -> Path:
    """The model's folder, built once: `depthkit compress` / `depthkit recursive train` into the cache."""
    if kind == "original":
        return default_model_dir()
    if kind == "flatten24" and not FLATTEN24.is_dir():
        run_cli(["compress", "--method", "flatten", "--ratio", "0.2", "--out", str(FLATTEN24)])
    if kind == "looped" and not recipe.folder.is_dir():
        run_cli(["recursive", "train", *recipe.train, "--out", str(recipe.folder)])
    return {"flatten24": FLATTEN24, "looped": recipe.folder}[kind]


def run_cli(arguments: list[str]) -> None:
    print("building:", "depthkit", " ".join(arguments), flush=True)
    subprocess.run(CLI + arguments, check=True)


def held_out_prompts(count: int, length: int) -> list[str]:
    """`count` prompts of `length` tokens, held-out text of every offline domain in turn."""
    tokenizer = load_tokenizer(str(default_model_dir()))
    per_domain = -(-count // len(MIX_COMPONENTS))
    blocks = [sample_blocks(tokenizer, DataSpec(domain, "heldout"), per_domain, length) for domain in MIX_COMPONENTS]
    ordered = [block for group in zip(*blocks) for block in group][:count]
    return [tokenizer.decode(block, skip_special_tokens=True) for block in ordered]


# -- servers ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(name: str, folder: Path, args: argparse.Namespace, thresholds: dict[str, float]
                 ) -> tuple[subprocess.Popen, str, list[dict[str, Any]]]:
    """The server process, its URL and what each client's requests carry (the model name, extra fields)."""
    kind, _, options, rule = SERVERS[name]
    port = free_port()
    if kind == "transformers":
        command = [str(Path(sys.executable).parent / "transformers"), "serve", str(folder), "--port", str(port),
                   "--host", "127.0.0.1", "--device", "cpu", "--dtype", "bfloat16", *options]
        model = str(folder)
    else:
        exit_options = ["--exit-rule", rule, "--exit-threshold", str(thresholds[rule])] if rule else []
        command = CLI + ["serve", str(folder), "--port", str(port), "--rows", str(args.rows),
                         "--served-model-name", "bench", *options, *exit_options]
        model = "bench"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, [{"model": model} | depth_request(name, client, args)
                                      for client in range(args.clients)]
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"{name} did not answer /health within 300 s")


def depth_request(name: str, client: int, args: argparse.Namespace) -> dict[str, Any]:
    """The recursion depth a client asks for (`loops`, the API's extra field), where the server's load sets it."""
    if name == BEST_DEPTH:
        return {"loops": args.best_loops}
    if name in MIXED_DEPTHS:
        return {"loops": client % args.recipe.loops + 1}
    return {}


def stream_request(url: str, request: dict[str, Any], prompt: str, max_tokens: int, timeout: float
                   ) -> dict[str, Any]:
    """One streaming completion: its text, time to first text, latency and the server's usage.

    The clients share the machine's 2 cores with the server, so they do as little as they can while
    it runs: the standard library's HTTP client (httpx took several times the CPU, an ad-hoc check),
    reading the stream as raw bytes and parsing its events only until the first text arrives (for
    the time to first token) and then once the response has ended. Parsing every event as it came
    cost the clients about as much CPU per token as the server's own event loop (ad hoc), time taken
    from the engine, and a larger share of a faster server's."""
    body = json.dumps(request | {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                 "stream_options": {"include_usage": True}})
    address = urlsplit(url)
    start, first, received = time.perf_counter(), None, bytearray()
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        while chunk := response.read1(1 << 16):  # chunked transfer decoded by http.client
            received += chunk
            if first is None and any(text for text, _ in sse_events(received)):
                first = time.perf_counter() - start
    finally:
        connection.close()
    latency = time.perf_counter() - start
    events = list(sse_events(received))
    usage = next((usage for _, usage in reversed(events) if usage), {})
    return {"prompt": prompt, "text": "".join(text for text, _ in events),
            "ttft": first if first is not None else latency, "latency": latency,
            "loops_per_token": usage.get("mean_loops_per_token"), "loops_asked": request.get("loops"),
            "completion_tokens": usage.get("completion_tokens")}


def sse_events(data: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    """(text, usage) of each complete server-sent event of a completion stream (`[DONE]` skipped)."""
    for line in data.split(b"\n")[:-1]:
        if line.startswith(b"data: ") and line.rstrip() != b"data: [DONE]":
            chunk = json.loads(line[len(b"data: "):])
            yield "".join(choice.get("text") or "" for choice in chunk.get("choices") or []), chunk.get("usage") or {}


def load(url: str, requests: list[dict[str, Any]], prompts: list[str], args: argparse.Namespace
         ) -> tuple[list[dict], float]:
    """`--clients` clients, each sending its share of the prompts back to back with its own request
    fields; returns results and wall time."""
    shares = [prompts[i::args.clients] for i in range(args.clients)]

    def client(index: int) -> list[dict]:
        return [stream_request(url, requests[index], prompt, args.max_tokens, args.timeout)
                for prompt in shares[index]]

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = [r for share in pool.map(client, range(args.clients)) for r in share]
    return results, time.perf_counter() - start


def measure_servers(names: list[str], prompts: list[str], args: argparse.Namespace, tokenizer,
                    thresholds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Every server started and warmed up, then loaded in turn for `--rounds` rounds (idle servers
    use no CPU), so that a slow spell of the machine hits every server alike; throughput is the median
    over rounds, latencies pool every request."""
    servers = {}
    try:
        for name in names:
            print(f"starting: {name}", flush=True)
            servers[name] = start_server(name, model_folder(SERVERS[name][1], args.recipe), args, thresholds)
            _, url, requests = servers[name]
            stream_request(url, requests[0], prompts[0], 4, args.timeout)  # warm-up
        rounds: dict[str, list[tuple[list[dict], float]]] = {name: [] for name in names}
        for index in range(args.rounds):
            for name, (_, url, requests) in servers.items():
                rounds[name].append(load(url, requests, prompts, args))
                results, wall = rounds[name][-1]
                print(f"  round {index + 1} {name}: {count_tokens(tokenizer, results) / wall:.1f} tokens/s", flush=True)
    finally:
        for process, _, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    return {name: summarize(name, runs, tokenizer) for name, runs in rounds.items()}


def count_tokens(tokenizer, results: list[dict]) -> int:
    """Completion tokens generated: as the server reports them, or else its text re-tokenized."""
    return sum(r["completion_tokens"] if r["completion_tokens"] is not None
               else len(tokenizer(r["text"], add_special_tokens=False).input_ids) for r in results)


def summarize(name: str, rounds: list[tuple[list[dict], float]], tokenizer) -> dict[str, Any]:
    rates = [count_tokens(tokenizer, results) / wall for results, wall in rounds]
    pooled = [r for results, _ in rounds for r in results]
    loops = [r["loops_per_token"] for r in pooled if r["loops_per_token"] is not None]
    return {"server": name, "requests": len(pooled), "completion_tokens": count_tokens(tokenizer, pooled),
            "tokens_per_s": statistics.median(rates), "tokens_per_s_rounds": rates,
            "latency_p50": percentile([r["latency"] for r in pooled], 50),
            "latency_p95": percentile([r["latency"] for r in pooled], 95),
            "ttft_p50": percentile([r["ttft"] for r in pooled], 50),
            "ttft_p95": percentile([r["ttft"] for r in pooled], 95),
            "loops_per_token": statistics.fmean(loops) if loops else None,
            "by_depth": by_depth(pooled),
            "continuations": [{"prompt": r["prompt"], "text": r["text"]} for r in rounds[0][0]]}


def by_depth(results: list[dict]) -> dict[int, dict[str, float]]:
    """Latency and time to first token (p50) of the requests at each depth they asked for (mixed-depth loads)."""
    depths = sorted({r["loops_asked"] for r in results if r["loops_asked"] is not None})
    return {depth: {key: percentile([r[key] for r in results if r["loops_asked"] == depth], 50)
                    for key in ("latency", "ttft")} for depth in depths}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- early exit: thresholds chosen on calibration text, costs measured on held-out text ---------------------
def domain_stream(tokenizer, split: str, tokens: int) -> torch.Tensor:
    return torch.cat([token_stream(tokenizer, DataSpec(d, split))[:tokens] for d in MIX_COMPONENTS])


def looped_model(recipe: LoopedRecipe) -> tuple[RecursiveModel, Any]:
    folder = model_folder("looped", recipe)
    return RecursiveModel.from_pretrained(folder, "float32"), load_tokenizer(str(tokenizer_folder(folder)))


def exit_cost(model: RecursiveModel, stream: torch.Tensor, window: int, rule: str, threshold: float | None
              ) -> tuple[float, LoopsReport]:
    """Perplexity and loop counts decoding `stream` token by token with early exit (as served)."""
    nll, report = early_exit_nll(model, stream, model.config.num_loops, threshold, window=window,
                                 max_windows=len(MIX_COMPONENTS), progress=False, rule=rule)
    return math.exp(nll), report


def choose_thresholds(model: RecursiveModel, streams: dict[str, torch.Tensor], window: int
                      ) -> tuple[dict[str, float], list[dict]]:
    """Per rule, the largest threshold of `EXIT_GRID` within `EXIT_BUDGET` of full depth on CALIB text,
    and every threshold's cost on calib and held-out text."""
    full = {split: exit_cost(model, stream, window, "kl", None)[0] for split, stream in streams.items()}
    rows, chosen = [], {}
    for rule, grid in EXIT_GRID.items():
        for threshold in grid:
            row = {"rule": rule, "threshold": threshold}
            for split, stream in streams.items():
                ppl, report = exit_cost(model, stream, window, rule, threshold)
                row |= {f"{split}_ppl_cost": ppl / full[split] - 1, f"{split}_loops_saved": report.saved_fraction}
            row["heldout_exit_steps"] = "/".join(map(str, report.step_counts()))  # tokens stopping at steps 1..R
            rows.append(row)
            if row["calib_ppl_cost"] < EXIT_BUDGET:
                chosen[rule] = threshold
        chosen.setdefault(rule, grid[0])
    for row in rows:
        row["chosen"] = chosen[row["rule"]] == row["threshold"]
    return chosen, rows


@torch.no_grad()
def continuation_quality(runs: dict[str, dict], model: RecursiveModel, tokenizer) -> dict[str, dict]:
    """Every looped server's continuations scored by the looped model at full depth (teacher-forced NLL
    of the continuation given its prompt) and compared token by token with the exact decoding's."""
    if EXACT not in runs:
        return {}
    exact = {c["prompt"]: c["text"] for c in runs[EXACT]["continuations"]}
    quality = {}
    for name, run in runs.items():
        if SERVERS[name][1] != "looped" or name in MIXED_DEPTHS:  # mixed: each request at its own depth
            continue
        nll, count, agree, compared = 0.0, 0, 0, 0
        for item in run["continuations"]:
            prompt = tokenizer(item["prompt"]).input_ids
            new = tokenizer(item["text"], add_special_tokens=False).input_ids
            reference = tokenizer(exact[item["prompt"]], add_special_tokens=False).input_ids
            agree += sum(a == b for a, b in zip(new, reference))
            compared += max(len(new), len(reference))
            if not new:
                continue
            ids = torch.tensor([prompt + new])
            log_probs = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
            nll -= float(log_probs.gather(-1, torch.tensor(new).unsqueeze(-1)).sum())
            count += len(new)
        quality[name] = {"continuation_ppl": math.exp(nll / max(count, 1)), "token_agreement": agree / max(compared, 1)}
    return quality


# -- where a schedule's time goes ---------------------------------------------------------------------
ENGINE_PARTS = ("prelude", "block", "coda", "head")


def engine_calls(names: list[str], prompts: list[str], args: argparse.Namespace,
                 thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """Each depthkit server's engine run in process on one request per client (the servers' model, dtype,
    rows, schedule, exit rule and depths; no end-of-text token, so every request runs `--max-tokens`),
    `--rounds` times: decode-phase model calls per token by part (`Engine.calls`, of the last round) and
    tokens/s without HTTP (median; over HTTP the server's event loop and the clients share the machine's
    cores with the engine). On a CPU a call costs about the same for 1 row as for 8, so calls per token
    say what a schedule costs."""
    models: dict[str, tuple[RecursiveModel, Any]] = {}
    rows = []
    for name in [name for name in names if SERVERS[name][0] == "depthkit"]:
        _, kind, options, rule = SERVERS[name]
        if kind not in models:  # as served: the device's fastest dtype
            models[kind] = load_servable(str(model_folder(kind, args.recipe)), "auto")
        model, tokenizer = models[kind]
        ids = [tokenizer(prompt).input_ids for prompt in prompts[:args.clients]]
        speeds = []
        for _ in range(args.rounds):
            engine, seconds = run_engine(name, model, ids, args, thresholds)
            speeds.append(engine.calls["tokens"] / seconds)
        tokens = engine.calls["tokens"]
        rows.append({"server": name, "tokens_per_s_in_process": statistics.median(speeds)}
                    | {f"{part}_calls_per_token": engine.calls[part] / tokens for part in ENGINE_PARTS})
    return rows


def run_engine(name: str, model: RecursiveModel, ids: list[list[int]], args: argparse.Namespace,
               thresholds: dict[str, float]) -> tuple[Engine, float]:
    """A fresh engine as server `name` runs it, serving one request per client to the end; its seconds."""
    _, _, options, rule = SERVERS[name]
    flags = dict(zip(options[::2], options[1::2]))
    schedule = {"schedule": flags["--schedule"]} if "--schedule" in flags else {}
    engine = Engine(model, set(), rows=args.rows, head_patience=float(flags.get("--head-patience", HEAD_PATIENCE)),
                    **schedule)
    exits = {"exit_threshold": thresholds[rule], "exit_rule": rule} if rule else {}
    for client, prompt in enumerate(ids):
        depth = depth_request(name, client, args).get("loops")
        engine.submit(Sequence(prompt, GenerationParams(max_tokens=args.max_tokens, temperature=0, loops=depth,
                                                        **exits)))
    start = time.perf_counter()
    engine.run_until_idle()
    return engine, time.perf_counter() - start


# -- report -------------------------------------------------------------------------------------------
def targets(runs: dict[str, dict], exits: list[dict], calls: list[dict]) -> list[str]:
    """Each target's ratio over HTTP (what it is judged on), with the engines' ratio in process beside it."""
    in_process = {row["server"]: row["tokens_per_s_in_process"] for row in calls}

    def ratio(a: str, b: str) -> float | None:
        return runs[a]["tokens_per_s"] / runs[b]["tokens_per_s"] if a in runs and b in runs else None

    lines = []
    checks = [("looped exit hidden, depthwise", EXACT, 1.5,
               "depth-wise batching with early exit (hidden rule) vs fixed R, plain batching"),
              ("looped exit kl, depthwise", EXACT, 1.5, "depth-wise batching with early exit (KL rule) vs fixed R"),
              ("flatten24", "original", 1.2, "the 24-block model vs the original"),
              ("original", "original (transformers serve)", 1.0, "depthkit serve vs transformers serve"),
              ("original", "original (transformers serve, CB)", 1.0,
               "depthkit serve vs transformers serve --continuous-batching")]
    for a, b, goal, what in checks:
        value = ratio(a, b)
        if value is not None:
            lines.append(f"- {what}: {value:.2f}x tokens/s (target >= {goal}): **{'yes' if value >= goal else 'no'}**")
        if a in in_process and b in in_process:
            lines.append(f"  - the engines in process, no HTTP: {in_process[a] / in_process[b]:.2f}x")
    # not targets: what the depth-wise server gains over the alternatives a user has
    for a, b, what in [("looped exit hidden, depthwise", BEST_DEPTH,
                        "depth-wise batching with early exit (hidden rule) vs the best fixed depth on calib text"),
                       ("looped exit hidden, depthwise", "looped exit hidden, lockstep",
                        "depth-wise vs lockstep batching, both with early exit (hidden rule)"),
                       ("looped exit hidden, depthwise", "looped exit hidden, depthwise, head at once",
                        "the batched LM head (rent-or-buy, `--head-patience` 1) vs the head whenever a token is done"),
                       ("looped mixed R, depthwise", "looped mixed R, lockstep",
                        "depth-wise vs lockstep batching, clients asking for depths 1..R (no early exit)")]:
        value = ratio(a, b)
        if value is not None:
            lines.append(f"- {what}: {value:.2f}x tokens/s")
    for row in exits:
        if row["chosen"]:
            cost = row["heldout_ppl_cost"]
            lines.append(f"- early exit ({row['rule']} rule, threshold {row['threshold']:g}, chosen on calib text): "
                         f"held-out perplexity cost {100 * cost:.2f}% at {100 * row['heldout_loops_saved']:.0f}% of "
                         f"loops saved (target < 2%): **{'yes' if cost < 0.02 else 'no'}**")
    return lines


def depth_section(runs: dict[str, dict]) -> list[str]:
    """Per depth asked for, each mixed-depth server's latency and time to first token (p50): whether a
    shallow request is served at its own pace or at its deepest neighbour's."""
    mixed = {name: run["by_depth"] for name, run in runs.items() if run["by_depth"]}
    if not mixed:
        return []
    depths = sorted({depth for table in mixed.values() for depth in table})
    rows = [{"loops asked": depth} | {f"{name}: {key} p50": table[depth][key] for name, table in mixed.items()
                                      if depth in table for key in ("latency", "ttft")} for depth in depths]
    return ["## Latency by the depth a request asks for", "", format_table(rows), ""]


def serves_looped(names: Iterable[str]) -> bool:
    """Whether any of these servers serves the looped model."""
    return any(SERVERS[name][1] == "looped" for name in names)


def looped_sections(steps: dict[str, list[float]], exits: list[dict], args: argparse.Namespace) -> list[str]:
    """The looped model's perplexity per step and the early-exit thresholds, as markdown lines."""
    return ["## The looped model's perplexity after each step 1..R (teacher-forced, every domain)", "",
            *[f"- {split}: " + " / ".join(f"{ppl:.2f}" for ppl in values) for split, values in steps.items()],
            f"- best fixed depth on calib text (served as `{BEST_DEPTH}`): R = {getattr(args, 'best_loops', None)}",
            "",
            f"## Early-exit thresholds (chosen on calib text: the largest within {100 * EXIT_BUDGET:g}% of full "
            f"depth; {args.exit_tokens} tokens per domain, decoded token by token with KV reuse)", "",
            format_table(exits)]


def write_results(runs: dict[str, dict], quality: dict[str, dict], exits: list[dict], steps: dict[str, list[float]],
                  calls: list[dict], args: argparse.Namespace) -> None:
    parts = ["serving", "" if args.looped == "r4" else args.looped, args.tag, "quick" if args.quick else ""]
    stem = RESULTS / "_".join(part for part in parts if part)
    settings = {k: getattr(args, k) for k in ("clients", "requests", "prompt_tokens", "max_tokens", "rows", "rounds",
                                              "looped")}
    recipe = args.recipe
    looped = (f" `continuation_ppl`: the looped model at full depth scoring each server's continuations; "
              f"`token_agreement` with the full-depth decoding's. Looped model `{args.looped}`: R = {recipe.loops}, "
              f"`depthkit recursive train {' '.join(recipe.train)}`." if serves_looped(runs) else "")
    columns = ["server", "tokens_per_s", "latency_p50", "latency_p95", "ttft_p50", "ttft_p95", "loops_per_token",
               "completion_tokens"]
    quality_columns = ["continuation_ppl", "token_agreement"]
    rows = [{k: run[k] for k in columns} | {k: quality.get(name, {}).get(k, "") for k in quality_columns}
            for name, run in runs.items()]
    goals = targets(runs, exits, calls)
    write_json(stem.with_suffix(".json"), {"settings": settings, "machine": platform.processor() or platform.machine(),
                                           "torch_threads": torch.get_num_threads(), "runs": runs,
                                           "quality": quality, "early_exit": exits,
                                           "looped_step_perplexity": steps, "engine_calls": calls,
                                           "targets": goals})
    lines = ["# Serving under load", "",
             f"{args.clients} concurrent streaming clients x {args.requests} requests, {args.prompt_tokens}-token "
             f"held-out prompts (every domain), {args.max_tokens} new tokens, greedy; depthkit serve with "
             f"{args.rows} rows; every server loaded in turn, {args.rounds} rounds (tokens/s: median). "
             f"Latencies in seconds.{looped}", "",
             format_table(rows), "", "## Targets", "", *goals, "", *depth_section(runs),
             *(["## Model calls per generated token (each depthkit server's engine in process, one request "
                "per client)", "", format_table(calls), ""] if calls else []),
             *(looped_sections(steps, exits, args) if serves_looped(runs) else [])]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(runs)
    left.barh(names, [runs[n]["tokens_per_s"] for n in names], color="tab:blue")
    left.set_xlabel("completion tokens / s (higher is better)")
    right.barh(names, [runs[n]["latency_p50"] for n in names], color="tab:orange", label="latency p50")
    right.barh(names, [runs[n]["ttft_p50"] for n in names], color="tab:green", label="time to first token p50")
    right.set_xlabel("seconds")
    right.legend()
    right.set_yticklabels([])
    figure.suptitle(f"Serving SmolLM2-135M variants, {args.clients} concurrent clients")
    save_figure(figure, stem.with_suffix(".png"))
    print(format_table(rows))
    print("\n".join(goals))


def main() -> None:
    args = parse_args()
    tokenizer = load_tokenizer(str(default_model_dir()))
    prompts = held_out_prompts(args.clients * args.requests, args.prompt_tokens)
    thresholds, exits, steps, quality = {}, [], {}, {}
    looped = looped_model(args.recipe) if serves_looped(args.servers) else None
    if looped:
        model, looped_tokenizer = looped
        streams = {split: domain_stream(looped_tokenizer, split, args.exit_tokens) for split in ("calib", "heldout")}
        # whether the loops still improve the model after the step where early exit stops them
        steps = {split: step_perplexities(model, stream.view(-1, args.exit_tokens), model.config.num_loops)
                 for split, stream in streams.items()}
        args.best_loops = 1 + min(range(len(steps["calib"])), key=steps["calib"].__getitem__)
        if any(SERVERS[name][3] for name in args.servers):  # only early exit needs thresholds
            thresholds, exits = choose_thresholds(model, streams, args.exit_tokens)
    runs = measure_servers(args.servers, prompts, args, tokenizer, thresholds)
    if looped:
        quality = continuation_quality(runs, *looped)
    calls = engine_calls(args.servers, prompts, args, thresholds)
    write_results(runs, quality, exits, steps, calls, args)


if __name__ == "__main__":
    main()
