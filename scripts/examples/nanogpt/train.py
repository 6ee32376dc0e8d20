"""
A training script in the style of nanoGPT's train.py: a character-level GPT on Tiny
Shakespeare, configured by globals that `--key=value` arguments override, with its own
checkpoint `out_dir/ckpt.pt` and `--init_from=resume` to continue from it. It knows
nothing of ftrain; configs/examples/nanogpt.policy.yaml tells ftrain how to drive it.

    $ python scripts/examples/nanogpt/train.py --max_iters=200 --batch_size=16
    $ python scripts/examples/nanogpt/train.py --init_from=resume --max_iters=400

Rehearsal knobs (not in nanoGPT), read from the environment so a supervisor can be tried
on this script without editing it:
  EXAMPLE_CRASH_AT=N          at iteration N of a run started from scratch the process
                              dies by SIGSEGV (a crash in native code, once)
  EXAMPLE_NAN_AT=N            at iteration N of a run started from scratch a weight turns
                              NaN (silent data corruption on a flaky device, once)
  EXAMPLE_MAX_MICRO_BATCH=B   the device holds micro-batches of at most B sequences: a
                              larger one fails with PyTorch's CUDA out-of-memory error
  EXAMPLE_STEP_MS=T           every iteration takes at least T ms, as on a real device (a
                              tiny model on a CPU steps faster than a supervisor can watch)
"""

import ctypes
import math
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import GPT, GPTConfig  # noqa: E402

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = 'out'
eval_interval = 100
log_interval = 1
eval_iters = 20
eval_only = False
always_save_checkpoint = True
init_from = 'scratch'  # 'scratch' or 'resume'
# data
data_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'data', 'tinyshakespeare.txt')
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64
# model
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
# adamw optimizer
learning_rate = 1e-3
max_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
# learning rate decay settings
decay_lr = True
warmup_iters = 100
lr_decay_iters = 2000
min_lr = 1e-4
# system
device = 'cpu'
dtype = 'float32'
threads = 1
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}  # will be useful for logging
# -----------------------------------------------------------------------------

crash_at = int(os.environ.get('EXAMPLE_CRASH_AT', -1))
nan_at = int(os.environ.get('EXAMPLE_NAN_AT', -1))
max_micro_batch = int(os.environ.get('EXAMPLE_MAX_MICRO_BATCH', 1 << 30))
step_s = int(os.environ.get('EXAMPLE_STEP_MS', 0)) / 1000

tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print(f"tokens per iteration will be: {tokens_per_iter:,}")
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)
torch.set_num_threads(threads)
device_type = 'cuda' if 'cuda' in device else 'cpu'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast(device_type=device_type, dtype=ptdtype)

# data: characters of Tiny Shakespeare, 90% train, 10% val
with open(data_path) as f:
    text = f.read()
chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
n = int(0.9 * len(data))
train_data, val_data = data[:n], data[n:]


def get_batch(split):
    source = train_data if split == 'train' else val_data
    ix = torch.randint(len(source) - block_size, (batch_size,))
    x = torch.stack([source[i:i + block_size] for i in ix])
    y = torch.stack([source[i + 1:i + 1 + block_size] for i in ix])
    return x.to(device), y.to(device)


iter_num = 0
best_val_loss = 1e9
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=len(chars), dropout=dropout)
if init_from == 'scratch':
    print("Initializing a new model from scratch")
    model = GPT(GPTConfig(**model_args))
elif init_from == 'resume':
    print(f"Resuming training from {out_dir}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    checkpoint = torch.load(ckpt_path, map_location=device)
    for k in ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size']:
        model_args[k] = checkpoint['model_args'][k]  # the architecture must match the checkpoint
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(checkpoint['model'])
    iter_num = checkpoint['iter_num']
    best_val_loss = checkpoint['best_val_loss']
else:
    raise ValueError(f"init_from={init_from!r}: use 'scratch' or 'resume'")
model.to(device)

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if init_from == 'resume':
    optimizer.load_state_dict(checkpoint['optimizer'])
checkpoint = None  # free up memory


@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ['train', 'val']:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out


def get_lr(it):
    """Linear warmup, then cosine decay down to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def out_of_memory(micro_batch):
    """What PyTorch raises when the activations of a micro-batch do not fit on the device."""
    return torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate {0.75 * micro_batch / max_micro_batch:.2f} GiB. GPU 0 has a total capacity of 10.50 GiB "
        f"of which 0.31 GiB is free. Including non-PyTorch memory, this process has 10.18 GiB memory in use. "
        f"Of the allocated memory 9.71 GiB is allocated by PyTorch, and 0.22 GiB is reserved by PyTorch but "
        f"unallocated. If reserved but unallocated memory is large try setting "
        f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
        f"Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


X, Y = get_batch('train')
t0 = time.time()
local_iter_num = 0
running_mfu = -1.0
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    if iter_num % eval_interval == 0:
        losses = estimate_loss()
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = losses['val']
            if iter_num > 0:
                checkpoint = {
                    'model': model.state_dict(),
                    'optimizer': optimizer.state_dict(),
                    'model_args': model_args,
                    'iter_num': iter_num,
                    'best_val_loss': best_val_loss,
                    'config': config,
                }
                print(f"saving checkpoint to {out_dir}")
                torch.save(checkpoint, os.path.join(out_dir, 'ckpt.pt'))
    if iter_num == 0 and eval_only:
        break

    if iter_num == crash_at and init_from == 'scratch':
        sys.stdout.flush()
        ctypes.string_at(0)  # SIGSEGV
    if step_s:
        time.sleep(step_s)
    if iter_num == nan_at and init_from == 'scratch':
        with torch.no_grad():
            model.lm_head.weight[0, 0] = float('nan')

    for micro_step in range(gradient_accumulation_steps):
        if batch_size > max_micro_batch:
            raise out_of_memory(batch_size)
        with ctx:
            logits, loss = model(X, Y)
            loss = loss / gradient_accumulation_steps
        X, Y = get_batch('train')
        loss.backward()
    if grad_clip != 0.0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0:
        lossf = loss.item() * gradient_accumulation_steps
        if local_iter_num >= 5:
            mfu = model.estimate_mfu(batch_size * gradient_accumulation_steps, dt)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {running_mfu * 100:.2f}%")
    iter_num += 1
    local_iter_num += 1

    if iter_num > max_iters:
        break
