"""The GLUE tasks: what each one reads, predicts and is scored by; loading and tokenization.

Everything task-specific lives in one :class:`GlueTask` record, so the model, the
partitioner and the evaluation never branch on task names. Loading reads the local
Parquet copy (``data.local_dir`` or ``$GLUE_DIR``) when there is one and the Hugging Face
hub otherwise; both sources are checked for the columns the task needs, so a wrong file
fails with a message instead of a ``KeyError`` deep inside tokenization. Tokenized splits
are cached on disk, keyed by everything that changes their content, because tokenizing
SST-2 costs seconds on every run while reading the cache costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import torch
import torchmetrics
from torchmetrics import classification, regression

from ubsmoe.errors import ConfigError

HUB_DATASET = "nyu-mll/glue"
GLUE_DIR_ENV = "GLUE_DIR"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
LABEL_COLUMN = "label"
# Bump when the tokenized layout changes, so stale caches are not read back.
_TOKENIZED_FORMAT_VERSION = 1


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its input columns, its labels, its evaluation splits and metric."""

    name: str
    text_fields: tuple[str, ...]
    num_labels: int
    label_names: tuple[str, ...]
    eval_splits: tuple[str, ...]
    main_metric: str

    @property
    def is_regression(self) -> bool:
        """STS-B predicts a similarity score, every other task a class."""
        return self.num_labels == 1

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns a data file must have for this task."""
        return (*self.text_fields, LABEL_COLUMN)


_PAIR = ("sentence1", "sentence2")
_VALIDATION = ("validation",)

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), 2, ("unacceptable", "acceptable"), _VALIDATION, "matthews"),
        GlueTask("sst2", ("sentence",), 2, ("negative", "positive"), _VALIDATION, "accuracy"),
        GlueTask("mrpc", _PAIR, 2, ("not_equivalent", "equivalent"), _VALIDATION, "f1"),
        GlueTask("qqp", ("question1", "question2"), 2, ("not_duplicate", "duplicate"), _VALIDATION, "f1"),
        GlueTask("stsb", _PAIR, 1, (), _VALIDATION, "pearson"),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            3,
            ("entailment", "neutral", "contradiction"),
            ("validation_matched", "validation_mismatched"),
            "accuracy",
        ),
        GlueTask("qnli", ("question", "sentence"), 2, ("entailment", "not_entailment"), _VALIDATION, "accuracy"),
        GlueTask("rte", _PAIR, 2, ("entailment", "not_entailment"), _VALIDATION, "accuracy"),
        GlueTask("wnli", _PAIR, 2, ("not_entailment", "entailment"), _VALIDATION, "accuracy"),
    )
}


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (case-insensitive), or a ConfigError listing the known ones."""
    task = TASKS.get(str(name).strip().lower())
    if task is None:
        raise ConfigError("data.task", name, "one of " + ", ".join(TASKS))
    return task


# --------------------------------------------------------------------------- metrics


def build_metrics(task: GlueTask) -> torchmetrics.MetricCollection:
    """The task's GLUE metrics, keyed by short names ("accuracy", "f1", "matthews", ...).

    ``update(preds, target)`` takes predicted class ids for classification and float
    predictions for STS-B: use :func:`predictions_from_logits` to get them.
    """
    if task.is_regression:
        with warnings.catch_warnings():
            # Spearman keeps every prediction to rank them; at GLUE's 1,500 STS-B validation
            # pairs that is a few kilobytes, so torchmetrics' memory warning is only noise.
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
            metrics: dict[str, torchmetrics.Metric] = {
                "pearson": regression.PearsonCorrCoef(),
                "spearman": regression.SpearmanCorrCoef(),
            }
    elif task.num_labels == 2:
        metrics = {"accuracy": classification.BinaryAccuracy()}
        if task.name == "cola":
            metrics = {"matthews": classification.BinaryMatthewsCorrCoef()}
        elif task.name in ("mrpc", "qqp"):
            metrics["f1"] = classification.BinaryF1Score()
    else:
        # micro averaging: plain accuracy, not torchmetrics' default per-class mean
        metrics = {"accuracy": classification.MulticlassAccuracy(num_classes=task.num_labels, average="micro")}
    return torchmetrics.MetricCollection(metrics, compute_groups=False)


