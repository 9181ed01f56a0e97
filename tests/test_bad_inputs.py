"""Bad input to every command and subcommand: one clear error line, exit 2, never a traceback,
nothing written (issue 23).

The cases are data: each row is (command line, a fragment of the expected error), so covering a
new bad input is adding a row. `{name}` in an argument is replaced by a prepared input
(`INPUTS`, built once per module: an empty, binary or Latin-1 text file, a folder, a GPT-2
checkpoint, a saved looped model, ...) or by a path of the test's own: `{out}` (a not yet existing
output in the test's folder), `{underfile}` (a path below a regular file) and `{proc}` (a folder
nobody may create files in). Every case must be refused before any real work,
so models are `tiny:llama` and sizes are tiny; `serve` must refuse before it binds a port.

Two forms of the error line are accepted: depthkit's own (`depthkit: error: ...`, the only line
on stderr) and argparse's (a usage block, then one `depthkit <command>: error: ...` line).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from depthkit.cli.main import main

NO_TRACEBACK = ("Traceback", 'File "')
ERROR_LINE = re.compile(r"^depthkit(?: [a-z]+)*: error: ")

MODEL = "tiny:llama"
BAD_MODELS = [
    ("--model {missing}", "does not exist"),
    ("--model {noconfig}", "no config.json"),
    ("--model {textfile}", "does not exist"),
    ("--model tiny:unknownarch", "no tiny config for 'unknownarch'"),
    ("--model {gpt2}", "unsupported architecture 'gpt2'"),
]
BAD_TEXTS = [
    ("nosuchcorpus", "unknown corpus 'nosuchcorpus'"),
    ("austen+nosuchcorpus", "unknown corpus 'nosuchcorpus'"),
    ("{empty}", "is empty"),
    ("{binary}", "is not UTF-8 text"),
    ("{nul}", "is binary, not text"),
    ("{latin1}", "is not UTF-8 text"),
    ("{folder}", "holds no .txt files"),
]
BAD_OUTPUT_FOLDERS = [
    ("{textfile}", "already exists"),
    ("{folder}", "already exists"),
    ("{underfile}", "cannot write"),
    ("{proc}", "cannot write"),
]
BAD_JSON = [
    ("{folder}", "is a folder"),
    ("{underfile}", "cannot write"),
    ("{proc}", "cannot write"),
]
DEVICES = [("--device bogus", "unknown device 'bogus'"), ("--device mps", "is not available on this machine")]


def whole_numbers(command: str, options: str, low: int = 1) -> list[tuple[str, str]]:
    """Rows refusing each of `options` (argparse `positive_int`/`non_negative_int`) below `low` and
    when not a whole number."""
    rows = []
    for option in options.split():
        rows.append((f"{command} {option} {low - 1}", f"argument {option}: must be >= {low}"))
        rows.append((f"{command} {option} ten", f"argument {option}: expected a whole number"))
    return rows


def numbers(command: str, option: str, *bad: str, fragment: str) -> list[tuple[str, str]]:
    """Rows refusing each value in `bad` for a float option, all with the same message fragment."""
    return [(f"{command} {option} {value}", fragment) for value in bad] + [
        (f"{command} {option} abc", f"argument {option}: expected a number")]


def variants(command: str, option: str, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`rows` of (value, fragment) given to `option` of `command`."""
    return [(f"{command} {option} {value}".rstrip(), fragment) for value, fragment in rows]


def with_prefix(command: str, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(f"{command} {extra}", fragment) for extra, fragment in rows]


# -- analyze -----------------------------------------------------------------------------------
ANALYZE = f"analyze --model {MODEL} --out {{out}}"
ANALYZE_CASES = [
    *whole_numbers(ANALYZE, "--num-blocks --block-len --sample-tokens"),
    *whole_numbers(ANALYZE, "--data-offset", low=0),
    (f"{ANALYZE} --data-split bogus", "argument --data-split: invalid choice"),
    *variants(ANALYZE, "--data", BAD_TEXTS),
    *variants(f"analyze --model {MODEL} --out", "", BAD_OUTPUT_FOLDERS),
    (f"analyze --model {MODEL} --out {{textfile}} --overwrite", "exists and is not a folder"),
    (f"analyze --model {MODEL} --out {{noconfig}} --overwrite", "was not written by depthkit"),
    *with_prefix("analyze --out {out}", BAD_MODELS),
    (f"{ANALYZE} --dtype int3", "unknown dtype 'int3'"),
    *with_prefix(ANALYZE, DEVICES),
    (f"{ANALYZE} --bogus 1", "unrecognized arguments: --bogus"),
]

