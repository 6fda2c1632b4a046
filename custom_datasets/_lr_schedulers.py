"""A resumable cosine schedule: a workaround for a resume bug in torchtune 0.6.1's stock recipe."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup


def cosine_schedule_with_warmup(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: float = 0.5,
    last_epoch: int = -1,
) -> LambdaLR:
    """torchtune's `get_cosine_schedule_with_warmup`, which also resumes where training stopped.

    `lora_finetune_single_device` 0.6.1 restores `global_step` only inside its
    `max_steps_per_epoch` branch, so on `resume_from_checkpoint=True` with `max_steps_per_epoch: null`
    it builds the scheduler with `last_epoch=-1` and the learning rate starts its warmup and decay
    again. The optimizer state it has just loaded knows how many steps were taken; resume from there.

    Args:
        optimizer: the optimizer, with its state already loaded when resuming.
        num_warmup_steps: steps of linear warmup.
        num_training_steps: total optimizer steps.
        num_cycles: cosine cycles (0.5: from the peak down to 0).
        last_epoch: the last step taken; -1 reads it from the optimizer state.

    Returns:
        LambdaLR: the schedule.
    """
    if last_epoch == -1:
        steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
        if steps and all("initial_lr" in g for g in optimizer.param_groups):
            last_epoch = int(max(steps)) - 1
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, num_cycles, last_epoch)
