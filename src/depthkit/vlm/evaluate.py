"""Held-out quality and representation statistics of a (recursive) VLM at every recursion step.

- Answer accuracy: an example is right when every answer token (EOS included) is the argmax
  under teacher forcing, which is exactly when greedy decoding would produce the answer.
- Answer perplexity: exp of the mean cross-entropy over answer tokens.
- Motivation statistics (RecursiveVLM): for the input of each step, the mean hidden-state norm
  and the linear CKA with the input embeddings, separately for vision and text tokens. Vanilla
  recursion feeds the last hidden state back, whose norm and distribution drift from what the
  first layer was trained on; the connector is meant to keep them close.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from depthkit.analysis.metrics import linear_cka
from depthkit.vlm.batches import VQABatches
from depthkit.vlm.model import TEXT_TOKEN, VISION_TOKEN, VisionLanguageModel, VLMBatch, answer_targets

MODALITIES = {"text": TEXT_TOKEN, "vision": VISION_TOKEN}


@dataclass
class StepQuality:
    step: int
    accuracy: float
    perplexity: float
    task_accuracy: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate_steps(vlm: VisionLanguageModel, batches: VQABatches, num_loops: int, batch_size: int = 32,
                   progress: bool = True) -> list[StepQuality]:
    """Accuracy and answer perplexity at every step 1..num_loops on all examples of `batches`."""
    vlm.eval()
    correct = torch.zeros(num_loops, len(batches), dtype=torch.bool)
    nll, tokens = torch.zeros(num_loops, dtype=torch.float64), 0
    for indices, batch in tqdm(batches.in_order(batch_size), total=-(-len(batches) // batch_size),
                               desc=f"evaluate R={num_loops}", disable=not progress):
        mask, targets = answer_targets(batch.labels)
        owner = mask.nonzero()[:, 0]  # which example of the batch each answer token belongs to
        for step, logits in enumerate(vlm(batch, num_loops)):
            nll[step] += F.cross_entropy(logits.float(), targets, reduction="sum").double()
            wrong = torch.zeros(len(indices), dtype=torch.long).index_add_(
                0, owner, (logits.argmax(-1) != targets).long())
            correct[step, indices] = wrong == 0
        tokens += len(targets)
    tasks = defaultdict(list)
    for index, example in enumerate(batches.examples):
        tasks[example.task].append(index)
    return [
        StepQuality(step + 1, float(correct[step].float().mean()), float(torch.exp(nll[step] / max(tokens, 1))),
                    {task: float(correct[step, ids].float().mean()) for task, ids in sorted(tasks.items())})
        for step in range(num_loops)
    ]


@torch.no_grad()
def step_inputs(vlm: VisionLanguageModel, batch: VLMBatch, num_loops: int) -> list[torch.Tensor]:
    """The input of every step: the embeddings, then whatever the feedback builds from each step."""
    connector = vlm.recursive.connector
    built: list[torch.Tensor] = []
    handle = connector.register_forward_hook(lambda _m, _a, out: built.append(out)) if connector else None
    try:
        hiddens = [step.hidden for step in vlm.steps(batch, num_loops)]
    finally:
        if handle is not None:
            handle.remove()
    return [vlm.input_embeddings(batch)] + (built if connector is not None else hiddens[:-1])


@torch.no_grad()
def representation_stats(vlm: VisionLanguageModel, batches: VQABatches, num_loops: int, batch_size: int = 32,
                         max_examples: int = 128) -> dict[str, list[dict[str, float]]]:
    """Per modality and step: mean L2 norm of the step input and its linear CKA with the embeddings."""
    vlm.eval()
    per_step: list[dict[str, list[torch.Tensor]]] = [defaultdict(list) for _ in range(num_loops)]
    for indices, batch in batches.in_order(batch_size):
        if indices[0] >= max_examples:
            break
        for step, states in enumerate(step_inputs(vlm, batch, num_loops)):
            for name, kind in MODALITIES.items():
                select = batch.valid & (batch.token_types == kind)
                per_step[step][name].append(states[select].float())
    stats: dict[str, list[dict[str, float]]] = {}
    for name in MODALITIES:
        embeddings = torch.cat(per_step[0][name])
        stats[name] = []
        for step in range(num_loops):
            states = torch.cat(per_step[step][name])
            stats[name].append({"step": step + 1, "norm": float(states.norm(dim=-1).mean()),
                                "cka_to_embeddings": linear_cka(states, embeddings)})
    return stats
