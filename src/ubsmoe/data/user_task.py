"""Your own classification or regression data as a task: any CSV, JSON(L) or Parquet files.

``data.custom`` names the files and columns (see ``configs/data/user_example.yaml``). The
files are read once, checked (columns present, labels known), written as Parquet in the
GLUE layout under the cache directory, and registered as a task, so partitioning,
tokenization, metrics, every method and the metrics files work as they do for GLUE.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ubsmoe.data.glue import LABEL_COLUMN, TASKS, GlueTask
from ubsmoe.errors import ConfigError

READERS = {".csv": pd.read_csv, ".tsv": lambda p: pd.read_csv(p, sep="\t"), ".json": pd.read_json,
           ".jsonl": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}  # fmt: skip
METRICS = ("accuracy", "f1", "matthews", "pearson")
SPLITS = ("train", "validation")
GLUE_NAMES = frozenset(TASKS)  # the built-in tasks, before any user task is registered


def _read(path: str, key: str) -> pd.DataFrame:
    file = Path(path)
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise ConfigError(key, path, f"a file ending in one of {', '.join(READERS)}")
    if not file.is_file():
        raise ConfigError(key, path, "an existing file")
    try:
        return reader(file)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(key, path, f"a readable {file.suffix} file ({err})") from err


def user_task(name: str, custom: dict[str, Any]) -> GlueTask:
    """The task ``custom`` describes (checked), registered under ``name``."""
    allowed = {"train", "validation", "text_columns", "label_column", "label_names", "metric"}
    unknown = sorted(set(custom) - allowed)
    if unknown:
        raise ConfigError(f"data.custom.{unknown[0]}", custom[unknown[0]], f"a key among {sorted(allowed)}")
    for key in ("train", "validation", "text_columns", "label_names"):
        if not custom.get(key) and key != "label_names":
            raise ConfigError(f"data.custom.{key}", custom.get(key), "a value (see configs/data/user_example.yaml)")
    columns = list(custom["text_columns"])
    if not 1 <= len(columns) <= 2:
        raise ConfigError("data.custom.text_columns", columns, "one or two column names")
    labels = list(custom.get("label_names") or [])
    if len(labels) == 1:
        raise ConfigError("data.custom.label_names", labels, "two or more class names, or empty for regression")
    metric = custom.get("metric") or ("pearson" if not labels else "accuracy")
    if metric not in METRICS or (metric == "pearson") != (not labels):
        allowed_metrics = "pearson (regression)" if not labels else "accuracy, f1 (two classes) or matthews"
        raise ConfigError("data.custom.metric", metric, allowed_metrics)
    if name in GLUE_NAMES:
        raise ConfigError("data.task", name, "a name for your own data that is not a GLUE task's (data.custom is set)")
    task = GlueTask(name, tuple(columns), max(len(labels), 1), tuple(labels), ("validation",), metric)
    TASKS[name] = task
    return task


def prepare_user_data(name: str, custom: dict[str, Any], cache_dir: str | Path) -> tuple[GlueTask, str]:
    """Check and convert the user's files; return the task and the GLUE-layout directory that holds them."""
    task = user_task(name, custom)
    label_column = custom.get("label_column") or LABEL_COLUMN
    identity = json.dumps({"custom": custom, "mtimes": [Path(custom[s]).stat().st_mtime_ns if Path(custom[s]).is_file()
                                                        else None for s in SPLITS]}, sort_keys=True, default=str)
    root = Path(cache_dir) / "user_data" / hashlib.sha256(identity.encode()).hexdigest()[:16]
    for split in SPLITS:
        key = f"data.custom.{split}"
        frame = _read(str(custom[split]), key)
        missing = [c for c in (*task.text_fields, label_column) if c not in frame.columns]
        if missing:
            raise ConfigError(key, custom[split], f"a table with the columns {missing} (it has {list(frame.columns)})")
        frame = frame[[*task.text_fields, label_column]].rename(columns={label_column: LABEL_COLUMN})
        for column in task.text_fields:
            frame[column] = frame[column].astype(str)
        if task.is_regression:
            frame[LABEL_COLUMN] = pd.to_numeric(frame[LABEL_COLUMN], errors="raise").astype("float32")
        else:
            names = list(task.label_names)
            as_ids = frame[LABEL_COLUMN].map(lambda v, names=names: names.index(v) if v in names else v)
            bad = [v for v in as_ids if not (isinstance(v, int) or hasattr(v, "__index__")) or not 0 <= int(v) < len(names)]
            if bad:
                raise ConfigError(key, custom[split], f"labels among {names} (or their ids 0..{len(names) - 1}); "
                                                      f"found {sorted(set(map(str, bad)))[:5]}")  # fmt: skip
            frame[LABEL_COLUMN] = as_ids.astype("int64")
        (root / name).mkdir(parents=True, exist_ok=True)
        frame.reset_index(drop=True).to_parquet(root / name / f"{split}.parquet")
    return task, str(root)
