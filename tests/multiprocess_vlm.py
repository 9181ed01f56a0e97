"""Run by `test_vlm_multiprocess.py` under `torch.distributed.run` (2 processes, gloo on CPU):
stage-2 training of a tiny recursive VLM through accelerate's DDP path. Prints, from the main
process, whether the trained weights are identical on both processes (DDP averaged the gradients)
and each process's first-step loss (different batches give different losses)."""

import json

import torch
import torch.distributed as dist
from accelerate import Accelerator

from depthkit.models.loading import load_tokenizer
from depthkit.models.tiny import tiny_model
from depthkit.vlm.batches import VQABatches
from depthkit.vlm.data import VQAConfig, build_vqa
from depthkit.vlm.model import VisionLanguageModel
from depthkit.vlm.projector import Projector
from depthkit.vlm.train import VLMTrainSettings, train

accelerator = Accelerator(cpu=True)
tokenizer = load_tokenizer("smollm2")
torch.manual_seed(0)
model = tiny_model("llama", vocab_size=len(tokenizer))
vlm = VisionLanguageModel(model, tokenizer, Projector(1280, model.config.hidden_size), num_image_tokens=49)
dataset = build_vqa(VQAConfig(seed=1, num_mnist=40, num_digits=20, num_pairs=12, photo_variants=2))
generator = torch.Generator().manual_seed(0)
features = {i: torch.rand(49, 1280, generator=generator) for i in dataset.image_ids()}
vlm.make_recursive(2, "connector", lora_rank=2, scale_init=0.5)
vlm.language_model.requires_grad_(False)
vlm.projector.requires_grad_(True)
log = train(vlm, VQABatches(vlm, dataset, "train", features), VLMTrainSettings(steps=3, batch_size=4, lr=1e-2),
            progress=False, accelerator=accelerator)
flat = torch.cat([p.detach().flatten() for p in vlm.trainable_parameters()])
copies = [torch.zeros_like(flat) for _ in range(accelerator.num_processes)]
dist.all_gather(copies, flat)
first_losses = [None] * accelerator.num_processes
dist.all_gather_object(first_losses, log.losses[0])
if accelerator.is_main_process:
    print(json.dumps({"processes": accelerator.num_processes, "first_losses": first_losses,
                      "max_weight_difference": float((copies[0] - copies[1]).abs().max())}))
# Leave the process group before exiting: a rank that exits while gloo's threads still run dies
# with "terminate called without an active exception" (seen once in CI).
accelerator.wait_for_everyone()
dist.destroy_process_group()
