"""The training run: a loop over steps plus stateful callbacks (checkpoints, non-finite policy, metrics,
console, document table), its section of the config (`TrainConfig`) and the run's planned layout."""