# -- compress ----------------------------------------------------------------------------------
COMPRESS = f"compress --model {MODEL} --method shortgpt"
SHORT = f"{COMPRESS} --ratio 0.5"
FLATTEN = f"compress --model {MODEL} --method flatten --ratio 0.5"
METHOD_OPTIONS = [
    ("shortgpt", "noequals", "--option expects KEY=VALUE"),
    ("shortgpt", "=3", "--option expects KEY=VALUE"),
    ("shortgpt", "bogus=1", "method 'shortgpt' has no option bogus"),
    ("shortgpt", "batch_size=0", "batch_size must be >= 1"),
    ("shortgpt", "batch_size=abc", "shortgpt option batch_size: cannot read 'abc'"),
    ("shortgpt", "batch_size=1.5", "batch_size must be a whole number"),
    ("shortgpt", "batch_size=nan", "batch_size: cannot read"),
    ("flatten", "selection=bogus", "selection must be one of"),
    ("flatten", "criterion=bogus", "criterion must be one of"),
    ("flatten", "attn_criterion=bogus", "attn_criterion must be one of"),
    ("flatten", "target=bogus", "target must be one of"),
    ("flatten", "ridge=-1", "ridge must be >= 0"),
    ("flatten", "ridge=nan", "ridge must be a finite number"),
    ("flatten", "ridge=inf", "ridge must be a finite number"),
    ("flatten", "ridge_prior=bogus", "ridge_prior must be one of"),
    ("flatten", "qk_norm=bogus", "qk_norm must be one of"),
    ("flatten", "preset=bogus", "preset must be one of"),
    ("flatten", "preset=paper --option selection=greedy", "conflict with preset paper"),
    ("flatten", "rescore=maybe", "expected true or false"),
    ("flatten", "rescore=false --option selection=greedy", "rescore=false scores disjoint pairs once"),
    ("flatten", "shortlist=-1", "shortlist must be >= 0"),
    ("flatten", "max_group=1", "max_group must be at least 2"),
    ("flatten", "selection_blocks=0", "selection_blocks must be >= 1"),
    ("flatten", "groups=abc", "groups must be a JSON list of lists"),
    ("flatten", "groups=[[0,1],[1,2]]", "groups must list every block"),
    ("flatten", "groups=[1,2]", "groups must be a JSON list of lists"),
    # checked against the model's depth from its config, before any weight is loaded (ratio 0.5 of 4 blocks)
    ("flatten", "groups=[[0,1],[2]]", "groups must list every block 0..3"),
    ("flatten", "groups=[[0,1],[2],[3]]", "groups give 3 blocks but removing 2 of 4 needs 2"),
    ("flatten_unpruned", "bogus=1", "method 'flatten_unpruned' has no option bogus"),
    ("laco", "merge_layers=1", "merge_layers >= 2"),
    ("laco", "interval=0", "interval >= 1"),
    ("laco", "lowest_layer=-1", "lowest_layer >= 0"),
    ("laco", "threshold=2", "threshold and threshold_floor are cosines"),
    ("laco", "threshold=nan", "threshold must be a finite number"),
    ("laco", "merge=bogus", "laco option merge must be one of"),
    ("laco", "bisect=true --option threshold=0.5 --option threshold_floor=0.9", "bisect needs threshold_floor"),
    ("sleb", "allow_ends=maybe", "expected true or false"),
    ("sleb", "selection_blocks=0", "selection_blocks must be >= 1"),
    ("width", "heads_per_group=0", "heads_per_group must be a whole number >= 1"),
    ("width", "heads_per_group=abc", "heads_per_group must be a whole number >= 1"),
    ("width", "criterion=bogus", "criterion must be one of"),
    ("minitron", "heads_per_group=-1", "heads_per_group must be a whole number >= 1"),
    ("minitron", "ridge=1", "method 'minitron' has no option ridge"),
    ("attn_drop", "attention_per_block=0", "attention_per_block must be > 0"),
    ("attn_drop", "attention_per_block=-1", "attention_per_block must be > 0"),
    ("attn_drop", "attention_per_block=nan", "attention_per_block must be a finite number"),
]
COMPRESS_CASES = [
    *numbers(COMPRESS, "--ratio", "0", "1", "1.5", "-0.2", "nan", "inf",
             fragment="argument --ratio: must be a number in (0, 1)"),
    *whole_numbers(COMPRESS, "--target-layers"),
    (f"{COMPRESS} --target-layers 9", "--target-layers must be in 1..3"),
    (f"{COMPRESS} --ratio 0.5 --target-layers 2", "give exactly one of --ratio and --target-layers"),
    (COMPRESS, "give exactly one of --ratio and --target-layers"),
    *whole_numbers(SHORT, "--num-calib-blocks --calib-block-len --eval-window --eval-max-tokens"),
    *whole_numbers(SHORT, "--calib-offset --eval-data-offset", low=0),
    (f"{SHORT} --calib-split bogus", "argument --calib-split: invalid choice"),
    (f"{SHORT} --offload bogus", "argument --offload: invalid choice"),
    (f"compress --model {MODEL} --method bogus --ratio 0.5", "unknown method 'bogus'"),
    *variants(SHORT, "--calib", BAD_TEXTS),
    (f"{SHORT} --eval-data nosuchcorpus", "unknown corpus 'nosuchcorpus'"),
    (f"{SHORT} --eval-data {{latin1}}", "is not UTF-8 text"),
    *variants(SHORT, "--out", BAD_OUTPUT_FOLDERS),
    (f"{SHORT} --out {{noconfig}} --overwrite", "was not written by depthkit"),
    *variants(SHORT, "--json", BAD_JSON),
    *with_prefix("compress --method shortgpt --ratio 0.5", BAD_MODELS),
    (f"{SHORT} --dtype int3", "unknown dtype 'int3'"),
    *with_prefix(SHORT, DEVICES),
    (f"{SHORT} --offload disk", "--offload disk writes the compressed model block by block: give --out"),
    (f"{SHORT} --offload disk --out {{out}} --eval-data austen", "--eval-data needs the whole model in memory"),
    ("compress --model {model} --method flatten_unpruned --ratio 0.5 --offload disk --out {out}",
     "does not produce a standard checkpoint"),
    (f"compress --model {MODEL} --method flatten_unpruned --ratio 0.5 --out {{out}}",
     "does not produce a standard checkpoint"),
    *[(f"compress --model {MODEL} --method {method} --ratio 0.5 --option {option}", fragment)
      for method, option, fragment in METHOD_OPTIONS],
    *variants(SHORT, "--save-plan", BAD_JSON),
    *[(f"compress --model {MODEL} --ratio 0.5 --plan {plan}", fragment) for plan, fragment in [
        ("{missing}", "plan file {missing} does not exist"),
        ("{folder}", "is a folder; give the JSON file"),
        ("{textfile}", "is not JSON"),
        ("{badjson}", "is not JSON"),
        ("{listjson}", "is not a compression plan"),
        ("{binary}", "cannot read plan file"),
        ("{sleb_plan} --method shortgpt", "the plan was searched by sleb, not shortgpt"),
        ("{deep_plan}", "this sleb plan was searched on a 6-block model"),
        ("{sleb_plan}", "this sleb plan was searched for 1 block; removing 2 needs a longer search"),
        ("{sleb_plan} --option allow_ends=true", "option(s) allow_ends=True differ from the plan's"),
        ("{sleb_plan} --save-plan {out}", "saves the plan a search chose; with a plan given nothing is searched"),
    ]],
    ("compress --model {model} --ratio 0.5 --plan {deep_plan} --offload disk --out {out}",
     "this sleb plan was searched on a 6-block model"),
]

