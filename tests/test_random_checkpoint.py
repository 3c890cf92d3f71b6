"""``python -m ubsmoe.backbones.random_checkpoint``: released configs + byte tokenizer, usable as a backbone folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose_config
from transformers import AutoConfig, AutoTokenizer

from ubsmoe.backbones.native_adapter import NativeAdapter, load_tokenizer
from ubsmoe.backbones.random_checkpoint import ARCHITECTURES, main, parse_override
from ubsmoe.settings import method_settings, model_settings
from ubsmoe.validate import validate
from ubsmoe.errors import ConfigError
from ubsmoe.settings import ModelSettings

TOKEN_IDS = {"pad_token_id", "bos_token_id", "eos_token_id"}
# A shrunk OLMoE-shaped folder a CPU test can build (the released vocabulary and expert count stay).
SHRUNK = ["--set", "hidden_size=64", "--set", "intermediate_size=32", "--set", "num_attention_heads=4",
          "--set", "num_key_value_heads=4"]  # fmt: skip


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_config_has_the_released_values_and_no_weights(tmp_path: Path, arch: str) -> None:
    out = main(["--arch", arch, "--out", str(tmp_path), "--num-layers", "1"])
    config = AutoConfig.from_pretrained(out)
    released = ARCHITECTURES[arch]["config"]
    assert config.model_type == ARCHITECTURES[arch]["model_type"]
    assert config.num_hidden_layers == 1
    for key, value in released.items():
        if key in TOKEN_IDS or key == "num_hidden_layers":
            continue
        if key == "rope_theta":  # transformers 5 keeps it inside rope_parameters
            got = getattr(config, "rope_parameters", None) or {}
            assert got.get("rope_theta", getattr(config, "rope_theta", None)) == value
            continue
        assert getattr(config, key) == value, key
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert not any(p.suffix in {".safetensors", ".bin", ".pt"} for p in out.iterdir())


def test_tokenizer_round_trips_any_bytes(tmp_path: Path) -> None:
    out = main(["--arch", "olmoe-1b-7b", "--out", str(tmp_path), "--num-layers", "1"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Question: ¿piqa? 🙂 naïve\tend"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # no merges: one token per byte
    assert tokenizer.decode(ids) == text
    assert max(ids) < 259 < AutoConfig.from_pretrained(out).vocab_size
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert load_tokenizer(ModelSettings(backbone=str(out), adapter="native")).pad_token_id == 0


def test_overrides_and_bad_values() -> None:
    assert parse_override("hidden_size=64") == ("hidden_size", 64)
    assert parse_override("mlp_only_layers=[0, 2]") == ("mlp_only_layers", [0, 2])
    assert parse_override("hidden_act=gelu") == ("hidden_act", "gelu")
    with pytest.raises(SystemExit):
        main(["--arch", "olmoe-1b-7b", "--out", "/nonexistent", "--set", "no-equals-sign"])
    with pytest.raises(ConfigError, match="num-layers"):
        main(["--arch", "olmoe-1b-7b", "--out", "/nonexistent", "--num-layers", "0"])


def paper_config(folder: Path, *overrides: str):
    return compose_config(
        "experiment=commonsense_olmoe", f"model.backbone={folder}", "model.pretrained=false", *overrides
    )


def test_shrunk_folder_builds_through_the_native_adapter(tmp_path: Path) -> None:
    out = main(["--arch", "olmoe-1b-7b", "--out", str(tmp_path), "--num-layers", "2", *SHRUNK])
    cfg = paper_config(out, "model.dtype=float32")
    model = model_settings(cfg)
    built = NativeAdapter().build(model, method_settings(cfg), head="causal_lm", num_tiers=4, init_seed=0)
    assert len(built.blocks) == 2 and built.num_experts == 64 and built.hidden_size == 64
    assert NativeAdapter().k_max(built.extras["config"], model) == 8  # the released top-8
    assert built.module.get_input_embeddings().weight.shape == (50304, 64)


def test_folder_is_accepted_by_the_paper_experiment(tmp_path: Path) -> None:
    out = main(["--arch", "olmoe-1b-7b", "--out", str(tmp_path), "--num-layers", "1"])
    cfg = paper_config(out)
    assert [t.beta for t in validate(cfg)] == [0.25, 0.5, 0.75, 1.0]
    config = NativeAdapter().check(model_settings(cfg), method_settings(cfg), "causal_lm")
    assert (config.num_experts, config.num_experts_per_tok, config.hidden_size) == (64, 8, 2048)
