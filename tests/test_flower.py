"""backend=flower without Ray or sockets: the record codec, config checks, reply handling, and equivalence.

The equivalence and resume runs go through the real runner with ``backend.mode=inprocess``:
a Flower Grid whose nodes run the project's ClientApp in this process, with random node
ids and replies in shuffled order, so sorting by client id is what makes the numbers equal.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flower_helpers import TINY, assert_same_final_state, assert_same_metrics
from helpers import compose_config

from ubsmoe.settings import Tier

from ubsmoe.validate import validate
from ubsmoe.errors import ConfigError
from ubsmoe.fl.backends import BACKENDS, ClientJob, FlowerBackend, build_backend
from ubsmoe.fl.client import ClientPayload, ClientSpec, ClientUpdate
from ubsmoe.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def spec(cid: int, *, k: int | None = 2, rank: int | None = None) -> ClientSpec:
    return ClientSpec(client_id=cid, tier=Tier("t50", 0.5, 0.25), tier_index=1, k=k, rank=rank)


# ----------------------------------------------------------------------------- codec
def test_codec_round_trips_payload_and_update_bit_for_bit() -> None:
    from ubsmoe.fl.backends.flower_codec import decode_job, decode_update, encode_job, encode_update

    g = torch.Generator().manual_seed(0)
    payload = ClientPayload(
        state={"a.lora_A": torch.randn(2, 4, 8, generator=g), "head.bias": torch.randn(3, generator=g).bfloat16()},
        pg_defaults={"layer.0": torch.randn(8, 16, generator=g)},
        base_deltas={"x.base_delta": torch.randn(4, 4, generator=g, dtype=torch.float64)},
    )
    content = encode_job(spec(5, k=None, rank=3), payload, 7, local_steps=None, local_epochs=2, seed=11)
    job_record = content.config_records["job"]
    assert None not in job_record.values() and "k" not in job_record and "local-steps" not in job_record
    assert content.config_records["dtypes"] == {"state/head.bias": "bfloat16"}
    job = decode_job(content)
    assert job.spec == spec(5, k=None, rank=3)
    assert (job.round_idx, job.local_steps, job.local_epochs, job.seed) == (7, None, 2, 11)
    for name in ("state", "pg_defaults", "base_deltas"):
        sent, got = getattr(payload, name), getattr(job.payload, name)
        assert set(sent) == set(got)
        for key in sent:
            assert got[key].dtype == sent[key].dtype and torch.equal(got[key], sent[key]), key

    update = ClientUpdate(
        spec=spec(5),
        state={"w": torch.randn(3, 3, generator=g).bfloat16()},
        num_examples=42,
        telemetry={"enc.layer.0.ffn": {"expert_tokens": torch.arange(8.0), "tokens": torch.tensor(99.0)}},
        pg_defaults={"enc.layer.0.ffn": torch.randn(8, 4, generator=g)},
        train_loss=0.123456789,
        num_steps=2,
        train_seconds=0.25,
    )
    back, seconds = decode_update(encode_update(update, 1.5), spec(5))
    assert seconds == 1.5 and back.num_examples == 42 and back.num_steps == 2 and back.train_loss == 0.123456789
    assert back.train_seconds == 0.25 and back.peak_memory_bytes is None  # measured nowhere off CUDA
    measured, _ = decode_update(encode_update(replace(update, peak_memory_bytes=123456789), 1.5), spec(5))
    assert measured.peak_memory_bytes == 123456789
    assert back.state["w"].dtype == torch.bfloat16 and torch.equal(back.state["w"], update.state["w"])
    assert torch.equal(back.telemetry["enc.layer.0.ffn"]["expert_tokens"], torch.arange(8.0))
    assert float(back.telemetry["enc.layer.0.ffn"]["tokens"]) == 99.0
    with pytest.raises(ValueError, match="client 5"):
        decode_update(encode_update(update, 1.5), spec(6))


def test_encoded_bytes_count_what_flower_ships() -> None:
    from ubsmoe.fl.backends.flower_codec import encode_job, encoded_bytes

    dense = ClientPayload(state={"w": torch.randn(256, 256)})
    twice = ClientPayload(state={"w": dense.state["w"], "w_copy": dense.state["w"].clone()})
    raw = 256 * 256 * 4
    sent = encoded_bytes(encode_job(spec(0), dense, 0, local_steps=1, local_epochs=None, seed=0))
    assert raw < sent < raw * 1.05  # the tensor plus headers and the job record
    # Flower ships content-addressed objects: an identical second array is sent once
    assert encoded_bytes(encode_job(spec(0), twice, 0, local_steps=1, local_epochs=None, seed=0)) < raw * 1.1


# ----------------------------------------------------------------------------- config
def test_flower_config_is_checked_before_any_work() -> None:
    assert "flower" in BACKENDS
    validate(compose_config("backend=flower"))
    for override, key in [
        ("backend.mode=ray", "backend.mode"),
        ("backend.num_workers=0", "backend.num_workers"),
        ("backend.client_cpus=0", "backend.client_cpus"),
        ("backend.client_gpus=-0.5", "backend.client_gpus"),
        ("federation.round_timeout=-1", "federation.round_timeout"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(compose_config("backend=flower", override))
        assert err.value.key == key
    validate(compose_config("federation.round_timeout=30"))


def test_without_the_extra_backend_flower_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flwr", None)  # as if flwr were not installed
    with pytest.raises(ConfigError, match=r"\.\[flower\]"):
        validate(compose_config("backend=flower"))
    with pytest.raises(ConfigError, match=r"\.\[flower\]"):
        build_backend(name="flower")
    validate(compose_config())  # the local backend does not need it


def test_core_imports_do_not_import_flower() -> None:
    code = (
        "import sys; sys.modules['flwr'] = None; sys.modules['ray'] = None\n"
        "import ubsmoe.runner, ubsmoe.fl.backends, ubsmoe.validate\n"
        "print(sorted(ubsmoe.fl.backends.BACKENDS))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "['flower', 'local']" in proc.stdout


# ----------------------------------------------------------------------------- replies
def stub_client_app(*, fail: int | None = None, slow: int | None = None, delay: float = 0.0):
    """A ClientApp that answers without training: raises for ``fail``, sleeps ``delay`` for ``slow``."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    from ubsmoe.apps.flower_client import handle_query
    from ubsmoe.fl.backends.flower_codec import decode_job, encode_update

    app = ClientApp()

    @app.train()
    def train(message, context):
        job = decode_job(message.content)
        cid = job.spec.client_id
        if cid == fail:
            raise ValueError("injected failure")
        if cid == slow:
            time.sleep(delay)
        update = ClientUpdate(
            spec=job.spec,
            state={k: v + cid for k, v in job.payload.state.items()},
            num_examples=10 + cid,
            telemetry={"layer": {"expert_tokens": torch.ones(4) * cid, "tokens": torch.tensor(4.0 * cid)}},
            pg_defaults={},
            train_loss=0.5,
            num_steps=1,
        )
        return Message(encode_update(update, 0.01), reply_to=message)

    app.query()(handle_query)
    return app


