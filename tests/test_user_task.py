"""Your own CSV as a task: it trains through the smoke path, and bad files get one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import PROJECT_ROOT, run_train_cli

from ubsmoe.data.glue import TASKS
from ubsmoe.data.user_task import prepare_user_data
from ubsmoe.errors import ConfigError


def _write_reviews(folder: Path) -> tuple[Path, Path]:
    """A small review CSV (sentences of the carried SST-2, string labels, other column names)."""
    frame = pd.read_parquet(PROJECT_ROOT / "data" / "glue" / "sst2" / "train.parquet").head(200)
    frame = pd.DataFrame({"review": frame["sentence"], "sentiment": frame["label"].map({0: "neg", 1: "pos"})})
    folder.mkdir(parents=True, exist_ok=True)
    frame.iloc[:160].to_csv(folder / "train.csv", index=False)
    frame.iloc[160:].to_csv(folder / "validation.csv", index=False)
    return folder / "train.csv", folder / "validation.csv"


def _custom(files: tuple[Path, Path], **changes) -> dict:
    train, validation = files
    return {"train": str(train), "validation": str(validation), "text_columns": ["review"],
            "label_column": "sentiment", "label_names": ["neg", "pos"], "metric": "accuracy", **changes}  # fmt: skip


@pytest.mark.slow
def test_a_user_csv_trains_through_the_smoke_path(tmp_path: Path) -> None:
    train, validation = _write_reviews(tmp_path / "files")
    out = tmp_path / "run"
    proc = run_train_cli(
        "experiment=smoke", "data=user_example", "data.task=reviews", f"data.custom.train={train}",
        f"data.custom.validation={validation}", "data.custom.text_columns=[review]",
        "data.custom.label_column=sentiment", "data.custom.label_names=[neg,pos]", f"paths.output_dir={out}",
        f"paths.cache_dir={tmp_path / 'cache'}", glue_dir=PROJECT_ROOT / "data" / "glue",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"reviews"}
    final = [r for r in records if r["round"] == 2]
    assert len(final) == 4 and all(0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in final)


def test_user_files_are_converted_with_label_names_mapped(tmp_path: Path) -> None:
    task, root = prepare_user_data("reviews_conv", _custom(_write_reviews(tmp_path / "files")), tmp_path / "cache")
    converted = pd.read_parquet(Path(root) / "reviews_conv" / "train.parquet")
    assert list(converted.columns) == ["review", "label"] and set(converted["label"]) == {0, 1}
    assert task.label_names == ("neg", "pos") and TASKS["reviews_conv"] is task


@pytest.mark.parametrize(
    ("changes", "key", "needle"),
    [
        ({"text_columns": ["body"]}, "data.custom.train", "columns ['body']"),
        ({"label_names": ["bad", "good"]}, "data.custom.train", "labels among ['bad', 'good']"),
        ({"metric": "pearson"}, "data.custom.metric", "accuracy"),
        ({"train": "/no/such/file.csv"}, "data.custom.train", "an existing file"),
        ({"train": "/tmp/file.xlsx"}, "data.custom.train", "a file ending in"),
        ({"colour": "red"}, "data.custom.colour", "a key among"),
    ],
)
def test_bad_user_data_is_one_clear_error(tmp_path: Path, changes: dict, key: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        prepare_user_data("reviews_bad", _custom(_write_reviews(tmp_path / "files"), **changes), tmp_path / "cache")
    assert err.value.key == key and needle in str(err.value)


def test_a_glue_name_is_refused_for_user_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a GLUE task"):
        prepare_user_data("sst2", _custom(_write_reviews(tmp_path / "files")), tmp_path / "cache")
