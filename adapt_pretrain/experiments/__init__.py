"""The experiment harness: equal-FLOPs comparisons of reweighting methods (`adapt-pretrain compare`).

Kept apart from the runtime package: it drives the trainer as subprocesses and reads their run
directories, and nothing on the training path imports it (tests/compare/test_harness_apart.py).
- `compare`: the `adapt-pretrain compare` command (plan, prepare, train, evaluate, tabulate).
- `methods/`: method presets, offline selection and mixing, per-run FLOPs, result tables and plots.
"""
