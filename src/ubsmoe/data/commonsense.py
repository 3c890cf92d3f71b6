"""Commonsense QA in the LLM-Adapters format: the eight benchmarks, loading, checks, source labels.

Every record is ``{"instruction", "input", "output", "answer"}`` (``data/commonsense/README.md``).
Three sources:

- the carried copy ``data/commonsense/<benchmark>/{train,test}.json`` (or any directory laid out
  the same way, ``data.local_dir``), checked against ``SHA256SUMS.json`` by the tests;
- a training mixture named by ``data.train_source``: a JSON file path or ``http(s)://`` URL
  (e.g. LLM-Adapters' ``ft-training_set/commonsense_15k.json``, the UB-SMoE paper's
  Commonsense-15K, or ``commonsense_170k.json``), or a Hugging Face dataset id whose ``train``
  split has the same fields;
- per-benchmark test files that the carried copy lacks (hellaswag), from ``data.hub_test_files``
  (a path, URL or dataset id per benchmark).

A file that is missing, is not a JSON list, or holds a record without a non-empty string
``instruction`` or ``answer`` raises one :class:`~ubsmoe.errors.ConfigError` naming the config
key, the file and the record index, before any tokenizer or model is loaded.

The training mixture does not say which benchmark a record came from, so the partitioner's
"source" label is read from the instruction's fixed LLM-Adapters phrasing (:func:`infer_source`);
records whose phrasing several benchmarks share (ARC, OpenBookQA and Social IQa all say "choose
the correct answer to the question") are grouped by their number of choices, and a record may
carry its own ``source`` field, which wins (the carried train files are tagged with theirs).
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ubsmoe.errors import ConfigError

PROJECT_DATA = Path(__file__).resolve().parents[3] / "data" / "commonsense"
REQUIRED_FIELDS = ("instruction", "answer")
PARTITION_KEYS = ("source", "answer")


@dataclass(frozen=True)
class Benchmark:
    """One commonsense benchmark: its directory name and the answer words its scorer looks for."""

    name: str
    answer_words: tuple[str, ...]

    @property
    def pattern(self) -> re.Pattern[str]:
        """LLM-Adapters' rule: the answer words as one alternation; the first (leftmost) match wins."""
        return re.compile("|".join(re.escape(w) for w in self.answer_words))


def _numbered(stem: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}" for i in range(1, n + 1))


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("boolq", ("true", "false")),
        Benchmark("piqa", _numbered("solution", 2)),
        Benchmark("social_i_qa", _numbered("answer", 3)),
        Benchmark("hellaswag", _numbered("ending", 4)),
        Benchmark("winogrande", _numbered("option", 2)),
        Benchmark("ARC-Easy", _numbered("answer", 5)),
        Benchmark("ARC-Challenge", _numbered("answer", 5)),
        Benchmark("openbookqa", _numbered("answer", 4)),
    )
}

# Source labels of mixture records, from LLM-Adapters' instruction phrasing (checked in order).
_SOURCE_RULES: tuple[tuple[str, str], ...] = (
    ("boolq", "Please answer the following question with true or false"),
    ("piqa", "Please choose the correct solution to the question"),
    ("hellaswag", "Please choose the correct ending to complete the given sentence"),
    ("winogrande", "Please choose the correct answer to fill in the blank"),
)
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([\w/]+)")


def get_benchmark(name: str, key: str = "data.eval_benchmarks") -> Benchmark:
    if name not in BENCHMARKS:
        raise ConfigError(key, name, f"benchmarks among {list(BENCHMARKS)}")
    return BENCHMARKS[name]


def carried_dir() -> Path:
    """The commonsense copy the repository carries."""
    return PROJECT_DATA


def resolve_local_dir(value: str | None) -> Path:
    """``data.local_dir``: null = the carried copy."""
    return Path(value) if value else carried_dir()


def check_records(records: Any, *, key: str, origin: str) -> list[dict[str, Any]]:
    """The records of one file, checked: a JSON list of mappings with non-empty ``instruction``/``answer``."""
    if not isinstance(records, list):
        raise ConfigError(key, origin, f"a JSON list of records (found a {type(records).__name__})")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ConfigError(key, f"{origin} record {index}", "a JSON object with 'instruction' and 'answer'")
        for name in REQUIRED_FIELDS:
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(
                    key, f"{origin} record {index}", f"a non-empty string field '{name}' in every record"
                )
        if not isinstance(record.get("input", ""), str):
            raise ConfigError(key, f"{origin} record {index}", "'input' a string when present")
    return records