def stub_backend(app, node_configs, timeout: float | None = None) -> FlowerBackend:
    from ubsmoe.fl.backends.flower_inprocess import InProcessGrid

    backend = FlowerBackend(mode="inprocess", grid=InProcessGrid(app, node_configs), node_wait=0.0)
    backend.launch(compose_config(f"federation.round_timeout={timeout if timeout else 'null'}"), lambda: None)
    backend.start(SimpleNamespace(local_steps=1, local_epochs=None, seed=0))  # type: ignore[arg-type]
    return backend


def jobs(*cids: int) -> list[ClientJob]:
    return [ClientJob(spec(c), ClientPayload(state={"w": torch.zeros(2, 2)}), round_idx=3) for c in cids]


def test_replies_are_sorted_by_client_id_and_decoded() -> None:
    nodes = [{"partition-id": c} for c in range(6)]
    backend = stub_backend(stub_client_app(), nodes)
    done = []
    results = backend.train_clients(jobs(4, 1, 3), on_done=done.append)
    assert [r.client_id for r in results] == [1, 3, 4] and sorted(r.client_id for r in done) == [1, 3, 4]
    assert all(r.ok for r in results)
    assert [r.update.num_examples for r in results] == [11, 13, 14]
    assert torch.equal(results[1].update.state["w"], torch.full((2, 2), 3.0))
    assert set(backend.nodes) == set(range(6))  # every node told the server which client it is
    sent, received = backend.last_bytes[1]
    assert sent > 16 and received > 16


def test_a_raising_client_is_an_error_result_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    backend = stub_backend(stub_client_app(fail=2), [{"partition-id": c} for c in range(4)])
    with caplog.at_level("WARNING", logger="ubsmoe.fl.backends.flower"):
        results = backend.train_clients(jobs(0, 2, 3))
    assert "round 4: client 2:" in caplog.text and "injected failure" in caplog.text
    assert [r.client_id for r in results] == [0, 2, 3]
    assert results[0].ok and results[2].ok
    failed = results[1]
    assert not failed.ok and failed.update is None
    assert "client 2" in failed.error and "injected failure" in failed.error


