"""The training run: a loop over steps plus stateful callbacks (checkpoints, non-finite policy, the run log,
metrics, console, document table, profiler) and its section of the config (`TrainConfig`)."""
