"""The commonsense loader: every carried file with the README's counts, clear errors, source labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import grouped_data_args

from ubsmoe import names
from ubsmoe.backbones.tiny import tiny_tokenizer
from ubsmoe.data.commonsense import (
    BENCHMARKS,
    build_commonsense_data,
    carried_dir,
    infer_source,
    load_eval_sets,
    load_local,
    load_train_mixture,
    partition_labels,
    read_json_file,
)
from ubsmoe.errors import ConfigError

# data/commonsense/README.md
TEST_COUNTS = {
    "boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267,
    "ARC-Easy": 2376, "ARC-Challenge": 1172, "openbookqa": 500,
}  # fmt: skip
TRAIN_COUNTS = {"boolq": 9427, "ARC-Easy": 2251, "ARC-Challenge": 1119, "openbookqa": 4957}


@pytest.mark.parametrize(("name", "split", "count"), [
    *((n, "test", c) for n, c in TEST_COUNTS.items()),
    *((n, "train", c) for n, c in TRAIN_COUNTS.items()),
])  # fmt: skip
def test_every_carried_file_loads_with_the_readme_count(name: str, split: str, count: int) -> None:
    records = load_local(carried_dir(), name, split)
    assert len(records) == count
    words = BENCHMARKS[name].answer_words
    assert all(r["answer"].strip() in words for r in records)  # every answer is one of the scorer's words


def test_benchmark_registry_has_exactly_the_allowed_names() -> None:
    assert set(BENCHMARKS) == set(names.BENCHMARKS)


def test_carried_files_are_all_covered() -> None:
    files = {str(p.relative_to(carried_dir())) for p in carried_dir().glob("*/*.json")}
    expected = {f"{n}/test.json" for n in TEST_COUNTS} | {f"{n}/train.json" for n in TRAIN_COUNTS}
    assert files == expected


def _write(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


GOOD = {"instruction": "q?", "input": "", "output": "the correct answer is true", "answer": "true"}


@pytest.mark.parametrize(("payload", "fragment"), [
    ({"instruction": "q"}, "JSON list"),
    ("[{not json", "not valid JSON"),
    ([GOOD, GOOD, {"instruction": "q", "output": "x"}], "record 2"),
    ([GOOD, {"instruction": "", "answer": "true"}], "record 1"),
    ([GOOD, "a string"], "record 1"),
])  # fmt: skip
def test_bad_file_gives_one_error_naming_file_and_record(tmp_path: Path, payload: object, fragment: str) -> None:
    path = _write(tmp_path / "boolq" / "test.json", payload)
    with pytest.raises(ConfigError) as err:
        read_json_file(path, key="data.local_dir")
    assert err.value.key == "data.local_dir"
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_missing_file_and_missing_benchmark(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="test.json"):
        load_local(tmp_path, "boolq", "test")
    with pytest.raises(ConfigError) as err:
        load_eval_sets(benchmarks=["hellaswag"], local_dir=str(tmp_path), hub_test_files={})
    assert err.value.key == "data.eval_benchmarks"
    with pytest.raises(ConfigError) as err:
        load_train_mixture(source="local", local_dir=None, benchmarks=["piqa"])  # no carried piqa train split
    assert err.value.key == "data.local_dir" and "piqa" in str(err.value)


def test_mixture_file_and_source_labels(tmp_path: Path) -> None:
    records = [load_local(carried_dir(), n, "test")[0] for n in ("boolq", "piqa", "winogrande", "openbookqa")]
    path = _write(tmp_path / "mix.json", records)
    loaded = load_train_mixture(source=str(path), local_dir=None, benchmarks=[])
    assert [infer_source(r) for r in loaded] == ["boolq", "piqa", "winogrande", "multiple-choice/4"]
    assert infer_source({**GOOD, "source": "mine"}) == "mine"  # an explicit source wins
    labels, names = partition_labels(loaded, "answer")
    assert [names[i] for i in labels] == [r["answer"] for r in loaded]
    with pytest.raises(ConfigError) as err:
        partition_labels(loaded, "topic")
    assert err.value.key == "data.partition_by"


def test_build_partitions_over_source_and_pads_each_side() -> None:
    tok = tiny_tokenizer()
    kwargs = dict(
        tokenizer=tok, local_dir=None, train_source="local", train_benchmarks=["boolq", "openbookqa"],
        eval_benchmarks=["piqa", "boolq"], hub_test_files={}, partition_by="source", max_length=200,
        num_clients=4, method="dirichlet", alpha=0.3, min_client_size=4, seed=3, batch_size=4,
        eval_batch_size=3, max_train_examples=60, max_eval_examples=5,
    )  # fmt: skip
    kwargs = grouped_data_args(**kwargs)
    data = build_commonsense_data(**kwargs)
    again = build_commonsense_data(**kwargs)
    assert data.label_names == ["boolq", "openbookqa"]
    assert data.label_counts.sum() == 60 and np.array_equal(data.label_counts, again.label_counts)
    assert list(data.eval_loaders) == ["piqa", "boolq"]
    train = next(data.clients[0].batches(0, num_steps=1))
    assert (train["attention_mask"][:, 0] == 1).all()  # right padding: every row starts with a real token
    assert train["input_ids"].shape[1] <= 200
    ev = next(iter(data.eval_loaders["piqa"]))
    assert (ev["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column
    assert ev["answer_index"].tolist() == [
        BENCHMARKS["piqa"].answer_words.index(r["answer"]) for r in load_local(carried_dir(), "piqa", "test")[:3]
    ]


def test_length_grouped_instruction_batches_serve_the_same_examples_with_less_padding() -> None:
    tok = tiny_tokenizer()
    flat = dict(
        tokenizer=tok, local_dir=None, train_source="local", train_benchmarks=["openbookqa"],
        eval_benchmarks=["piqa"], hub_test_files={}, partition_by="source", max_length=1024, num_clients=2,
        method="iid", alpha=1.0, min_client_size=4, seed=3, batch_size=4, eval_batch_size=3,
        max_train_examples=64, max_eval_examples=3,
    )  # fmt: skip
    plain = build_commonsense_data(**grouped_data_args(**flat))
    grouped = build_commonsense_data(**grouped_data_args(**flat, train_length_window=4))

    def epoch(data):
        batches = list(data.clients[0].batches(0, num_epochs=1))
        rows = sorted(tuple(ids[m.bool()].tolist()) for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"]))
        return rows, sum(b["input_ids"].numel() for b in batches)

    (plain_rows, plain_padded), (grouped_rows, grouped_padded) = epoch(plain), epoch(grouped)
    assert grouped_rows == plain_rows and grouped_padded < plain_padded


def test_url_source_is_downloaded_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: urlopen is replaced; the second load reads the cached copy."""
    import io

    from ubsmoe.data import commonsense

    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(json.dumps([GOOD, GOOD]).encode())

    monkeypatch.setattr(commonsense.urllib.request, "urlopen", fake_urlopen)
    url = "https://example.org/mix.json"
    for _ in range(2):
        records = commonsense.load_source(url, key="data.train_source", cache_dir=str(tmp_path))
        assert records == [GOOD, GOOD]
    assert calls == [url]
    monkeypatch.setattr(commonsense.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"{oops"))
    with pytest.raises(ConfigError) as err:
        commonsense.load_source("https://example.org/bad.json", key="data.train_source")
    assert err.value.key == "data.train_source" and "not valid JSON" in str(err.value)
