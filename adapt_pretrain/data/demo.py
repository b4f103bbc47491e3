"""The small corpus bundled with the package (public-domain / PSF text, see demo_data/NOTICE).

The demo trainer and the tests use it so they need nothing outside the repository.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_data"
DEMO_DOMAINS = ("kjv_bible", "jargon_file", "fortunes_en", "python_doc", "python_code")


def expand_demo_inputs(inputs: list[str]) -> list[str]:
    """`prepare.inputs` with the entry `demo` replaced by the bundled corpus' files. Done when `prepare`
    runs, not when the config is built, so a config reads no file and stays valid on every machine."""
    from adapt_pretrain.config.derive import DEMO_INPUTS

    return [path for entry in inputs for path in (demo_corpus_paths() if entry == DEMO_INPUTS else [entry])]


def demo_corpus_paths() -> list[str]:
    """Paths of the bundled `DOMAIN.jsonl.gz` files, one per domain, in a fixed order."""
    paths = [DEMO_DIR / f"{d}.jsonl.gz" for d in DEMO_DOMAINS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"demo corpus files missing (package installed without data?): {missing}")
    return [str(p) for p in paths]
