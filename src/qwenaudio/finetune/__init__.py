"""Fine-tuning either family, as torchtune and litgpt split it: `data` (the three JSON Lines forms, checked line by
line, turned into token ids and labels as the model's family reads them, batched by length), `config`
(`TrainConfig` and the policy on what may be trained over which weights), `loop` (`train`, a step at a time: its
gradients in `step`, held-out scores in `validation`, records in `log`) and `checkpoints` (a run's checkpoint,
resuming it, and `export`: the fine-tuned model in the official layout, or its adapter). Every public name is
here: `finetune.train`, `finetune.export`, …
"""

from .checkpoints import (INPUT_NAMES, check_resume, checkpoint_dir, export, output_errors, run_inputs, save_model,
                          steps_done)
from .config import (MAX_BATCH, MAX_STEPS, PARTS, PRECISIONS, RESUMABLE_CHANGES, SEED_LIMIT, TrainConfig,
                     check_quantization, schedule, trainable, weights_dtype)
from .data import Example, Turn, collate, encode, plan_order, read_examples
from .loop import train
from .validation import reply_languages

__all__ = [
    "INPUT_NAMES", "MAX_BATCH", "MAX_STEPS", "PARTS", "PRECISIONS", "RESUMABLE_CHANGES", "SEED_LIMIT",
    "Example", "TrainConfig", "Turn", "check_quantization", "check_resume", "checkpoint_dir", "collate", "encode",
    "export", "output_errors", "plan_order", "read_examples", "reply_languages", "run_inputs", "save_model", "schedule",
    "steps_done", "train", "trainable", "weights_dtype",
]
