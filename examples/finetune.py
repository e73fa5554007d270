"""Fine-tune Qwen-Audio on your own transcripts, then use the result:
python examples/finetune.py train.jsonl OUTPUT_DIR [--model DIR] [--steps 100] [--eval-data dev.jsonl]

train.jsonl holds one example a line, e.g. {"audio": "clips/a.wav", "prompt": "<|startoftranscript|><|en|>
<|transcribe|><|en|><|notimestamps|><|wo_itn|>", "response": "what is said"}; audio paths are relative to it."""

import argparse

import qwenaudio
from qwenaudio import finetune, tasks

parser = argparse.ArgumentParser(description="Fine-tune Qwen-Audio's decoder on a JSON Lines file.")
parser.add_argument("data")
parser.add_argument("output_dir")
parser.add_argument("--model", default="Qwen/Qwen-Audio", help="checkpoint directory or Hugging Face repo id")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--eval-data", help="held-out examples: their loss (and WER) with each checkpoint")
args = parser.parse_args()

try:
    examples, bad = finetune.read_examples(args.data)  # every line checked before anything loads
    held_out, bad_held_out = finetune.read_examples(args.eval_data) if args.eval_data else ([], [])
    if bad or bad_held_out:
        raise SystemExit("error: fix these lines first:\n  " + "\n  ".join(bad + bad_held_out))
    config = finetune.TrainConfig(steps=args.steps, batch_size=4, lr=1e-5, warmup_steps=10, part="decoder",
                                  save_every=50, eval_task="asr" if held_out else None)
    model = qwenaudio.load(args.model, dtype=finetune.weights_dtype(config, None))  # float32: AdamW needs it

    def report(record: dict) -> None:
        held = f", held-out loss {record['eval_loss']:.4f}, WER {record['eval_wer']}" if "eval_loss" in record else ""
        print(f"step {record['step']}: loss {record['loss']:.4f}{held}")

    losses = finetune.train(model, examples, args.output_dir, config, eval_examples=held_out, progress=report)
    tuned = finetune.save_model(model, qwenaudio.hub.resolve(args.model), f"{args.output_dir}/model")
except qwenaudio.QwenAudioError as e:
    raise SystemExit(f"error: {e}")
model.eval()
print(f"saved {tuned}; the first example now reads:", tasks.transcribe(model, str(examples[0].audio[0])))
