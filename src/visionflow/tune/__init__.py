"""`vflow tune`: the hyperparameter search, an Optuna study over params.yaml's `tune.space`.

- `space`: Optuna suggestions for the tuned keys, a trial's params, the study's fingerprint;
- `study`: the study, its storage (sqlite, or the team stack's PostgreSQL), sampler, pruner;
- `objective`: one trial, trained on the packed train split and scored on val;
- `search`: trials in parallel until the budget is spent; `progress`: the live display;
- `mlflow_runs`: the study's parent run and a child run per trial;
- `apply`: the best trial's values into params.yaml.
"""
