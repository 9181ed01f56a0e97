"""Run by `test_recover_multiprocess.py` under `torch.distributed.run` (2 processes, gloo on CPU):
LoRA recovery of a tiny model through accelerate's multi-process (DDP) path, with self-distillation
(the main process generates the teacher's answers, the other loads them), then a check on the main
process that the merged checkpoint has the perplexity the card reports."""

import json
import sys

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from depthkit.models.loading import load_tokenizer
from depthkit.models.tiny import tiny_model
from depthkit.recover import RecoverySettings, recover
from depthkit.recover.trainer import evaluate

out = sys.argv[1]
accelerator = Accelerator(cpu=True)
phrase = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(0))
stream = phrase.repeat(200)
settings = RecoverySettings(steps=6, seq_len=32, batch_size=2, lr=1e-2, warmup_steps=1, eval_every=6,
                            eval_tokens=128, checkpoint_every=6, self_distill=4, self_distill_tokens=4)
tokenizer = load_tokenizer("smollm2-135m-instruct")
card = recover(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, stream, stream[:512], settings, out,
               teacher=tiny_model("llama", seed=1, vocab_size=len(tokenizer)), accelerator=accelerator,
               progress=False)
if accelerator.is_main_process:
    saved = AutoModelForCausalLM.from_pretrained(f"{out}/model", dtype=torch.float32)
    print(json.dumps({"processes": accelerator.num_processes, "card_after": card["perplexity_after"],
                      "card_before": card["perplexity_before"], "saved": evaluate(saved, stream[:512], settings),
                      "self_distill_steps": [e["step"] for e in card["losses"] if "self_distill_kl" in e]}))
# Leave the process group before exiting (see multiprocess_vlm.py: a rank exiting while gloo's
# threads still run can die with "terminate called without an active exception").
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
