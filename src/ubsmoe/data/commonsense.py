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

import hashlib
import json
import re
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ubsmoe.data.datamodule import ClientDataModule, FederatedData
from ubsmoe.data.instruction_format import collate_left, collate_right, encode_train, pad_id_of, prompt_ids
from ubsmoe.data.specs import LoaderSpec, PartitionSpec
from ubsmoe.errors import ConfigError
from ubsmoe.names import PARTITION_BY
from ubsmoe.seeding import derive_seed

PROJECT_DATA = Path(__file__).resolve().parents[3] / "data" / "commonsense"
REQUIRED_FIELDS = ("instruction", "answer")


@dataclass(frozen=True)
class Benchmark:
    """One commonsense benchmark: its directory name, its answer words and the words its scorer looks for.

    ``matched_words`` (empty: the answer words) is what LLM-Adapters' ``commonsense_evaluate.py``
    searches a generation for: answer1 to answer5 for social_i_qa, ARC and openbookqa, whatever
    their number of choices, so an answer4 on social_i_qa is a wrong answer, not a miss.
    """

    name: str
    answer_words: tuple[str, ...]
    matched_words: tuple[str, ...] = ()

    @property
    def pattern(self) -> re.Pattern[str]:
        """LLM-Adapters' rule: the matched words as one alternation; the first (leftmost) match wins."""
        return re.compile("|".join(re.escape(w) for w in self.matched_words or self.answer_words))


def _numbered(stem: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}" for i in range(1, n + 1))


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("boolq", ("true", "false")),
        Benchmark("piqa", _numbered("solution", 2)),
        Benchmark("social_i_qa", _numbered("answer", 3), _numbered("answer", 5)),
        Benchmark("hellaswag", _numbered("ending", 4)),
        Benchmark("winogrande", _numbered("option", 2)),
        Benchmark("ARC-Easy", _numbered("answer", 5)),
        Benchmark("ARC-Challenge", _numbered("answer", 5)),
        Benchmark("openbookqa", _numbered("answer", 4), _numbered("answer", 5)),
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


def load_local(
    local_dir: str | Path, benchmark: str, split: str, *, key: str = "data.local_dir"
) -> list[dict[str, Any]]:
    """``<local_dir>/<benchmark>/<split>.json``, checked."""
    return read_json_file(Path(local_dir) / benchmark / f"{split}.json", key=key)


def _download(url: str, key: str, cache_dir: str | None) -> bytes:
    """The bytes at ``url``; kept in ``<cache_dir>/commonsense/<sha256 of the URL>.json`` when a cache is given."""
    cached = None
    if cache_dir:
        cached = Path(cache_dir) / "commonsense" / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.json"
        if cached.is_file():
            return cached.read_bytes()
    try:
        with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 (a user-configured URL)
            payload = response.read()
    except OSError as err:
        raise ConfigError(key, url, f"a reachable URL of a JSON list of records ({err})") from err
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".part")
        tmp.write_bytes(payload)
        tmp.replace(cached)  # atomic: a crashed download never leaves a half file behind
    return payload


