"""Make a real Hugging Face Trainer checkpoint and a real Accelerate ``save_state`` directory.

Usage: ``python hf_train.py OUT``. Tiny Llama models built from configs (no download);
writes ``OUT/trainer/checkpoint-{2,3}/`` (Trainer.train, save_steps=2, max_steps=3),
``OUT/accelerate/`` (Accelerator.save_state after 2 steps) and ``OUT/truth.pt``: the
live objects' state by parameter name, to compare the converted checkpoints against.
"""

import os
import random
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

out = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def by_name(model, optimizer) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.detach().clone() for k, v in st.items()} for p, st in optimizer.state.items()}


# --- Trainer: two param groups (weight decay / none), linear schedule with warm-up
model = LlamaForCausalLM(cfg)
args = TrainingArguments(output_dir=os.path.join(out, "trainer"), max_steps=3, save_steps=2, per_device_train_batch_size=4,
                         report_to=[], use_cpu=True, learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="linear",
                         warmup_steps=1, dataloader_num_workers=0, disable_tqdm=True, logging_steps=1)
trainer = Trainer(model=model, args=args, train_dataset=Tokens())
trainer.train()
truth = {
    "trainer": {
        "slots": by_name(model, trainer.optimizer),
        "scheduler": trainer.lr_scheduler.state_dict(),
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "groups": [len(g["params"]) for g in trainer.optimizer.param_groups],
    }
}

# --- Accelerate: one AdamW group over model.parameters(), StepLR, RNG states
acc = Accelerator(cpu=True)
m2 = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(m2.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
m2, opt, sched = acc.prepare(m2, opt, sched)
for _ in range(2):
    ids = torch.randint(0, 64, (2, 8))
    loss = m2(input_ids=ids, labels=ids).loss
    acc.backward(loss)
    opt.step()
    sched.step()
    opt.zero_grad()
random.seed(7)
np.random.seed(7)
torch.manual_seed(7)
acc.save_state(os.path.join(out, "accelerate"))
truth["accelerate"] = {
    "slots": by_name(m2, opt.optimizer if hasattr(opt, "optimizer") else opt),
    "scheduler": sched.scheduler.state_dict() if hasattr(sched, "scheduler") else sched.state_dict(),
    "weights": {n: p.detach().clone() for n, p in m2.named_parameters()},
    "torch_rng": torch.get_rng_state(),
    "python_rng": list(random.getstate()[1]),
    "numpy_rng": np.random.get_state()[1].tolist(),
}
with open(os.path.join(out, "param_order.txt"), "w") as f:
    f.write("\n".join(n for n, _ in m2.named_parameters()) + "\n")
torch.save(truth, os.path.join(out, "truth.pt"))
