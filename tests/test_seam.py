"""The backbone-adapter / task seam: one FederatedModel surface for moefy+GLUE and native+instruction."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config

from ubsmoe.backbones import build_adapter
from ubsmoe.backbones.tiny import tiny_tokenizer
from ubsmoe.validate import validate
from ubsmoe.data.commonsense import BENCHMARKS
from ubsmoe.errors import ConfigError
from ubsmoe.model import FederatedModel
from ubsmoe.settings import LoraSettings, MethodSettings, ModelSettings
from ubsmoe.tasks.instruction import InstructionTask


def native_model(
    family: str = "olmoe", *, sparse: bool = True, k_max: int | None = None, checkpointing: bool = False,
    dtype: str = "float32",
) -> FederatedModel:
    task = InstructionTask(
        tokenizer=tiny_tokenizer(),
        answer_patterns={k: b.pattern for k, b in BENCHMARKS.items()},
        answer_words={k: b.answer_words for k, b in BENCHMARKS.items()},
    )
    settings = ModelSettings(
        name=f"tiny_{family}", backbone=f"tiny:{family}", adapter="native", k_max=k_max,
        gradient_checkpointing=checkpointing, dtype=dtype,
        lora=LoraSettings(rank=4, alpha=8, attention_targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )  # fmt: skip
    return FederatedModel(
        adapter=build_adapter("native"), task=task, model=settings, method=MethodSettings(sparse=sparse),
        num_tiers=4, init_seed=0,
    )  # fmt: skip


def test_native_surface_is_the_one_the_engine_uses() -> None:
    model = native_model()
    assert model.k_max == 2 and model.model_settings.num_experts == 8 and model.k == 2  # the checkpoint's top-2 of 8
    assert list(model.blocks) == ["model.layers.0", "model.layers.1"]
    state = model.trainable_state()
    routers = [n for n in state if n.endswith(".mlp.router.weight")]
    assert len(routers) == 2 and set(routers) <= set(model._groups["router"])
    assert all(name in state for name in model.expert_tensor_names())
    assert state[model.expert_tensor_names()[0]].shape[0] == 8  # expert as dim 0
    assert any(".self_attn.o_proj.lora_A" in n for n in state) and not model._groups["head"]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("experts.gate_up_proj" in n for n in frozen) and any("embed_tokens" in n for n in frozen)
    model.set_client()  # no K: K_max
    assert all(b.k == 2 for b in model.blocks.values())
    with pytest.raises(ConfigError):
        model.set_client(k=9)


def test_rank_baselines_on_native_keep_k_max_and_freeze_the_router() -> None:
    model = native_model(sparse=False)
    model.set_client(k=1, rank=2)  # dense methods ignore K
    assert all(b.k == 2 for b in model.blocks.values()) and model.rank_limiter.rank == 2
    assert not model._groups["router"] and not model._groups["phi"]
    assert model.expert_tensor_names()  # the stacked expert LoRA trains, at the client's rank


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_native_analytic_flops_match_the_counter_and_fall_with_k(family: str) -> None:
    model = native_model(family, k_max=4).eval()
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("the quick brown fox jumps")["input_ids"]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    per_k = {}
    for k in (1, 4):
        model.set_client(k=k)
        analytic = model.flops_per_example(ids.shape[1])
        measured = model.measured_flops_per_example(batch)
        assert measured == pytest.approx(analytic, rel=1e-9)
        per_k[k] = analytic
    assert per_k[1] < per_k[4]
    assert model.reference_flops_per_example(ids.shape[1]) == pytest.approx(
        native_model(family).flops_per_example(ids.shape[1])
    )  # the reference is the released model at its own top-2


def test_adapter_and_task_must_fit() -> None:
    with pytest.raises(ConfigError) as err:
        build_adapter("dense")
    assert err.value.key == "model.adapter"
    task = InstructionTask(tokenizer=tiny_tokenizer(), answer_patterns={}, answer_words={})
    with pytest.raises(ConfigError) as err:
        FederatedModel(
            adapter=build_adapter("moefy"), task=task, model=ModelSettings(), method=MethodSettings(), num_tiers=4,
            init_seed=0,
        )  # fmt: skip
    assert err.value.key == "model.adapter"


@pytest.mark.parametrize(("override", "key"), [
    ("data.kind=squad", "data.kind"),
    ("model=minilm", "model.adapter"),
    ("data.eval_mode=beam", "data.eval_mode"),
    ("data.max_new_tokens=0", "data.max_new_tokens"),
    ("data.eval_benchmarks=[boolq,mmlu]", "data.eval_benchmarks"),
    ("data.eval_benchmarks=[]", "data.eval_benchmarks"),
    ("data.partition_by=topic", "data.partition_by"),
    ("model.num_experts=8", "model.num_experts"),
    ("model.dtype=int8", "model.dtype"),
    ("model.k_max=0", "model.k_max"),
    ("fabric.precision=fp8", "fabric.precision"),
    ("model.router_dtype=int8", "model.router_dtype"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
    ("data.train_benchmarks=[]", "data.train_benchmarks"),
])  # fmt: skip
def test_commonsense_config_errors_name_the_key(override: str, key: str) -> None:
    cfg = compose_config("experiment=commonsense_tiny", override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key


def test_every_new_config_validates() -> None:
    models = ("olmoe_1b_7b", "qwen1_5_moe_a2_7b", "qwen3_30b_a3b", "mixtral_8x7b", "tiny_qwen3_moe", "tiny_mixtral")
    for model in models:
        validate(compose_config("experiment=commonsense_tiny", f"model={model}"))
    validate(compose_config("experiment=commonsense_olmoe"))
    validate(compose_config("experiment=smoke"))  # GLUE keeps validating without the new keys
    with pytest.raises(ConfigError) as err:
        validate(compose_config("experiment=smoke", "model=tiny_olmoe"))
    assert err.value.key == "model.adapter"


def test_gradient_checkpointing_gives_the_same_step() -> None:
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("one two three four five")["input_ids"]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    results = []
    for ckpt in (False, True):
        model = native_model(checkpointing=ckpt)
        assert model.backbone.is_activation_checkpointing == ckpt
        model.train().set_client(k=1)
        loss = model.training_step(batch, 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads, model.telemetry()))
    (l0, g0, t0), (l1, g1, t1) = results
    assert l1 == pytest.approx(l0, rel=1e-6) and set(g1) == set(g0) and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6)
    for layer in t0:  # the recompute does not count tokens twice
        assert float(t1[layer]["tokens"]) == float(t0[layer]["tokens"])


def test_bf16_weights_keep_a_float32_router_and_float32_adapters() -> None:
    model = native_model(dtype="bfloat16")
    params = dict(model.named_parameters())
    assert params["backbone.model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    for name in model._groups["router"] + model.expert_tensor_names():
        assert params[name].dtype == torch.float32 and params[name].requires_grad, name
