"""Fine-tune Qwen-Audio on your own transcripts, then use the result:
python examples/finetune.py train.jsonl OUTPUT_DIR [--model DIR] [--steps 100]

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
args = parser.parse_args()

try:
    examples, bad = finetune.read_examples(args.data)  # every line checked before anything loads
    if bad:
        raise SystemExit("error: fix these lines first:\n  " + "\n  ".join(bad))
    model = qwenaudio.load(args.model, dtype="float32")  # AdamW needs fp32 weights
    config = finetune.TrainConfig(steps=args.steps, batch_size=4, lr=1e-5, warmup_steps=10, part="decoder")
    losses = finetune.train(model, examples, args.output_dir, config,
                            progress=lambda r: print(f"step {r['step']}: loss {r['loss']:.4f}"))
    tuned = finetune.save_model(model, qwenaudio.hub.resolve(args.model), f"{args.output_dir}/model")
except qwenaudio.QwenAudioError as e:
    raise SystemExit(f"error: {e}")
model.eval()
print(f"saved {tuned}; the first example now reads:", tasks.transcribe(model, str(examples[0].audio[0])))
