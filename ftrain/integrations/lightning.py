"""PyTorch Lightning under ftrain (the ``lightning`` package or ``pytorch_lightning``).

    from ftrain.integrations.lightning import FtrainCallback, resume_checkpoint

    trainer = L.Trainer(max_steps=1000, default_root_dir="runs/lit", callbacks=[FtrainCallback()])
    trainer.fit(model, data, ckpt_path=resume_checkpoint("runs/lit"))

``FtrainCallback`` sends the trainer's ``callback_metrics`` (what the module ``self.log``s,
plus the training step's ``loss``) to ``ftrain.log`` every ``log_every_n_steps``, and a bare
heartbeat after every other batch, so the detectors and ``--inject`` see each step. When
ftrain asks the job to stop (preemption, Ctrl-C), it saves a checkpoint where the trainer's
``ModelCheckpoint`` saves, named like its own, and sets ``trainer.should_stop``. Lightning
hears the SIGTERM too and ends the process after the batch (``SIGTERMException``, exit 0);
the callback saves first, or from ``on_exception`` if the signal came after its turn.
``resume_checkpoint`` picks the ``.ckpt`` to resume from: the one ftrain chose, else the
newest the trainer wrote.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import ftrain
from ftrain.ckptfmt import guess_step
from ftrain.integrations import resume_from_env, scalars

__all__ = ["FtrainCallback", "resume_checkpoint"]


def _callback_bases() -> tuple[type, ...]:
    """``Callback`` of each Lightning package installed: the two are distinct classes, and a
    trainer accepts only its own package's callbacks."""
    bases = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(package).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError("ftrain.integrations.lightning needs PyTorch Lightning: pip install lightning")
    return tuple(bases)


class FtrainCallback(*_callback_bases()):  # type: ignore[misc]
    """Logs the trainer's metrics through ftrain and turns a stop request into save-and-exit.

    ``every_n_steps`` (default: the trainer's ``log_every_n_steps``) sets how often the
    metrics are read, since reading a tensor on a GPU waits for the device.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._saved_on_stop = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        ftrain.should_stop()   # from here on SIGTERM asks for a save instead of killing

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if step % every == 0:
            metrics = scalars(trainer.callback_metrics)
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if "loss" not in metrics and loss is not None:
                metrics.update(scalars({"loss": loss}))
            ftrain.log(step, **metrics)
        else:
            ftrain.log(step)
        if ftrain.should_stop():
            self._save_on_stop(trainer)
            trainer.should_stop = True

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if ftrain.should_stop():   # Lightning's own SIGTERM exit, before this callback's turn
            self._save_on_stop(trainer)

    def _save_on_stop(self, trainer: Any) -> None:
        if not self._saved_on_stop:
            self._saved_on_stop = True
            trainer.save_checkpoint(stop_checkpoint_path(trainer))


def stop_checkpoint_path(trainer: Any) -> str:
    """Where a stop request saves: the ``ModelCheckpoint``'s folder (else
    ``default_root_dir/checkpoints``), named as Lightning names its own."""
    callback = getattr(trainer, "checkpoint_callback", None)
    folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
    return os.path.join(folder, f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt")


def resume_checkpoint(root_dir: str | os.PathLike[str]) -> str | None:
    """What to pass to ``trainer.fit(..., ckpt_path=...)``.

    ``FTRAIN_RESUME_FROM`` when ftrain chose a checkpoint (a policy with
    ``script: {checkpoints: "runs/lit/**/*.ckpt"}`` lets it choose, and roll back); else the
    newest ``.ckpt`` file under ``root_dir`` (any depth: Lightning's logger puts them in
    ``lightning_logs/version_N/checkpoints/``), by modification time as Lightning's own
    ``ckpt_path="last"`` does, the step in the name breaking ties; else None.
    """
    chosen = resume_from_env()
    if chosen is not None:
        return chosen
    found = []
    for path in Path(root_dir).glob("**/*.ckpt"):
        try:
            found.append((path.stat().st_mtime, guess_step(path.name) or -1, str(path)))
        except OSError:
            continue   # removed by the checkpoint callback's housekeeping meanwhile
    return max(found)[2] if found else None
