"""The comparison's config (`adapt-pretrain compare --config FILE`) and the runs it implies.

One YAML file: where results go, how to prepare the corpus, the RunConfig sections every run
shares, the methods and seeds, the offline methods' settings and the evaluation's. Validated at
load so a typo fails before the hour-long run starts.

Paths: relative paths in the file (out_dir, prepare.inputs, eval.extra) are taken from the current
directory, as every other command line path is (the shipped configs assume the repository root).
`prepare.inputs: demo` is the corpus bundled with the package. The corpus can instead be given on
the command line (`--corpus`), which replaces `prepare.inputs`: the shared corpora live outside the
repository, wherever a machine keeps them. A run's fingerprint records the corpus by file name, not
by location, so the same corpus at another path keeps finished runs valid.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import yaml

from adapt_pretrain.config import ConfigError
from adapt_pretrain.evaluate import EvalSettings
from adapt_pretrain.experiments.methods.presets import PRESETS, MethodPreset, get_preset

DEMO_INPUTS = "demo"  # `prepare.inputs: demo`: the corpus bundled with the package


@dataclass
class SelectionConfig:
    """Offline top-k: keep `fraction` of the training tokens; the embed variant scores with a proxy
    model trained for `proxy_steps` uniform steps (seed `proxy_seed`)."""

    fraction: float = 0.25
    proxy_steps: int = 100
    proxy_seed: int = 0
    embed_prefix: Optional[int] = None  # tokens of each document the proxy embeds (None: seq_len)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ConfigError(f"selection.fraction={self.fraction} must be in (0, 1]")
        if int(self.proxy_steps) < 1:
            raise ConfigError("selection.proxy_steps must be >= 1")


@dataclass
class CompareConfig:
    """out_dir: everything the comparison writes (data, runs, results); prepare: PrepareConfig fields
    (out_dir is <out_dir>/data; bm25 is forced on, two methods need it); run: RunConfig sections
    shared by all runs; method_overrides: extra dotted overrides per method; static_mix: {weights};
    eval: EvalSettings keys plus `extra` (JSONL sets evaluated besides the validation split)."""

    out_dir: str
    prepare: dict[str, Any]
    run: dict[str, Any]
    methods: list[str] = field(default_factory=lambda: list(PRESETS))
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    static_mix: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    data_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.selection, Mapping):
            self.selection = SelectionConfig(**self.selection)
        for m in self.methods:
            get_preset(m)
        unknown = sorted(set(self.method_overrides) - set(PRESETS))
        if unknown:
            raise ConfigError(f"method_overrides names unknown method(s) {unknown}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds} must be non-empty and distinct")
        if "static-mix" in self.methods and not (self.static_mix or {}).get("weights"):
            raise ConfigError("method static-mix needs static_mix.weights: {domain: weight, ...}")
        for key in ("run_dir", "seed"):
            if key in (self.run.get("train") or {}):
                raise ConfigError(f"run.train.{key} is set per run by compare; remove it")
        if (self.run.get("data") or {}).get("data_dir"):
            raise ConfigError("run.data.data_dir is set per run by compare; remove it")
        if not isinstance(self.eval, Mapping):
            raise ConfigError(f"eval must be a mapping (EvalSettings keys and extra), got {self.eval!r}")
        self.eval_settings  # noqa: B018  (validates now, not after training)

    @property
    def eval_settings(self) -> EvalSettings:
        return EvalSettings.from_dict({k: v for k, v in self.eval.items() if k != "extra"})

    @property
    def eval_extra(self) -> list[str]:
        return [str(p) for p in self.eval.get("extra") or []]

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out_dir, "data")

    def variant_dir(self, variant: str) -> str:
        return os.path.join(self.out_dir, f"data-{variant}")

    def run_dir(self, method: str, seed: int) -> str:
        return os.path.join(self.out_dir, "runs", f"{method}-s{seed}")

    def variant_info(self, variant: Optional[str]) -> dict[str, Any]:
        """The settings a derived data dir depends on (stored with it, part of its runs' fingerprints)."""
        info: dict[str, Any] = {"prepare": prepare_identity(self.prepare), "data_seed": self.data_seed}
        if variant and variant.startswith("topk-"):
            info.update(method=variant, fraction=float(self.selection.fraction))
            if variant == "topk-embed":
                info.update(proxy_steps=int(self.selection.proxy_steps), proxy_seed=int(self.selection.proxy_seed),
                            embed_prefix=self.selection.embed_prefix)
        elif variant == "static-mix":
            info.update(method=variant, weights=dict(self.static_mix["weights"]))
        return info


def prepare_identity(prepare: Mapping[str, Any]) -> dict[str, Any]:
    """The prepare settings as a fingerprint sees them: inputs by file or folder name, not location."""
    inputs = prepare.get("inputs") or []
    names = [os.path.basename(os.path.normpath(str(p))) for p in ([inputs] if isinstance(inputs, str) else inputs)]
    return {**prepare, "inputs": names}


def resolve_inputs(inputs: Any) -> list[str]:
    """prepare.inputs as absolute paths (`demo`: the bundled corpus; relative: from the current directory)."""
    if inputs in (DEMO_INPUTS, [DEMO_INPUTS]):
        from adapt_pretrain.data.demo import demo_corpus_paths

        return demo_corpus_paths()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise ConfigError("prepare.inputs is missing: name the corpus files or folders in the config, or pass "
                          "--corpus PATH (on the development machines: ../shared/corpora beside the repository)")
    return [os.path.abspath(str(p)) for p in inputs]


def load_compare_config(path: str, methods: Optional[list[str]] = None, seeds: Optional[list[int]] = None,
                        out_dir: Optional[str] = None, corpus: Optional[list[str]] = None,
                        overrides: tuple[str, ...] = ()) -> CompareConfig:
    """Read, override (`--corpus`, dotted `key.sub=value`, methods, seeds, out_dir) and validate a config."""
    from adapt_pretrain.config import parse_override

    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    known = set(CompareConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in known:
            raise ConfigError(f"override {text!r}: unknown key {parts[0]!r}; known: {sorted(known)}")
        node = raw.setdefault(parts[0], {})
        for key in parts[1:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a mapping")
        node[parts[-1]] = value
    if methods:
        raw["methods"] = methods
    if seeds:
        raw["seeds"] = seeds
    if out_dir:
        raw["out_dir"] = out_dir
    for key in ("out_dir", "prepare", "run"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key {key!r}")
    if corpus:
        raw["prepare"]["inputs"] = list(corpus)
    # runs are launched as subprocesses: no cwd surprises
    raw["prepare"]["inputs"] = resolve_inputs(raw["prepare"].get("inputs"))
    raw["out_dir"] = os.path.abspath(str(raw["out_dir"]))
    if (raw.get("eval") or {}).get("extra"):
        raw["eval"]["extra"] = [os.path.abspath(str(p)) for p in raw["eval"]["extra"]]
    return CompareConfig(**raw)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison: which method, seed, directories and the full config."""

    method: str
    seed: int
    run_dir: str
    data_dir: str
    config: dict[str, Any]  # raw RunConfig dict, overrides applied
    data_info: dict[str, Any] = field(default_factory=dict)  # settings that shaped a derived data dir

    @property
    def fingerprint(self) -> str:
        """Hash of what determines the run's result: a cached result with another one is stale."""
        key = {"config": self.config, "data": self.data_info}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_config(cfg: CompareConfig, preset: MethodPreset, seed: int, data_dir: str, run_dir: str,
               extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw RunConfig dict of one run: shared sections + preset + per-method overrides + identity."""
    from adapt_pretrain.config import apply_overrides

    overrides = preset.run_overrides(seed, run_dir, data_dir, (*cfg.method_overrides.get(preset.name, ()), *extra))
    # training output goes to a log file: a progress bar there is one endless line of redraws
    return apply_overrides(copy.deepcopy(cfg.run), [*overrides, "train.progress_bar=false"])


def plan_runs(cfg: CompareConfig) -> list[RunSpec]:
    """Every (method, seed) run, seeds outer: an interrupted comparison then holds every method at the
    first seeds, which already makes a usable table."""
    specs = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            preset = get_preset(method)
            data_dir = cfg.variant_dir(preset.data_variant) if preset.data_variant else cfg.data_dir
            run_dir = cfg.run_dir(method, seed)
            specs.append(RunSpec(method, seed, run_dir, data_dir, run_config(cfg, preset, seed, data_dir, run_dir),
                                 cfg.variant_info(preset.data_variant)))
    return specs
