"""Probe: Recursive Connector RMSNorm gains set at the embedding scale (issue 5/6 follow-up).

Training drives the connector's residual scale to ~0 in `benchmarks/recursion.py` (its RMSNorm
outputs have RMS 1 per dimension, ~24x a text embedding). This probe sets every connector norm gain
to GAIN and the scale to SCALE, trains the RecursiveVLM variant of `recursion.py` (same data, R = 3,
12 held-out blocks) for STEPS steps and prints held-out perplexity per step before and after.

    .venv/bin/python benchmarks/connector_probe.py GAIN SCALE LOSS [STEPS]   # e.g. 0.03 0.1 monotonic 100

Appends one JSON line per run to benchmarks/results/connector_probe.jsonl.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import recursion as R  # noqa: E402

from depthkit.data import DataSpec, token_blocks  # noqa: E402
from depthkit.models.loading import load_model  # noqa: E402
from depthkit.recursive.train import TrainSettings, step_perplexities, train  # noqa: E402


def main() -> None:
    gain, scale, loss = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    steps = sys.argv[4] if len(sys.argv) > 4 else "30"
    args = R.parse_args(["--steps", steps, "--loops", "3", "--eval-blocks", "12"])
    _, tokenizer = load_model(args.model, dtype="float32")
    train_ids = token_blocks(tokenizer, DataSpec("austen", "calib"), args.steps * args.batch_size, args.seq_len)
    eval_ids = token_blocks(tokenizer, DataSpec("austen:persuasion", "heldout"), args.eval_blocks, args.seq_len)
    model = R.build(args, "connector")
    for norm in model.connector.norms:
        norm.weight.data.fill_(gain)
    model.connector.scale.data.fill_(scale)
    before = step_perplexities(model, eval_ids, 3)
    settings = TrainSettings(steps=args.steps, loops=3, batch_size=args.batch_size, lr=args.lr,
                             connector_lr=args.connector_lr, loss=loss, trainable=("connector", "layers"),
                             eval_every=args.steps, warmup_steps=3)
    train(model, train_ids, None, settings, progress=False)
    row = {"gain": gain, "scale_init": scale, "loss": loss, "steps": args.steps, "ppl_before": before,
           "ppl_after": step_perplexities(model, eval_ids, 3), "scale_after": model.connector.scale.tolist()}
    print(json.dumps(row))
    with open(R.RESULTS / "connector_probe.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
