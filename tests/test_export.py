"""Export a finished run's tiers, load them back, and predict: the exported model is the trained one."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PROJECT_ROOT
from omegaconf import OmegaConf

import ubsmoe
from ubsmoe.errors import ConfigError
from ubsmoe.export import export_run


def _final_metrics(run_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in records)
    return {r["tier"]: r["main_metric"] for r in records if r["round"] == last}


def _validation_metric(exported, run_dir: Path, cache_dir: Path) -> float:
    """The exported module evaluated on the run's own validation batches (same data settings)."""
    from ubsmoe.data.datamodule import build_federated_data
    from ubsmoe.data.specs import LoaderSpec, PartitionSpec
    from ubsmoe.model import resolve_backbone_path

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    data = build_federated_data(
        task=cfg.data.task, local_dir=cfg.data.local_dir, tokenizer_path=resolve_backbone_path(cfg.model.backbone),
        max_length=cfg.data.max_length, regression_buckets=cfg.data.regression_buckets,
        partition=PartitionSpec.from_config(cfg),
        loader=dataclasses.replace(LoaderSpec.from_config(cfg), cache_dir=str(cache_dir)),
    )  # fmt: skip
    module = exported.module
    (loader,) = data.eval_loaders.values()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            module.validation_step(batch, i)
    return module.compute_validation()[data.task.main_metric]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ubsmoe", "fedit"])
def test_every_exported_tier_reproduces_the_runs_final_metric(smoke_runs, method, tmp_path, cache_dir):
    run_dir = smoke_runs[method]
    paths = export_run(run_dir, tmp_path / "export")
    final = _final_metrics(run_dir)
    assert sorted(p.name for p in paths) == sorted(final)
    for path in paths:
        exported = ubsmoe.load_exported(path)
        assert exported.manifest["tier"]["name"] == path.name
        assert _validation_metric(exported, run_dir, cache_dir) == final[path.name]


@pytest.mark.slow
def test_export_is_checked_and_predict_prints_labels_and_scores(smoke_runs, tmp_path):
    (path,) = export_run(smoke_runs["ubsmoe"], tmp_path / "export", tiers=["t25"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tier"]["k"] == 2 and manifest["backbone"] == "minilm"
    assert (path / "adapter" / "adapter_config.json").is_file()  # attention LoRA in peft's format
    proc = subprocess.run(
        [sys.executable, "-m", "ubsmoe.predict", str(path), "a wonderful, moving film", "dull and lifeless"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                             "PYTHONPATH": str(PROJECT_ROOT / "src")}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["input"] for r in lines] == ["a wonderful, moving film", "dull and lifeless"]
    for r in lines:
        assert r["label"] in ("negative", "positive")
        assert abs(sum(r["scores"].values()) - 1.0) < 1e-5
    # a tampered file is refused before anything is built
    weights = path / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="checksum"):
        ubsmoe.load_exported(path)


def test_peft_loads_the_exported_attention_adapter(smoke_runs, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    from ubsmoe.model import resolve_backbone_path

    (path,) = export_run(smoke_runs["fedit"], tmp_path / "export", tiers=["t100"])
    base = AutoModel.from_pretrained(resolve_backbone_path("minilm"), add_pooling_layer=False)
    peft_model = PeftModel.from_pretrained(base, str(path / "adapter"))
    ours = {k.removeprefix("state/backbone."): v for k, v in load_file(str(path / "model.safetensors")).items()
            if k.startswith("state/backbone.") and ".attention." in k}  # fmt: skip
    theirs = dict(peft_model.named_parameters())
    assert ours
    for name, value in ours.items():
        assert torch.equal(theirs[f"base_model.model.{name}"], value), name
