"""Score Qwen-Audio on a benchmark file as the official script does:
python examples/evaluate.py TASK DATA.jsonl OUTPUT_DIR [--model DIR] [--limit N]

Rerun the same command after an interruption: examples already replied to are not run again."""

import argparse

import qwenaudio
from qwenaudio import evaluation

parser = argparse.ArgumentParser(description="Run one of the Qwen-Audio paper's benchmarks.")
parser.add_argument("task", choices=evaluation.BENCHMARKS)
parser.add_argument("data", help="official-format JSON Lines: audio, gt, source (and question for aqa)")
parser.add_argument("output_dir", help="replies, examples.jsonl, summary.json and summary.md go here")
parser.add_argument("--model", default="Qwen/Qwen-Audio", help="checkpoint directory or Hugging Face repo id")
parser.add_argument("--limit", type=int, help="only the first N examples")
args = parser.parse_args()

try:
    model = qwenaudio.load(args.model)
    summary = evaluation.evaluate(model, args.task, args.data, args.output_dir, limit=args.limit,
                                  model_name=args.model, progress=evaluation.report_progress)
except qwenaudio.QwenAudioError as e:  # no weights, a data file that cannot be read, another run's directory
    raise SystemExit(f"error: {e}")
for source in summary["sources"]:
    paper = source["paper"] or {}
    for name, value in source["scores"].items():
        print(f"{source['source']} {name}: {value} (paper: {paper.get(name, '-')})")
print(f"{summary['replied']} of {summary['examples']} examples; failed: {len(summary['failed'])}")
