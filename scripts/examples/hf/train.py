# scripts/examples/hf/train.py: a Hugging Face Trainer job under ftrain (docs/integrations.md)
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import ftrain
from ftrain.integrations.hf import FtrainCallback, resume_checkpoint

cfg = ftrain.config(defaults={"train": {"batch_size": 8, "lr": 1e-3, "steps": 60}})
tokens = torch.randint(0, 64, (256, 32), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": t, "labels": t} for t in tokens]
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
args = TrainingArguments(output_dir="out", max_steps=cfg["train"]["steps"], learning_rate=cfg["train"]["lr"],
                         per_device_train_batch_size=cfg["train"]["batch_size"], logging_steps=5,
                         save_steps=20, report_to=[], use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[FtrainCallback()])
trainer.train(resume_from_checkpoint=resume_checkpoint("out"))