# -- eval ppl | zeroshot | speed ---------------------------------------------------------------
PPL = f"eval ppl --model {MODEL}"
ZEROSHOT = f"eval zeroshot --model {MODEL}"
SPEED = f"eval speed --model {MODEL}"
EVAL_CASES = [
    ("eval", "the following arguments are required: EVAL"),
    ("eval bogus", "argument EVAL: invalid choice"),
    *whole_numbers(PPL, "--window --stride --batch-size"),
    *whole_numbers(PPL, "--max-tokens --data-offset", low=0),
    (f"{PPL} --window 1", "window must be at least 2 tokens"),
    (f"{PPL} --window 4096", "larger than the model's context"),
    (f"{PPL} --window 128 --stride 256", "stride must be in 1..window"),
    (f"{PPL} --data-split bogus", "argument --data-split: invalid choice"),
    (f"{PPL} --data austen:nosuchbook", "'austen' has no document 'nosuchbook'"),
    *variants(PPL, "--data", BAD_TEXTS),
    *with_prefix("eval ppl", BAD_MODELS),
    (f"{PPL} --dtype int3", "unknown dtype 'int3'"),
    *with_prefix(PPL, DEVICES),
    *variants(PPL, "--json", BAD_JSON),
    *whole_numbers(ZEROSHOT, "--limit --task-size --zs-batch-size"),
    (f"{ZEROSHOT} --task-seed abc", "argument --task-seed: invalid int value"),
    (f"{ZEROSHOT} --model {{missing}}", "does not exist"),
    (f"{ZEROSHOT} --model {{gpt2}}", "unsupported architecture 'gpt2'"),
    *variants(ZEROSHOT, "--json", BAD_JSON),
    *whole_numbers(SPEED, "--prompt-len --new-tokens --repeats"),
    *whole_numbers(SPEED, "--warmup", low=0),
    (f"{SPEED} --batch-sizes 0", "argument --batch-sizes: expected comma-separated whole numbers >= 1"),
    (f"{SPEED} --batch-sizes -4", "argument --batch-sizes: expected comma-separated whole numbers >= 1"),
    (f"{SPEED} --batch-sizes a,b", "argument --batch-sizes: expected comma-separated whole numbers >= 1"),
    (f"{SPEED} --batch-sizes ,", "argument --batch-sizes: expected comma-separated whole numbers >= 1"),
    (f"{SPEED} --seq-lens 0", "argument --seq-lens: expected comma-separated whole numbers >= 1"),
    (f"{SPEED} --decode-batch-sizes 1,0", "argument --decode-batch-sizes: expected comma-separated"),
    (f"{SPEED} --seq-lens 4096", "larger than the model's context"),
    (f"{SPEED} --prompt-len 500 --new-tokens 100", "larger than the model's context"),
    (f"{SPEED} --model {{missing}}", "does not exist"),
    *with_prefix(SPEED, DEVICES),
    *variants(SPEED, "--json", BAD_JSON),
]

