"""A script that knows nothing of ftrain and prints what Hugging Face's Trainer prints: a
tqdm bar on stderr (``ProgressCallback``: ``tqdm(total=max_steps, dynamic_ncols=True)``,
``update`` after each step) and, every LOG_EVERY steps, the log dict through
``training_bar.write(str(logs))`` (epoch rounded to 2 places), a dict whose loss is NaN at
step NAN_AT. Each step takes longer than tqdm's 0.1 s redraw interval, so every count is
drawn. argv: STEPS LOG_EVERY NAN_AT."""

import sys
import time

from tqdm.auto import tqdm

steps, log_every, nan_at = (int(a) for a in sys.argv[1:4])
bar = tqdm(total=steps, dynamic_ncols=True)
for step in range(1, steps + 1):
    time.sleep(0.11)
    bar.update(1)
    if step % log_every == 0:
        loss = float("nan") if step == nan_at else 3.0 / step
        logs = {"loss": loss, "grad_norm": 1.25, "learning_rate": 5e-05 * (1 - step / steps),
                "epoch": round(step / steps * 3, 2)}
        bar.write(str(logs))
bar.close()
print(str({"train_runtime": 4.2, "train_samples_per_second": 9.5, "train_steps_per_second": 9.5,
           "train_loss": 0.9, "epoch": 3.0}))