def test_a_reply_missing_at_the_round_timeout_is_an_error_result() -> None:
    backend = stub_backend(stub_client_app(slow=3, delay=0.6), [{"partition-id": c} for c in range(4)], timeout=0.3)
    results = backend.train_clients(jobs(0, 3))
    assert results[0].ok
    assert not results[1].ok and "client 3" in results[1].error and "no reply" in results[1].error
    assert 3 not in backend.nodes and 0 in backend.nodes  # the silent client's node is asked again next round


def test_deployment_nodes_are_found_by_their_client_id() -> None:
    # two data owners (--node-config client-id=N); client 5 has no SuperNode
    backend = stub_backend(stub_client_app(), [{"client-id": 7}, {"client-id": 2}])
    results = backend.train_clients(jobs(2, 5, 7))
    assert [r.ok for r in results] == [True, False, True]
    assert "client 5" in results[1].error and "no SuperNode" in results[1].error


def test_a_supernode_refuses_a_client_it_does_not_hold() -> None:
    from flwr.app import Context, Message, RecordDict

    from ubsmoe.apps.flower_client import handle_train
    from ubsmoe.fl.backends.flower_codec import TRAIN, encode_job
    from ubsmoe.fl.backends.flower_inprocess import InProcessGrid

    InProcessGrid(stub_client_app(), [])  # sets this process's task identity for Message()
    content = encode_job(spec(3), ClientPayload(state={}), 0, local_steps=1, local_epochs=None, seed=0)
    message = Message(content, dst_node_id=1, message_type=TRAIN)
    context = Context(run_id=1, node_id=1, node_config={"client-id": 4}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="client 3: this SuperNode holds client 4"):
        handle_train(message, context, config_yaml="seed: 0")


# ----------------------------------------------------------------------------- equivalence (trains)
def _run(out: Path, *overrides: str, glue_dir: Path, cache_dir: Path) -> float | None:
    cfg = compose_config(
        *overrides, f"paths.output_dir={out}", f"data.local_dir={glue_dir}", f"paths.cache_dir={cache_dir}"
    )
    return run_experiment(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ubsmoe", "hetlora"])
def test_flower_run_equals_local_run(method: str, tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    common = (*TINY, "federation.clients_per_round=4", "federation.rounds=3", f"method={method}")
    local = _run(tmp_path / "local", *common, **kw)
    flower = _run(tmp_path / "flower", *common, "backend=flower", "backend.mode=inprocess", **kw)
    assert flower == pytest.approx(local, abs=1e-6)
    assert_same_metrics(tmp_path / "local", tmp_path / "flower")
    assert_same_final_state(tmp_path / "local", tmp_path / "flower")


@pytest.mark.slow
def test_resume_under_flower_equals_uninterrupted(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    flower = (*TINY, "backend=flower", "backend.mode=inprocess")
    _run(tmp_path / "straight", *flower, "federation.rounds=3", **kw)
    _run(tmp_path / "part", *flower, "federation.rounds=1", **kw)
    _run(tmp_path / "resumed", *flower, "federation.rounds=3", f"resume={tmp_path / 'part'}", **kw)
    assert_same_metrics(tmp_path / "straight", tmp_path / "resumed")
    assert_same_final_state(tmp_path / "straight", tmp_path / "resumed")


def test_deployment_mode_writes_the_run_config_the_server_app_reads(
    tmp_path: Path, glue_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    from flwr.app import Context, RecordDict

    from ubsmoe.fl.backends.flower_config import config_from_run_config

    out = tmp_path / "run"
    deployment = ("backend=flower", "backend.mode=deployment", "backend.insecure=true")  # loopback: no credentials
    result = _run(out, *TINY, *deployment, glue_dir=glue_dir, cache_dir=cache_dir)
    assert result is None and not (out / "metrics.jsonl").exists()  # nothing trains outside the SuperLink
    assert f"flwr run {ROOT / 'flower-app'} ubsmoe --run-config" in capsys.readouterr().out
    run_config = tomllib.loads((out / "flower_run_config.toml").read_text())
    assert set(run_config) == {"ubsmoe-config"}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    cfg = config_from_run_config(context.run_config)
    assert cfg.backend.mode == "deployment" and cfg.federation.num_clients == 6
    assert Path(cfg.paths.output_dir) == out.resolve() and Path(cfg.paths.cache_dir).is_absolute()
    # the FAB carries no data or model: far below Flower's 10 MB limit
    files = [p for p in (ROOT / "flower-app").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    fab = sum(p.stat().st_size for p in files)
    assert fab < 100_000