# -- fetch -------------------------------------------------------------------------------------
FETCH_CASES = [
    ("fetch bogus", "argument what: invalid choice: 'bogus'"),
    ("fetch model gemma3", "unrecognized arguments: gemma3"),
    ("fetch --force --bogus", "unrecognized arguments: --bogus"),
]

# -- recover -----------------------------------------------------------------------------------
RECOVER = f"recover --model {MODEL} --out {{out}}"
RECOVER_CASES = [
    ("recover --out {out}", "the following arguments are required: --model"),
    (f"recover --model {MODEL}", "the following arguments are required: --out"),
    *whole_numbers(RECOVER, "--eval-tokens --seq-len --batch-size --keep-checkpoints"),
    *whole_numbers(RECOVER, "--steps --warmup-steps --lora-rank --eval-every --checkpoint-every --data-offset",
                   low=0),
    (f"{RECOVER} --steps 0", "--steps must be >= 1"),
    (f"{RECOVER} --lora-rank 0", "--lora-rank must be >= 1"),
    (f"{RECOVER} --eval-every 0", "--eval-every must be >= 1"),
    (f"{RECOVER} --seq-len 1", "--seq-len must be >= 2"),
    (f"{RECOVER} --eval-tokens 10 --seq-len 64", "must cover at least one window"),
    *numbers(RECOVER, "--lr", "0", "-1", "nan", "inf", fragment="argument --lr: must be a finite number > 0"),
    *numbers(RECOVER, "--temperature", "0", "nan", "inf",
             fragment="argument --temperature: must be a finite number > 0"),
    *numbers(RECOVER, "--lora-alpha", "-1", "nan", fragment="argument --lora-alpha: must be a finite number > 0"),
    (f"{RECOVER} --distill-weight 0.5", "--distill-weight needs --teacher"),
    (f"{RECOVER} --teacher {MODEL} --distill-weight 2", "--distill-weight must be in [0, 1]"),
    (f"{RECOVER} --teacher {MODEL} --distill-weight nan", "--distill-weight must be in [0, 1]"),
    (f"{RECOVER} --distill-weight abc", "argument --distill-weight: invalid float value"),
    (f"{RECOVER} --self-distill 2", "--self-distill needs --teacher"),
    (f"{RECOVER} --teacher {MODEL} --self-distill -1", "--self-distill must be >= 0"),
    (f"{RECOVER} --teacher {MODEL} --self-distill 2 --self-distill-every 1", "--self-distill-every must be >= 2"),
    (f"{RECOVER} --teacher {MODEL} --self-distill 2 --self-distill-tokens 0", "--self-distill-tokens must be >= 1"),
    (f"{RECOVER} --teacher {MODEL} --self-distill abc", "argument --self-distill: invalid int value"),
    (f"{RECOVER} --data-split bogus", "argument --data-split: invalid choice"),
    *variants(RECOVER, "--data", BAD_TEXTS[:4]),
    (f"{RECOVER} --eval-data nosuchcorpus", "unknown corpus 'nosuchcorpus'"),
    *with_prefix("recover --out {out}", BAD_MODELS),
    (f"{RECOVER} --teacher {{missing}}", "does not exist"),
    (f"recover --model {MODEL} --out {{underfile}}", "cannot write"),
    (f"recover --model {MODEL} --out {{proc}}", "cannot write"),
    (f"recover --model {MODEL} --out {{textfile}}", "cannot write"),
    (f"{RECOVER} --dtype int3", "unknown dtype 'int3'"),
]

