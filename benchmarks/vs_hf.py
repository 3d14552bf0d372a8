"""HF Trainer vs tunesmith, back to back on the offline demo assets (MiniLM-L6, Rotten Tomatoes).

Three pairs (full fine-tuning, LoRA r=8 on query/value, top-2 blocks + head),
each contender in its own process, HF Trainer twice (random and length-grouped
batches); prints the machine, a per-contender table
(train time, real tokens/s, samples/s, peak RSS, test accuracy, share of the
fp32 matmul peak) and tunesmith/HF ratios. The logic lives in
``tunesmith.studies.bench`` (fairness rules and the FLOP formula are documented there).

    python benchmarks/vs_hf.py                       # 4,000 train rows, 1 epoch, bs 16
    python benchmarks/vs_hf.py --quick               # smoke run: 200 rows
    python benchmarks/vs_hf.py --pairs full,lora --rows 2000 --epochs 2 --out vs_hf.json
"""

from __future__ import annotations

import sys

from tunesmith.studies.bench import main

if __name__ == "__main__":
    sys.exit(main())
