"""The comparison's config (`adapt-pretrain compare --config FILE`) and the runs it implies.

One YAML file: where results go, how to prepare the corpus, the RunConfig sections every run
shares, the methods and seeds, the offline methods' settings and the evaluation's. Its sections are
declared with the rules of `adapt_pretrain.config.base` and read with the overrides of
`adapt_pretrain.config.files`, as a run config is: a typo fails at load (naming the closest known
key), before the hour-long run starts.

Paths: relative paths in the file (out_dir, prepare.inputs, eval.extra) are taken from the current
directory, as every other command line path is (the shipped configs assume the repository root).
The corpus is a required input: `prepare.inputs` in the file or `--corpus` on the command line
(which replaces it); `demo` is the corpus bundled with the package. A run's fingerprint records the
corpus by file name, not by location, so the same corpus at another path keeps finished runs valid.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

from adapt_pretrain.config import ConfigError
from adapt_pretrain.config.base import Section, check_keys, integer, number, optional_integer, suggest, text, texts
from adapt_pretrain.config.derive import DEMO_INPUTS
from adapt_pretrain.config.files import apply_overrides, read_config_file
from adapt_pretrain.evaluate import EvalSettings
from adapt_pretrain.experiments.methods.presets import PRESETS, MethodPreset, get_preset

CORPUS_HINT = ("pass --corpus DIR (a folder of JSONL files per domain; `demo` = the corpus bundled with the "
               "package) or set prepare.inputs in the config")


@dataclass
class SelectionConfig(Section):
    """Offline top-k: keep `fraction` of the training tokens; the embed variant scores with a proxy
    model trained for `proxy_steps` uniform steps (seed `proxy_seed`), embedding the first
    `embed_prefix` tokens of each document (None: seq_len)."""

    SECTION = "selection"

    fraction: float = number(0.25, above=0.0, maximum=1.0)
    proxy_steps: int = integer(100, minimum=1)
    proxy_seed: int = integer(0, minimum=0)
    embed_prefix: Optional[int] = optional_integer(None, minimum=1)


@dataclass
class StaticMixConfig(Section):
    """The static mix's domain weights ({domain: weight}; normalised when the data is built)."""

    SECTION = "static_mix"

    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CompareEvalConfig(EvalSettings):
    """The `eval:` section: EvalSettings plus `extra`, JSONL sets evaluated besides the validation split."""

    extra: list[str] = texts(default_factory=list)


@dataclass
class CompareConfig(Section):
    """out_dir: everything the comparison writes (data, runs, results); prepare: PrepareConfig fields
    (out_dir is <out_dir>/data; bm25 is forced on, two methods need it); run: RunConfig sections
    shared by all runs; method_overrides: extra dotted overrides per method; static_mix: {weights};
    eval: EvalSettings keys plus `extra`. prepare, run, static_mix and eval stay raw mappings (they
    are passed on as written, and fingerprint the runs); their keys are checked here."""

    SECTION = "compare"
    MAPPINGS: ClassVar[tuple[str, ...]] = ("prepare", "run", "method_overrides", "static_mix", "eval")

    out_dir: str = text(non_empty=True, hint="the folder for the data, runs and results")
    prepare: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = texts(default_factory=lambda: list(PRESETS), non_empty=True, split_commas=True)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    static_mix: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    data_seed: int = integer(0, minimum=0)

    def check(self) -> None:
        for name in self.MAPPINGS:
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError(f"{name} must be a mapping, got {getattr(self, name)!r}")
        if isinstance(self.selection, Mapping):
            self.selection = SelectionConfig.from_dict(self.selection)
        for name in ("methods", "method_overrides"):
            for m in getattr(self, name):
                if m not in PRESETS:
                    raise ConfigError(f"{name} names unknown method {m!r}{suggest(m, PRESETS)}; "
                                      f"known: {', '.join(PRESETS)}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds) \
                or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds} must be non-empty, distinct integers")
        check_keys(StaticMixConfig, self.static_mix, "static_mix")
        if "static-mix" in self.methods and not self.static_mix.get("weights"):
            raise ConfigError("method static-mix needs static_mix.weights: {domain: weight, ...}")
        for key in ("run_dir", "seed"):
            if key in (self.run.get("train") or {}):
                raise ConfigError(f"run.train.{key} is set per run by compare; remove it")
        if (self.run.get("data") or {}).get("data_dir"):
            raise ConfigError("run.data.data_dir is set per run by compare; remove it")
        check_keys(_prepare_class(), self.prepare, "prepare")
        CompareEvalConfig.from_dict(self.eval)  # validates now, not after training

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


def _prepare_class() -> type:
    from adapt_pretrain.data.config import PrepareConfig

    return PrepareConfig


def override_sections() -> dict[str, type]:
    """The sections a dotted override may name (section -> the class whose fields are its keys)."""
    from adapt_pretrain.config import RunConfig

    return {"prepare": _prepare_class(), "run": RunConfig, "selection": SelectionConfig,
            "static_mix": StaticMixConfig, "eval": CompareEvalConfig}


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
        raise ConfigError(f"prepare.inputs is not set (the corpus is a required input): {CORPUS_HINT}")
    return [os.path.abspath(str(p)) for p in inputs]


def load_compare_config(path: str, methods: Optional[list[str]] = None, seeds: Optional[list[int]] = None,
                        out_dir: Optional[str] = None, corpus: Optional[list[str]] = None,
                        overrides: tuple[str, ...] = ()) -> CompareConfig:
    """Read, override (`--corpus`, dotted `section.key=value`, methods, seeds, out_dir) and validate a config."""
    raw = read_config_file(path, deepspeed_keys=False)
    check_keys(CompareConfig, raw, CompareConfig.SECTION, f"{path}: ")
    raw = apply_overrides(raw, list(overrides), override_sections())
    if methods:
        raw["methods"] = methods
    if seeds:
        raw["seeds"] = seeds
    if out_dir:
        raw["out_dir"] = out_dir
    for key in ("out_dir", "prepare", "run"):
        if raw.get(key) is None:
            raise ConfigError(f"{path}: missing required key {key!r}")
    if corpus:
        raw["prepare"]["inputs"] = list(corpus)
    # runs are launched as subprocesses: no cwd surprises
    raw["prepare"]["inputs"] = resolve_inputs(raw["prepare"].get("inputs"))
    raw["out_dir"] = os.path.abspath(str(raw["out_dir"]))
    if (raw.get("eval") or {}).get("extra"):
        raw["eval"]["extra"] = [os.path.abspath(str(p)) for p in raw["eval"]["extra"]]
    return CompareConfig.from_dict(raw)


def tokens_per_step(config: Mapping[str, Any]) -> tuple[int, int]:
    """(steps, training tokens per step) of a raw run config; every run is one process here, so the
    layout's data-parallel size is what the model-parallel dimensions leave of that one rank's world."""
    from adapt_pretrain.config import RunConfig
    from adapt_pretrain.layout import Layout

    rc = RunConfig.from_dict(dict(config))
    layout = Layout.plan(rc.parallel, rc.train, rc.parallel.tensor * rc.parallel.pipeline)
    return rc.train.steps, layout.global_batch_size * rc.model.seq_len


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