# -- recursive train | eval | generate ---------------------------------------------------------
TRAIN = f"recursive train --model {MODEL} --out {{out}}"
CHOICES = ("--layer-pick", "--sharing", "--init", "--loop-norms", "--feedback", "--projection", "--fuse",
           "--residual", "--connector-norm", "--loss", "--mixed-precision", "--data-split", "--eval-data-split")
RECURSIVE_TRAIN_CASES = [
    ("recursive", "the following arguments are required: ACTION"),
    ("recursive bogus", "argument ACTION: invalid choice"),
    (f"recursive train --model {MODEL}", "the following arguments are required: --out"),
    *whole_numbers(TRAIN, "--layers --relax --loops --connector-k --modalities --batch-size --seq-len --train-blocks "
                          "--eval-blocks --eval-every --keep-checkpoints"),
    *whole_numbers(TRAIN, "--ends --lora-rank --steps --warmup-steps --checkpoint-every --data-offset "
                          "--eval-data-offset", low=0),
    (f"{TRAIN} --loops 1000", "argument --loops: must be <= 256"),
    *numbers(TRAIN, "--lr", "0", "nan", "inf", fragment="argument --lr: must be a finite number > 0"),
    *numbers(TRAIN, "--connector-lr", "0", "nan", fragment="argument --connector-lr: must be a finite number > 0"),
    *numbers(TRAIN, "--beta", "0.5", "nan", fragment="argument --beta: must be a finite number >= 1"),
    *numbers(TRAIN, "--scale-init", "nan", "inf", fragment="argument --scale-init: must be a finite number"),
    *numbers(TRAIN, "--save-exit-threshold", "-1", "nan",
             fragment="argument --save-exit-threshold: must be a finite number >= 0"),
    (f"{TRAIN} --exit-rule bogus", "argument --exit-rule: invalid choice"),
    *[(f"{TRAIN} {option} bogus", f"argument {option}: invalid choice") for option in CHOICES],
    (f"{TRAIN} --loop-lora-rank abc", "--loop-lora-rank must be an integer >= 0 or 'full'"),
    (f"{TRAIN} --loop-lora-rank -1", "--loop-lora-rank must be an integer >= 0 or 'full'"),
    (f"{TRAIN} --connector-layers a,b", "expected comma-separated integers"),
    (f"{TRAIN} --connector-layers 99", "connector layer index 99 out of range"),
    (f"{TRAIN} --train bogus", "unknown trainable part"),
    (f"{TRAIN} --layers 99", "cannot keep 99 layers of a 4-layer model"),
    (f"{TRAIN} --seq-len 4096 --train-blocks 1 --eval-blocks 1", "larger than the model's context"),
    (f"{TRAIN} --relax 2 --loops 5", "drop --loops 5"),
    (f"{TRAIN} --relax 2 --ends 1", "--ends applies to a looped decoder"),
    (f"{TRAIN} --relax 2 --feedback connector", "--feedback connector applies to a looped decoder"),
    *variants(TRAIN, "--data", BAD_TEXTS[:4]),
    (f"{TRAIN} --eval-data {{latin1}}", "is not UTF-8 text"),
    *with_prefix("recursive train --out {out}", BAD_MODELS),
    *variants(f"recursive train --model {MODEL} --out", "", BAD_OUTPUT_FOLDERS),
    *variants(TRAIN, "--json", BAD_JSON),
    (f"{TRAIN} --dtype int3", "unknown dtype 'int3'"),
    *with_prefix(TRAIN, DEVICES),
]
EVAL = "recursive eval {recursive}"
BAD_CHECKPOINTS = [
    ("{missing}", "is not a recursive model folder"),
    ("{folder}", "is not a recursive model folder"),
    ("{textfile}", "is not a recursive model folder"),
    ("{model}", "is not a recursive model folder"),
]
RECURSIVE_EVAL_CASES = [
    ("recursive eval", "the following arguments are required: checkpoint"),
    *[(f"recursive eval {folder}", fragment) for folder, fragment in BAD_CHECKPOINTS],
    *whole_numbers(EVAL, "--loops --blocks --seq-len --exit-tokens"),
    *whole_numbers(EVAL, "--data-offset", low=0),
    (f"{EVAL} --loops 1000", "argument --loops: must be <= 256"),
    *numbers(EVAL, "--exit-threshold", "-1", "nan", "inf",
             fragment="argument --exit-threshold: must be a finite number"),
    (f"{EVAL} --exit-rule bogus", "argument --exit-rule: invalid choice"),
    (f"{EVAL} --blocks 1 --seq-len 4096", "larger than the model's context"),
    (f"{EVAL} --data-split bogus", "argument --data-split: invalid choice"),
    *variants(EVAL, "--data", BAD_TEXTS[:4]),
    (f"{EVAL} --dtype int3", "unknown dtype 'int3'"),
    *with_prefix(EVAL, DEVICES),
    *variants(EVAL, "--json", BAD_JSON),
]
GENERATE = "recursive generate {recursive} --prompt Hello"
RECURSIVE_GENERATE_CASES = [
    ("recursive generate {recursive}", "the following arguments are required: --prompt"),
    *[(f"recursive generate {folder} --prompt Hello", fragment) for folder, fragment in BAD_CHECKPOINTS],
    *whole_numbers(GENERATE, "--loops --max-new-tokens"),
    (f"{GENERATE} --loops 1000", "argument --loops: must be <= 256"),
    *numbers(GENERATE, "--exit-threshold", "-1", "nan", fragment="argument --exit-threshold: must be a finite number"),
    (f"{GENERATE} --exit-rule bogus", "argument --exit-rule: invalid choice"),
    (f"{GENERATE} --max-new-tokens 100000", "exceeds the model's context of 512 tokens"),
    (f"{GENERATE} --exit-threshold 0.1 --no-cache", "needs the KV cache"),
    (f"{GENERATE} --dtype int3", "unknown dtype 'int3'"),
    *with_prefix(GENERATE, DEVICES),
    *variants(GENERATE, "--json", BAD_JSON),
]

