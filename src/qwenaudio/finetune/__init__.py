"""Fine-tuning Qwen-Audio, as torchtune and litgpt split it: `data` (the three JSON Lines forms, checked line by
line, turned into token ids and labels, batched by length), `config` (`TrainConfig` and the policy on what may be
trained over which weights), `loop` (`train`, a step at a time: its gradients in `step`, held-out scores in
`validation`, records in `log`) and `checkpoints` (a run's checkpoint, resuming it, and the fine-tuned model in the
official layout). Every public name is here: `finetune.train`, `finetune.read_examples`, `finetune.TrainConfig`, …
"""

from .checkpoints import INPUT_NAMES, check_resume, output_errors, run_inputs, save_model
from .config import (MAX_BATCH, MAX_STEPS, PARTS, PRECISIONS, RESUMABLE_CHANGES, SEED_LIMIT, TrainConfig,
                     check_quantization, schedule, trainable, weights_dtype)
from .data import Example, Turn, collate, encode, plan_order, read_examples
from .loop import train
from .validation import reply_languages

__all__ = [
    "INPUT_NAMES", "MAX_BATCH", "MAX_STEPS", "PARTS", "PRECISIONS", "RESUMABLE_CHANGES", "SEED_LIMIT",
    "Example", "TrainConfig", "Turn", "check_quantization", "check_resume", "collate", "encode", "output_errors",
    "plan_order", "read_examples", "reply_languages", "run_inputs", "save_model", "schedule", "train",
    "trainable", "weights_dtype",
]
