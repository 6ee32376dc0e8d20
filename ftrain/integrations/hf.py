"""Hugging Face ``transformers.Trainer`` under ftrain.

    from ftrain.integrations.hf import FtrainCallback, resume_checkpoint

    trainer = Trainer(model=model, args=TrainingArguments(output_dir="out", save_steps=100, ...),
                      train_dataset=data, callbacks=[FtrainCallback()])
    trainer.train(resume_from_checkpoint=resume_checkpoint("out"))

``FtrainCallback`` sends every log of the trainer (``loss``, ``grad_norm``,
``learning_rate`` …) to ``ftrain.log`` at the global step, and a bare heartbeat at every
other step, so the detectors and ``--inject`` see each step. When ftrain asks the job to
stop (preemption, Ctrl-C), the trainer saves a checkpoint and leaves its loop.
``resume_checkpoint`` picks the ``checkpoint-N`` folder to resume from: the one ftrain
chose, else the newest complete one the trainer wrote.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import ftrain
from ftrain.integrations import resume_from_env, scalars

try:
    from transformers import (
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("ftrain.integrations.hf needs Hugging Face transformers: pip install transformers") from exc

__all__ = ["FtrainCallback", "resume_checkpoint"]

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"   # the Trainer writes it last: a folder with it is complete


class FtrainCallback(TrainerCallback):
    """Logs the trainer's metrics through ftrain and turns a stop request into save-and-exit."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        ftrain.should_stop()   # from here on SIGTERM asks for a save instead of killing

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        if not control.should_log:   # a step with a log is reported by on_log
            ftrain.log(state.global_step)
        return _stop_if_asked(control)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> TrainerControl:
        ftrain.log(state.global_step, **scalars(logs))
        return _stop_if_asked(control)   # the trainer saves after logging, in the same step


def _stop_if_asked(control: TrainerControl) -> TrainerControl:
    if ftrain.should_stop():
        control.should_save = True
        control.should_training_stop = True
    return control


def resume_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """What to pass to ``trainer.train(resume_from_checkpoint=...)``.

    ``FTRAIN_RESUME_FROM`` when ftrain chose a checkpoint (a policy with
    ``script: {checkpoints: "out/checkpoint-*"}`` lets it choose, and roll back); else the
    ``checkpoint-N`` folder under ``output_dir`` with the highest N that has its
    ``trainer_state.json``; else None, a fresh start.
    """
    chosen = resume_from_env()
    if chosen is not None:
        return chosen
    root = Path(output_dir)
    try:
        entries = list(root.iterdir())
    except OSError:
        return None
    complete = [(int(m.group(1)), p) for p in entries
                if (m := _CHECKPOINT_RE.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return str(max(complete)[1]) if complete else None
