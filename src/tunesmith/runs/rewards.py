"""The rewards of an RL run, with the classifier reward's saved run loaded.

Loading a saved tunesmith run is this layer's job (``runs/load.py``), so the
RL task gets its classifier rewards from here as plain scorers: texts in, the
probability of the chosen label out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunesmith.config.rl import ClassifierReward, RLConfig
from tunesmith.errors import ConfigError
from tunesmith.runs.load import load_checkpoint
from tunesmith.tasks.rl_rewards import RewardSet, Scorer, build_rewards

#: Texts scored per forward of the classifier.
SCORE_BATCH = 32


def rl_rewards(rl: RLConfig) -> RewardSet:
    """The run's ``rl.rewards``, classifiers loaded."""
    return build_rewards(rl.rewards, rl.max_new_tokens, classifier_scorer)


def classifier_scorer(cfg: ClassifierReward) -> Scorer:
    """P(``cfg.label``) from the single-label classifier saved in ``cfg.path``.

    Raises:
        ConfigError: The folder holds no single-label classifier or lacks the label.
    """
    saved, _, model, tokenizer, labels = load_checkpoint(cfg.path)
    where = f"rl.rewards classifier {cfg.path}"
    if saved.task.type != "sequence_classification" or saved.task.problem_type != "single_label":
        raise ConfigError(
            f"{where}: holds a {saved.task.type} ({saved.task.problem_type}) run; the reward "
            "reads a single-label sequence classifier"
        )
    if cfg.label not in labels:
        raise ConfigError(f"{where}: no label {cfg.label!r} (labels: {', '.join(labels)})")
    index = labels.index(cfg.label)
    model.eval().requires_grad_(False)
    limit = saved.data.max_length

    def score(texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), SCORE_BATCH):
                enc = tokenizer(
                    list(texts[start : start + SCORE_BATCH]),
                    truncation=True,
                    max_length=limit,
                    padding=True,
                    return_tensors="pt",
                )
                probs = model(**enc).logits.float().softmax(-1)[:, index]
                out += probs.tolist()
        return out

    return score
