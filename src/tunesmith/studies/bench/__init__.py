"""Head to head: Hugging Face ``Trainer`` and tunesmith on the same data, settings and machine.

Why: "faster/leaner than the usual recipe" is only worth saying with the usual
recipe run next to it, in the same invocation, under the same load. Each pair
(``full`` fine-tuning, ``lora`` r=8 on query/value, ``top2`` blocks + pooler +
classifier) trains both contenders, each in its own process so its peak RSS
is that contender's alone. Linux carries ``ru_maxrss`` over fork+exec (a child
of a 1 GB parent reports >= 1 GB), so the orchestrating parent loads no torch
(a ``prepare`` child does the heavy preliminaries) and each child reports its
own high-water mark (``VmHWM``) next to ``ru_maxrss``: after training, and at
the end of the process (tunesmith's test evaluation reloads the saved model).

Fairness: the data is split once (tunesmith's seeded stratified split) into
train/validation/test JSONL files both read; both tokenize with the same
tokenizer, ``truncation=True, max_length``; same batch size, epochs, peak LR,
linear schedule with the same warmup ratio, weight decay (neither decays
biases/norms), clip norm 1.0, AdamW (fused where available), seed, fp32 on CPU
and thread count; no checkpoints and no evaluation while training (tunesmith
evaluates validation once after training, outside its timer). Both must train
exactly the same parameter names and see the same real tokens (both checked
and shown). What is left is each tool's own recipe: HF pads random batches
(``DataCollatorWithPadding``), and HF runs a second time with length-grouped
batches (``train_sampling_strategy="group_by_length"``, HF at its best),
tunesmith groups batches by length (both padding shares are shown); HF warms
up from LR 0, tunesmith from LR/warmup; the new classifier starts from HF's
normal(0.02) vs tunesmith's Xavier init. Per pair HF runs first, then
tunesmith; each run records the 1-minute load average at its end, since other
work on the machine slows both. The fp32 matmul peak is sampled before the
runs and after each contender; the best sample counts.

Training FLOPs per real token (``flops_per_token``; N = weights of the Linear
layers inside the transformer blocks): ``2*N_all`` forward + ``2*N_act`` for
gradients w.r.t. activations of every matmul after the first trainable
parameter + ``2*N_trained`` for gradients w.r.t. trained matmul weights. Full
fine-tuning gives the usual ``6*N``; top-2 ``2N + 4*N_top2``; LoRA about
``4N`` (gradients flow down to block 0, but frozen weights get none).
Attention score products, embeddings, norms, the per-sample pooler/classifier
and the optimizer are left out, so the fraction of matmul peak is a lower bound.
"""

from tunesmith.studies.bench.contenders import (
    BASELINES,
    CONTENDERS,
    PAIRS,
    RunSpec,
    TokenCounter,
    hf_model,
    run_contender,
    tunesmith_model,
)
from tunesmith.studies.bench.measure import (
    flops_per_token,
    grouped_padded_tokens,
    matmul_peak_flops,
    trainable_names,
)
from tunesmith.studies.bench.orchestrate import add_rates, main, run_benchmark
from tunesmith.studies.bench.report import format_tables

__all__ = [
    "BASELINES",
    "CONTENDERS",
    "PAIRS",
    "RunSpec",
    "TokenCounter",
    "add_rates",
    "flops_per_token",
    "format_tables",
    "grouped_padded_tokens",
    "hf_model",
    "main",
    "matmul_peak_flops",
    "run_benchmark",
    "run_contender",
    "trainable_names",
    "tunesmith_model",
]