def read_json_file(path: str | Path, *, key: str) -> list[dict[str, Any]]:
    """Read and check one local JSON list."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key, str(path), "an existing JSON file in the LLM-Adapters format")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(key, str(path), f"a JSON list of records (not valid JSON: {err})") from err
    return check_records(records, key=key, origin=str(path))


def load_local(local_dir: str | Path, benchmark: str, split: str, *, key: str = "data.local_dir") -> list[dict[str, Any]]:
    """``<local_dir>/<benchmark>/<split>.json``, checked."""
    return read_json_file(Path(local_dir) / benchmark / f"{split}.json", key=key)


def load_source(source: str, *, key: str, split: str = "train") -> list[dict[str, Any]]:
    """Records from a local JSON path, an ``http(s)://`` JSON URL, or a hub dataset id (its ``split``).

    Only this function reaches a network, and only for a URL or a dataset id the user configured.
    """
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=120) as response:  # noqa: S310 (user-configured URL)
                records = json.loads(response.read().decode("utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(key, source, f"a reachable URL of a JSON list of records ({err})") from err
        return check_records(records, key=key, origin=source)
    if source.endswith(".json") or Path(source).exists():
        return read_json_file(source, key=key)
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # the hub raises many kinds; all mean "cannot read this source"
        raise ConfigError(key, source, f"a JSON path, a URL or a reachable hub dataset id ({err})") from err
    return check_records([dict(r) for r in dataset], key=key, origin=f"{source}[{split}]")


def infer_source(record: dict[str, Any]) -> str:
    """The benchmark a mixture record came from (its ``source`` field, else its phrasing)."""
    if isinstance(record.get("source"), str) and record["source"]:
        return record["source"]
    text = record["instruction"]
    for name, phrase in _SOURCE_RULES:
        if phrase in text:
            return name
    match = _ANSWER_FORMAT.search(text)
    choices = len(match.group(1).split("/")) if match else 0
    # ARC, OpenBookQA and Social IQa share the phrasing and cannot be told apart reliably: they
    # form groups by their number of choices (Social IQa: 3; OpenBookQA: 4; ARC: 3 to 5).
    return f"multiple-choice/{choices}" if choices else "other"


def partition_labels(records: Sequence[dict[str, Any]], by: str) -> tuple[list[int], list[str]]:
    """Integer label per record for the Dirichlet partitioner: its source benchmark or its answer word."""
    if by not in PARTITION_KEYS:
        raise ConfigError("data.partition_by", by, f"one of {list(PARTITION_KEYS)}")
    keys = [infer_source(r) if by == "source" else r["answer"].strip() for r in records]
    names = sorted(set(keys))
    index = {name: i for i, name in enumerate(names)}
    return [index[k] for k in keys], names


def load_train_mixture(
    *, source: str, local_dir: str | None, benchmarks: Sequence[str]
) -> list[dict[str, Any]]:
    """The training records: ``local`` = the train files of ``benchmarks`` (tagged with their source),
    anything else = one mixture file / URL / hub dataset (``data.train_source``)."""
    if source == "local":
        base = resolve_local_dir(local_dir)
        records: list[dict[str, Any]] = []
        for name in benchmarks:
            get_benchmark(name, "data.train_benchmarks")
            records += [{**r, "source": name} for r in load_local(base, name, "train", key="data.local_dir")]
        return records
    return load_source(source, key="data.train_source", split="train")


def load_eval_sets(
    *, benchmarks: Sequence[str], local_dir: str | None, hub_test_files: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """Test records per benchmark: the local file when present, else ``data.hub_test_files[<benchmark>]``."""
    base = resolve_local_dir(local_dir)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in benchmarks:
        get_benchmark(name)
        path = base / name / "test.json"
        if path.is_file():
            out[name] = read_json_file(path, key="data.local_dir")
        elif name in hub_test_files:
            out[name] = load_source(hub_test_files[name], key=f"data.hub_test_files.{name}", split="test")
        else:
            raise ConfigError(
                "data.eval_benchmarks", name,
                f"a benchmark with {path} present or a source in data.hub_test_files (has {sorted(hub_test_files)})",
            )  # fmt: skip
    return out