# -- report ------------------------------------------------------------------------------------
REPORT = f"report --base {MODEL} --out {{out}}"
REPORT_CASES = [
    ("report --out {out}", "the following arguments are required: --base"),
    (f"report --base {MODEL}", "the following arguments are required: --out"),
    (f"{REPORT} --evals bogus", "unknown evaluation(s) bogus"),
    (f"{REPORT} --evals ,", "unknown evaluation(s) (none)"),
    (f"{REPORT} --labels a,b,c", "--labels names 3 models but 1 are given"),
    ("report --base {missing}.json --out {out}", "cannot read result file"),
    ("report --base {badjson} --out {out}", "cannot read result file"),
    ("report --base {listjson} --out {out}", "is not a depthkit evaluation result"),
    (f"report --base {{listjson}} --models {MODEL} --evals behaviour --out {{out}}",
     "the behaviour evaluation compares every model with the base's own predictions"),
    *whole_numbers(REPORT, "--behaviour-blocks --behaviour-len --window --batch-size --limit --zs-batch-size "
                           "--prompt-len --repeats"),
    (f"{REPORT} --batch-sizes 0", "argument --batch-sizes: expected comma-separated whole numbers >= 1"),
    *variants(f"report --base {MODEL} --out", "", BAD_OUTPUT_FOLDERS),
    ("report --base {missing} --out {out}", "does not exist"),
    ("report --base {gpt2} --out {out}", "unsupported architecture 'gpt2'"),
    (f"{REPORT} --data {{latin1}} --evals ppl", "is not UTF-8 text"),
    *with_prefix(REPORT, DEVICES),
]

# -- run ---------------------------------------------------------------------------------------
RUN = f"run --model {MODEL} --out {{out}}"
RUN_CASES = [
    *numbers(RUN, "--ratio", "0", "1", "-0.5", "nan", "inf", fragment="argument --ratio: must be a number in (0, 1)"),
    *with_prefix("run --out {out}", BAD_MODELS),
    (f"run --model {MODEL} --out {{underfile}}", "cannot write"),
    (f"run --model {MODEL} --out {{proc}}", "cannot write"),
    (f"run --model {MODEL} --out {{textfile}}", "exists and is not a folder"),
    (f"run --model {MODEL} --out {{noconfig}}", "was not written by depthkit"),
    (f"{RUN} --dtype int3", "unknown dtype 'int3'"),
    *with_prefix(RUN, DEVICES),
]