def predictions_from_logits(task: GlueTask, logits: torch.Tensor) -> torch.Tensor:
    """What the metrics take: argmax class ids, or the single regression output as floats."""
    if task.is_regression:
        return logits.squeeze(-1).float()
    return logits.argmax(dim=-1)


# --------------------------------------------------------------------------- loading


CARRIED_TASKS = ("cola", "sst2", "mrpc", "rte", "stsb")  # the GLUE tasks in the repository's data/glue


def hub_offline() -> bool:
    """True when the user (or the test suite) switched the Hugging Face hub off."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENV)


def require_hub(what: str, *, key: str, how: str) -> None:
    """Fail at once, with the way out, when ``what`` must come from the hub and the hub is off or unreachable.

    Without this check datasets retries for about half a minute before its own error.
    """
    if hub_offline():
        raise ConfigError(key, None, f"{how}; {what} would load from the hub, which is switched off ({'/'.join(OFFLINE_ENV)})")
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as err:
        raise ConfigError(key, None, f"{how}; {what} would load from the hub, which is unreachable ({err})") from err


def carried_data_dir(name: str) -> Path | None:
    """The copy of a data set the repository carries: ``<repo>/data/<name>`` in a checkout,
    the copy bundled into an installed wheel (``ubsmoe/bundled_data/<name>``) otherwise."""
    package = Path(__file__).resolve().parents[1]
    for path in (package.parents[1] / "data" / name, package / "bundled_data" / name):
        if (path / "SHA256SUMS.json").is_file():
            return path
    return None


def resolve_local_dir(value: str | None, task: str | None = None) -> str | None:
    """The local GLUE directory to read.

    ``value`` if given, else ``$GLUE_DIR``, else the repository's carried copy
    (``data/glue``) when it holds ``task`` (or when no task is named), else None: the hub.
    """
    if value:
        return str(value)
    env = os.environ.get(GLUE_DIR_ENV, "")
    if env:
        return env
    carried = carried_data_dir("glue")
    if carried is not None and (task is None or (carried / task).is_dir()):
        return str(carried)
    return None


def local_split_path(local_dir: str | Path, task: GlueTask, split: str) -> Path:
    """Where the local copy keeps ``split`` of ``task``."""
    return Path(local_dir) / task.name / f"{split}.parquet"


def _splits_present(task_dir: Path) -> list[str]:
    return sorted(p.stem for p in task_dir.glob("*.parquet")) if task_dir.is_dir() else []


def check_local_files(task: GlueTask, local_dir: str | Path, splits: Sequence[str]) -> dict[str, int]:
    """Check that every split file exists and has the task's columns; return its row count.

    Reads only Parquet footers, so it is cheap enough to run before any real work.
    """
    task_dir = Path(local_dir) / task.name
    rows: dict[str, int] = {}
    for split in splits:
        path = local_split_path(local_dir, task, split)
        if not path.is_file():
            present = _splits_present(task_dir)
            where = f"splits present there: {', '.join(present)}" if present else f"{task_dir} has no split files"
            raise ConfigError(
                "data.local_dir",
                str(local_dir),
                f"a directory holding <task>/<split>.parquet; missing {path} ({where}); "
                f"unset data.local_dir and {GLUE_DIR_ENV} to load {task.name} from the hub",
            )
        metadata = pq.read_metadata(path)
        _check_columns(task, metadata.schema.names, source=str(path), key="data.local_dir", value=str(local_dir))
        rows[split] = metadata.num_rows
    return rows


def _check_columns(task: GlueTask, names: Sequence[str], *, source: str, key: str, value: Any) -> None:
    missing = [c for c in task.columns if c not in names]
    if missing:
        raise ConfigError(
            key,
            value,
            f"{source} lacks column(s) {missing} needed by task {task.name}; "
            f"expected {list(task.columns)}, found {list(names)}",
        )


def load_glue(task: GlueTask, local_dir: str | None, splits: Sequence[str]) -> datasets.DatasetDict:
    """The requested splits of ``task``, from ``<local_dir>/<task>/<split>.parquet`` or the hub.

    Pass ``local_dir`` through :func:`resolve_local_dir` first; None means the hub.
    """
    splits = list(dict.fromkeys(splits))
    if local_dir:
        check_local_files(task, local_dir, splits)
        files = {split: str(local_split_path(local_dir, task, split)) for split in splits}
        loaded = datasets.load_dataset("parquet", data_files=files)
        source_of = files
    else:
        require_hub(f"{HUB_DATASET}/{task.name}", key="data.local_dir",
                    how=f"a directory with {task.name}/<split>.parquet (data.local_dir=DIR or GLUE_DIR); "
                        f"the repository carries {', '.join(CARRIED_TASKS)} in data/glue")  # fmt: skip
        try:
            everything = datasets.load_dataset(HUB_DATASET, task.name)
        except ConnectionError as err:
            raise ConfigError(
                "data.local_dir",
                None,
                f"a local GLUE directory (data.local_dir=DIR or the GLUE_DIR environment variable) when "
                f"the hub cannot be reached ({HUB_DATASET}: {err})",
            ) from err
        unknown = [s for s in splits if s not in everything]
        if unknown:
            raise ConfigError(
                "data.task", task.name, f"{HUB_DATASET}/{task.name} has splits {list(everything)}, not {unknown}"
            )
        loaded = datasets.DatasetDict({split: everything[split] for split in splits})
        source_of = {split: f"{HUB_DATASET}/{task.name}[{split}]" for split in splits}
    key, value = ("data.local_dir", local_dir) if local_dir else ("data.task", task.name)
    for split in splits:
        _check_columns(task, loaded[split].column_names, source=source_of[split], key=key, value=value)
    return loaded


# --------------------------------------------------------------------------- tokenization


def tokenized_cache_path(
    ds: datasets.Dataset, task: GlueTask, tokenizer: Any, max_length: int, cache_dir: str | Path, cache_key: str
) -> Path:
    """The cache directory for this exact (data, task, tokenizer, max_length) combination.

    ``cache_key`` is the caller's name for the data (usually the split); the data itself is
    identified by the dataset fingerprint, which datasets derives from the source files
    (path and modification time) and every transform applied since (e.g. a subsample).
    """
    identity = {
        "version": _TOKENIZED_FORMAT_VERSION,
        "task": task.name,
        "split": str(ds.split) if ds.split is not None else None,
        "cache_key": cache_key,
        "tokenizer": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        "max_length": int(max_length),
        "fingerprint": ds._fingerprint,
        "num_rows": ds.num_rows,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    safe_key = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cache_key)
    return Path(cache_dir) / f"{task.name}-{safe_key}-{digest}"


def tokenize_split(
    ds: datasets.Dataset,
    task: GlueTask,
    tokenizer: Any,
    max_length: int,
    cache_dir: str | Path,
    cache_key: str,
) -> datasets.Dataset:
    """Tokenize ``ds`` (truncated, unpadded) into model inputs plus ``labels``, cached on disk.

    Padding is left to ``DataCollatorWithPadding`` so each batch pads only to its own longest
    example. Labels become int64 for classification and float32 for STS-B.
    """
    path = tokenized_cache_path(ds, task, tokenizer, max_length, cache_dir, cache_key)
    if path.is_dir():
        return datasets.load_from_disk(str(path))

    fields = task.text_fields
    label_dtype = "float32" if task.is_regression else "int64"

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[field] for field in fields]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        out = {name: encoded[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in encoded}
        out["labels"] = batch[LABEL_COLUMN]
        return out

    tokenized = ds.map(
        encode,
        batched=True,
        remove_columns=ds.column_names,
        keep_in_memory=True,
        new_fingerprint=path.name,
        desc=f"tokenizing {task.name}/{cache_key}",
    )
    tokenized = tokenized.cast_column("labels", datasets.Value(label_dtype))
    _save_atomically(tokenized, path)
    return datasets.load_from_disk(str(path))


def _save_atomically(ds: datasets.Dataset, path: Path) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        ds.save_to_disk(str(tmp))
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():  # another process did not win the race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