def load_source(source: str, *, key: str, split: str = "train", cache_dir: str | None = None) -> list[dict[str, Any]]:
    """Records from a local JSON path, an ``http(s)://`` JSON URL, or a hub dataset id (its ``split``).

    Only this function reaches a network, and only for a URL or a dataset id the user configured.
    A URL's file is kept in ``cache_dir`` (``paths.cache_dir``), so sweeps download it once.
    """
    if source.startswith(("http://", "https://")):
        try:
            records = json.loads(_download(source, key, cache_dir).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(key, source, f"a URL of a JSON list of records (not valid JSON: {err})") from err
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
    if by not in PARTITION_BY:
        raise ConfigError("data.partition_by", by, f"one of {list(PARTITION_BY)}")
    keys = [infer_source(r) if by == "source" else r["answer"].strip() for r in records]
    names = sorted(set(keys))
    index = {name: i for i, name in enumerate(names)}
    return [index[k] for k in keys], names


def load_train_mixture(
    *, source: str, local_dir: str | None, benchmarks: Sequence[str], cache_dir: str | None = None
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
    return load_source(source, key="data.train_source", split="train", cache_dir=cache_dir)


def load_eval_sets(
    *, benchmarks: Sequence[str], local_dir: str | None, hub_test_files: dict[str, str], cache_dir: str | None = None
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
            out[name] = load_source(
                hub_test_files[name], key=f"data.hub_test_files.{name}", split="test", cache_dir=cache_dir
            )
        else:
            raise ConfigError(
                "data.eval_benchmarks", name,
                f"a benchmark with {path} present or a source in data.hub_test_files (has {sorted(hub_test_files)})",
            )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- federated data
@dataclass(frozen=True)
class CommonsenseSpec:
    """``FederatedData.task`` of a commonsense run (a :class:`~ubsmoe.data.datamodule.TaskSummary`)."""

    name: str = "commonsense"
    main_metric: str = "mean_acc"
    is_regression: bool = False


def answer_index(record: dict[str, Any], benchmark: Benchmark, *, key: str, origin: str, index: int) -> int:
    """Position of the record's ``answer`` among the benchmark's answer words (checked)."""
    answer = record["answer"].strip()
    if answer not in benchmark.answer_words:
        raise ConfigError(
            key, f"{origin} record {index}", f"'answer' one of {list(benchmark.answer_words)} (got {answer!r})"
        )
    return benchmark.answer_words.index(answer)


def build_commonsense_data(
    *,
    tokenizer: Any,
    local_dir: str | None,
    train_source: str,
    train_benchmarks: Sequence[str],
    eval_benchmarks: Sequence[str],
    hub_test_files: dict[str, str],
    partition_by: str,
    max_length: int,
    partition: PartitionSpec,
    loader: LoaderSpec,
    prompt_template: str = "alpaca",
    train_on_inputs: bool = False,
) -> FederatedData:
    """Load, check, subsample, partition and tokenize the commonsense data for ``partition.num_clients`` clients.

    The training mixture is partitioned with the Dirichlet (or iid) partitioner over each
    record's source benchmark (``partition_by: source``) or answer word (``answer``); the
    evaluation sets are one left-padded loader per benchmark, in ``eval_benchmarks`` order.
    ``prompt_template`` and ``train_on_inputs`` (``data.prompt_template``, ``data.train_on_inputs``)
    choose the prompt text and which tokens have a loss (:func:`~ubsmoe.data.instruction_format.encode_train`).
    Randomness: the subsample, the partition and the batch order each use their own stream
    derived from ``partition.seed``, as for GLUE.
    """
    import datasets

    benchmarks = [get_benchmark(name) for name in eval_benchmarks]
    records = load_train_mixture(
        source=train_source, local_dir=local_dir, benchmarks=train_benchmarks, cache_dir=loader.cache_dir
    )
    eval_sets = load_eval_sets(
        benchmarks=eval_benchmarks, local_dir=local_dir, hub_test_files=hub_test_files, cache_dir=loader.cache_dir
    )
    partition.check(loader.train_rows(len(records)))
    kept = loader.train_subsample(len(records), partition.seed)
    if kept is not None:
        records = [records[i] for i in kept]
    labels, label_names = partition_labels(records, partition_by)
    label_ids = np.asarray(labels, dtype=np.int64)
    parts = partition.split(label_ids)

    pad_id = pad_id_of(tokenizer)
    encoded = [
        encode_train(tokenizer, r, max_length, template=prompt_template, train_on_inputs=train_on_inputs)
        for r in records
    ]
    train = datasets.Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in encoded], "labels": [e["labels"] for e in encoded]}
    )
    collate_train = partial(collate_right, pad_id=pad_id)
    data_seed = derive_seed(partition.seed, "data")
    clients = [
        ClientDataModule(
            client_id, train, indices, collate_fn=collate_train, batch_size=loader.batch_size, data_seed=data_seed,
            label_ids=label_ids, num_classes=len(label_names), length_window=loader.train_length_window,
        )  # fmt: skip
        for client_id, indices in enumerate(parts)
    ]
    eval_loaders = {}
    for bench in benchmarks:
        rows = eval_sets[bench.name]
        if loader.max_eval_examples is not None:
            rows = rows[: loader.max_eval_examples]
        items = [
            {
                "input_ids": prompt_ids(tokenizer, r, max_length, prompt_template),
                "answer_index": answer_index(r, bench, key="data.local_dir", origin=f"{bench.name}/test", index=i),
            }
            for i, r in enumerate(rows)
        ]
        eval_loaders[bench.name] = loader.eval_loader(
            items, [len(item["input_ids"]) for item in items], partial(collate_left, pad_id=pad_id)
        )
    return FederatedData(
        task=CommonsenseSpec(),
        clients=clients,
        eval_loaders=eval_loaders,
        label_counts=np.stack([client.label_counts() for client in clients]),
        label_names=label_names,
    )