# -- serve -------------------------------------------------------------------------------------
SERVE = f"serve {MODEL}"
SERVE_CASES = [
    ("serve", "the following arguments are required: model"),
    *whole_numbers(SERVE, "--port --rows --context --max-loops"),
    (f"{SERVE} --port 70000", "argument --port: must be <= 65535"),
    (f"{SERVE} --max-loops 1000", "argument --max-loops: must be <= 256"),
    *numbers(SERVE, "--exit-threshold", "-1", "nan", fragment="argument --exit-threshold: must be a finite number"),
    (f"{SERVE} --exit-rule bogus", "argument --exit-rule: invalid choice"),
    (f"{SERVE} --schedule bogus", "argument --schedule: invalid choice"),
    *numbers(SERVE, "--head-patience", "-0.1", "inf", "nan",
             fragment="argument --head-patience: must be a finite number >= 0"),
    ("serve {missing}", "does not exist"),
    ("serve {noconfig}", "no config.json"),
    ("serve {gpt2}", "unsupported architecture 'gpt2'"),
    ("serve tiny:unknownarch", "no tiny config for 'unknownarch'"),
    (f"{SERVE} --dtype int3", "unknown dtype 'int3'"),
    *with_prefix(SERVE, DEVICES),
]

# -- vlm train | ask ---------------------------------------------------------------------------
VLM = f"vlm train --model {MODEL} --out {{out}} --num-mnist 8 --num-digits 8 --num-pairs 4 --photo-variants 1"
ASK = f"vlm ask --image {{image}} --question What --model {MODEL}"
VLM_CASES = [
    ("vlm", "the following arguments are required: ACTION"),
    *whole_numbers(VLM, "--num-layers --loops --steps --batch-size --num-mnist --num-digits --num-pairs "
                        "--photo-variants --eval-examples --keep-checkpoints"),
    *whole_numbers(VLM, "--lora-rank --stage1-steps --warmup-steps --checkpoint-every", low=0),
    (f"{VLM} --loops 1000", "argument --loops: must be <= 256"),
    *numbers(VLM, "--lr", "0", "nan", "inf", fragment="argument --lr: must be a finite number > 0"),
    *numbers(VLM, "--beta", "0.5", "nan", fragment="argument --beta: must be a finite number >= 1"),
    (f"{VLM} --feedback bogus", "argument --feedback: invalid choice"),
    (f"{VLM} --loss bogus", "argument --loss: invalid choice"),
    *variants(f"vlm train --model {MODEL} --out", "", BAD_OUTPUT_FOLDERS),
    *with_prefix("vlm train --out {out}", BAD_MODELS),
    (f"{VLM} --dtype int3", "unknown dtype 'int3'"),
    *with_prefix(VLM, DEVICES),
    ("vlm ask --question What", "the following arguments are required: --image"),
    ("vlm ask --image {image}", "the following arguments are required: --question"),
    ("vlm ask --image {missing} --question What", "image {missing} does not exist"),
    ("vlm ask --image {folder} --question What", "does not exist"),
    ("vlm ask --image {textfile} --question What", "could not decode image"),
    ("vlm ask --image {empty} --question What", "could not decode image"),
    *whole_numbers(ASK, "--loops --num-layers --max-new-tokens"),
    (f"{ASK} --loops 1000", "argument --loops: must be <= 256"),
    (f"{ASK} --checkpoint {{missing}}", "is not a depthkit VLM checkpoint"),
    (f"{ASK} --checkpoint {{folder}}", "is not a depthkit VLM checkpoint"),
    (f"{ASK} --checkpoint {{textfile}}", "is not a depthkit VLM checkpoint"),
    *with_prefix("vlm ask --image {image} --question What", BAD_MODELS),
    *with_prefix(ASK, DEVICES),
]

# -- the command itself ------------------------------------------------------------------------
TOP_CASES = [
    ("bogus", "argument COMMAND: invalid choice: 'bogus'"),
    ("--bogus", "the following arguments are required: COMMAND"),
]

