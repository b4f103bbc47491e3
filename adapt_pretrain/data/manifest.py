"""The manifest: what `prepare` wrote (shards, counts per domain, tokenizer, checksums).

The loader trusts it for shard lists, domain names and expected token counts (to balance ranks
in finite mode); `recount` re-reads the shards to check that the counts are true.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator, Optional

import numpy as np

from adapt_pretrain.data.config import MANIFEST, DataError
from adapt_pretrain.data.shardio import ShardFile, iter_raw_samples, read_shard, sha256_file
from adapt_pretrain.data.skips import SkipCounter

FORMAT = "adapt-pretrain-shards/1"


class Manifest:
    """Read-only view of manifest.json with the accessors the loader and trainer need."""

    def __init__(self, data_dir: str, raw: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.raw = raw
        if raw.get("format") != FORMAT:
            raise DataError(f"{os.path.join(data_dir, MANIFEST)}: format {raw.get('format')!r}, expected {FORMAT!r}")

    @classmethod
    def load(cls, data_dir: str) -> "Manifest":
        path = os.path.join(data_dir, MANIFEST)
        try:
            with open(path, "r", encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read manifest {path}: {exc}") from exc
        return cls(data_dir, raw)

    @property
    def domains(self) -> list[str]:
        return list(self.raw["domains"])

    @property
    def vocab_size(self) -> int:
        return int(self.raw["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.raw["tokenizer"]["eos_id"])

    @property
    def token_dtype(self) -> str:
        return str(self.raw["token_dtype"])

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.data_dir, self.raw["tokenizer"]["file"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        if split not in self.raw["splits"]:
            raise DataError(f"manifest has no split {split!r}; it has {sorted(self.raw['splits'])}")
        return list(self.raw["splits"][split]["shards"])

    def anchors(self) -> Optional[dict[str, Any]]:
        return self.raw.get("anchors")

    def domain_index(self) -> dict[str, int]:
        return {d: i for i, d in enumerate(self.domains)}

    def identity(self) -> str:
        """Hash of what determines the data stream (shard list + checksums + tokenizer)."""
        core = {"splits": {s: [(x["name"], x["sha256"], x["tokens"]) for x in v["shards"]]
                           for s, v in self.raw["splits"].items()},
                "tokenizer": self.raw["tokenizer"]["sha256"]}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(data_dir: str, raw: dict[str, Any]) -> str:
    path = os.path.join(data_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def shard_entry(data_dir: str, shard: ShardFile) -> dict[str, Any]:
    """The manifest entry of one finished shard (its `name` is relative to `data_dir`): checksum, size, counts."""
    name = shard.name  # type: ignore[attr-defined]  # set by whoever names the shard in the directory
    path = os.path.join(data_dir, name)
    return {"name": name, "sha256": sha256_file(path), "bytes": os.path.getsize(path), "docs": shard.docs,
            "tokens": shard.tokens, "docs_per_domain": dict(sorted(shard.docs_per_domain.items())),
            "tokens_per_domain": dict(sorted(shard.tokens_per_domain.items()))}


def iter_split_records(data_dir: str, split: str = "train") -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(JSON record, token ids) of every document of a split, in manifest order (strict: damage raises).

    The records as written, extra keys included (bm25, orig_doc_id): what evaluation and derived data
    directories read; the loader reads decoded documents through `read_shard` instead."""
    man = Manifest.load(data_dir)
    dtype = np.dtype(man.token_dtype).newbyteorder("<")
    for shard in man.shards(split):
        with open(os.path.join(data_dir, shard["name"]), "rb") as fh:
            data = fh.read()
        for sample in iter_raw_samples(data, shard["name"], SkipCounter(strict=True)):
            yield json.loads(sample["json"]), np.frombuffer(sample["tokens"], dtype=dtype)


def split_summary(shards: list[dict[str, Any]]) -> dict[str, Any]:
    docs: dict[str, int] = {}
    toks: dict[str, int] = {}
    for s in shards:
        for d, n in s["docs_per_domain"].items():
            docs[d] = docs.get(d, 0) + n
        for d, n in s["tokens_per_domain"].items():
            toks[d] = toks.get(d, 0) + n
    return {"shards": shards, "docs": sum(docs.values()), "tokens": sum(toks.values()),
            "docs_per_domain": dict(sorted(docs.items())), "tokens_per_domain": dict(sorted(toks.items()))}


def recount(data_dir: str) -> dict[str, dict[str, dict[str, int]]]:
    """Docs and tokens per split and domain, counted by reading every shard (strict: any damage raises)."""
    man = Manifest.load(data_dir)
    out: dict[str, dict[str, dict[str, int]]] = {}
    names = man.domains
    for split in man.raw["splits"]:
        docs = {d: 0 for d in names}
        toks = {d: 0 for d in names}
        for sh in man.shards(split):
            for doc in read_shard(os.path.join(data_dir, sh["name"]), sh["name"], SkipCounter(strict=True),
                                  man.token_dtype, man.vocab_size, man.domain_index(), sh["sha256"]):
                docs[names[doc.domain]] += 1
                toks[names[doc.domain]] += int(doc.tokens.size)
        out[split] = {"docs_per_domain": {d: n for d, n in docs.items() if n},
                      "tokens_per_domain": {d: n for d, n in toks.items() if n}}
    return out


def check_counts(data_dir: str) -> list[str]:
    """Differences between the manifest's per-domain counts and a recount (empty list: they match)."""
    man = Manifest.load(data_dir)
    counted = recount(data_dir)
    problems = []
    for split, v in man.raw["splits"].items():
        for what in ("docs_per_domain", "tokens_per_domain"):
            if v[what] != counted[split][what]:
                problems.append(f"{split}.{what}: manifest {v[what]} != recount {counted[split][what]}")
    return problems
