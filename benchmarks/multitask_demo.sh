#!/usr/bin/env bash
# Multi-task demo against single-task runs on the same data, splits, learning rate and
# comparable budget: sentiment (4,000 Rotten Tomatoes reviews) + NER (WNUT-16) sharing
# MiniLM-L6 (examples/multitask_rt_wnut.yaml: 5 epochs, uniform sampling, so the reviews
# are seen ~3.75 times and the tweets ~7.5 times), then each task alone for as many
# passes over its data (sentiment 4 epochs, NER 8 epochs as in examples/ner_wnut.yaml).
# About 30 minutes on 2 CPU cores. Results: runs/mt_demo/*/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/tunesmith
OUT=runs/mt_demo
$T -q train examples/multitask_rt_wnut.yaml --no-progress \
    train.output_dir=$OUT/multitask train.overwrite=true
$T -q train examples/sentiment.yaml --no-progress \
    train.output_dir=$OUT/sentiment train.overwrite=true data.max_train_samples=4000 \
    train.epochs=4 optim.lr=1e-4 optim.warmup_ratio=0.1 train.early_stopping_patience=3
$T -q train examples/ner_wnut.yaml --no-progress \
    train.output_dir=$OUT/ner train.overwrite=true
.venv/bin/python - <<'PY'
import json
from pathlib import Path

out = Path("runs/mt_demo")
mt = json.loads((out / "multitask" / "summary.json").read_text())["test"]
st = json.loads((out / "sentiment" / "summary.json").read_text())["test"]
ner = json.loads((out / "ner" / "summary.json").read_text())["test"]
rows = [
    ("sentiment accuracy", st["accuracy"], mt["sentiment/accuracy"]),
    ("NER entity F1", ner["entity_f1"], mt["ner/entity_f1"]),
]
print("| test metric | single-task | multi-task | difference |")
print("| --- | --- | --- | --- |")
for name, single, multi in rows:
    print(f"| {name} | {single:.1%} | {multi:.1%} | {100 * (multi - single):+.1f} points |")
PY
