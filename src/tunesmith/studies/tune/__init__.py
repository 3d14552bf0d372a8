"""``tunesmith tune``: hyperparameter search with Optuna (an optional extra)."""