CASES = {
    "analyze": ANALYZE_CASES, "compress": COMPRESS_CASES, "eval": EVAL_CASES, "fetch": FETCH_CASES,
    "recover": RECOVER_CASES, "recursive train": RECURSIVE_TRAIN_CASES, "recursive eval": RECURSIVE_EVAL_CASES,
    "recursive generate": RECURSIVE_GENERATE_CASES, "report": REPORT_CASES, "run": RUN_CASES, "serve": SERVE_CASES,
    "vlm": VLM_CASES, "depthkit": TOP_CASES,
}
ALL_CASES = [(command, argv, fragment) for command, rows in CASES.items() for argv, fragment in rows]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The prepared bad (and a few good) inputs the cases name, made once."""
    from PIL import Image
    from transformers import GPT2Config, GPT2LMHeadModel

    from depthkit.compress.plan import CompressionPlan
    from depthkit.models.loading import DEFAULT_MODEL, load_tokenizer
    from depthkit.models.tiny import tiny_model
    from depthkit.recursive.model import RecursiveModel

    root = tmp_path_factory.mktemp("inputs")
    files = {"textfile": ("text.txt", "Some plain text.\n" * 50), "empty": ("empty.txt", ""),
             "binary": ("binary.txt", bytes(range(256)) * 16), "nul": ("nul.txt", b"\x00" * 4096),
             "latin1": ("latin1.txt", ("caf\xe9 cr\xe8me br\xfbl\xe9e\n" * 200).encode("latin-1")),
             "badjson": ("bad.json", '{"kind": "perplexity", '), "listjson": ("list.json", "[1, 2]")}
    paths = {}
    for name, (filename, content) in files.items():
        path = root / filename
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        paths[name] = path
    paths["folder"] = root / "folder"
    paths["folder"].mkdir()
    paths["noconfig"] = root / "noconfig"
    paths["noconfig"].mkdir()
    (paths["noconfig"] / "weights.bin").write_bytes(b"not a model")
    paths["missing"] = root / "no-such-thing"
    paths["gpt2"] = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(paths["gpt2"])
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    base = tiny_model("llama", num_layers=2, vocab_size=len(tokenizer))
    paths["model"] = root / "model"
    base.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    paths["recursive"] = root / "recursive"
    RecursiveModel.wrap(base, num_loops=2, connector_k=2).save_pretrained(paths["recursive"], tokenizer)
    # plans of SLEB on tiny:llama (4 blocks) searched for one block, and on a 6-block model
    for name, depth in (("sleb_plan", 4), ("deep_plan", 6)):
        paths[name] = CompressionPlan("sleb", {}, MODEL, depth, 1, "prefix", [{"block": 1, "removes": 1, "score": 2.5}],
                                      {"selection_tokens": [8, 256]}).save(root / f"{name}.json")
    paths["image"] = root / "image.png"
    Image.new("RGB", (8, 8), "white").save(paths["image"])
    paths["root"] = root
    return {name: str(path) for name, path in paths.items()}


def expand(argv: str, paths: dict[str, str]) -> list[str]:
    """The command line as a list, every `{name}` known to `paths` replaced (JSON brackets untouched)."""
    return [re.sub(r"\{(\w+)\}", lambda m: paths.get(m[1], m[0]), arg) for arg in shlex.split(argv)]


def snapshot(*folders) -> set[str]:
    return {str(path) for folder in folders for path in folder.rglob("*")}


@pytest.fixture
def no_server(monkeypatch):
    """`serve` must refuse before it binds a port: starting uvicorn is a failure, never a hang."""
    import uvicorn

    def refuse(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.mark.parametrize("command, argv, fragment", ALL_CASES,
                         ids=[f"{command}: {argv}" for command, argv, fragment in ALL_CASES])
def test_bad_input_is_one_clear_line(command, argv, fragment, inputs, tmp_path, capsys, monkeypatch, no_server):
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) would land here and be seen
    (tmp_path / "work").mkdir()
    paths = {**inputs, "out": str(tmp_path / "work" / "out"), "underfile": inputs["textfile"] + "/out",
             "proc": "/proc/depthkit-no-such-folder/out"}
    before = snapshot(tmp_path, Path(inputs["root"]))
    try:
        code, by_argparse = main(expand(argv, paths)), False
    except SystemExit as stop:  # argparse's own errors
        code, by_argparse = stop.code, True
    out, err = capsys.readouterr()
    assert not any(marker in out + err for marker in NO_TRACEBACK), err
    expected = re.sub(r"\{(\w+)\}", lambda m: paths.get(m[1], m[0]), fragment)
    errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert code == 2, err
    assert len(errors) == 1 and expected in errors[0], err
    others = [line for line in err.strip().splitlines() if line != errors[0]]
    if by_argparse:
        assert others and others[0].startswith("usage: "), err  # its usage block, then the error
    else:
        assert not others, err  # depthkit's own error: the only line
    assert snapshot(tmp_path, Path(inputs["root"])) == before, "the refused command wrote something"


def test_every_command_and_subcommand_has_cases():
    """Each command of `depthkit --help` (and each subcommand) is in the table."""
    from depthkit.cli.main import command_help

    named = {tuple(shlex.split(argv)[:2]) for _, argv, _ in ALL_CASES}
    for command in command_help():
        assert any(words[0] == command for words in named), command
    for command, subcommands in {"eval": ("ppl", "zeroshot", "speed"), "recursive": ("train", "eval", "generate"),
                                 "vlm": ("train", "ask")}.items():
        for sub in subcommands:
            assert (command, sub) in named, f"{command} {sub}"
    assert len(ALL_CASES) >= 250
