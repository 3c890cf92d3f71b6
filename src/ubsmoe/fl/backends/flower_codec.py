"""Payloads and updates as Flower records, and back, bit for bit.

A train message carries one client's job: ArrayRecords ``state``, ``pg_defaults`` and
``base_deltas`` (the :class:`~ubsmoe.fl.client.ClientPayload`), a ConfigRecord ``job``
(client id, tier, K or rank, round, local budget, seed) and a ConfigRecord ``dtypes``.
The reply carries ArrayRecords ``state``, ``pg_defaults`` and ``telemetry`` (flattened
``<layer>/<statistic>`` keys), a flat MetricRecord ``metrics`` and ``dtypes``.

Two Flower constraints shape the encoding: records go through NumPy, which has no
bfloat16 (or float8), so such tensors travel as a same-width integer *view* and their
torch dtype is written into ``dtypes`` under ``<record>/<key>``; and ConfigRecords hold
no None, so an absent K, rank or budget is an absent key. Decoding is exact: the server
aggregates the very numbers the client produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ubsmoe.settings import Tier
from ubsmoe.fl.client import ClientPayload, ClientSpec, ClientUpdate, Tensors

TRAIN = "train"  # message type of a client's local-training job
QUERY = "query"  # message type asking a node which client (data owner) it is

# Same-width integer views for dtypes NumPy cannot hold.
_VIEW_AS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PAYLOAD_RECORDS = ("state", "pg_defaults", "base_deltas")
_TELEMETRY_SEP = "/"


def _numpy_native(dtype: torch.dtype) -> bool:
    try:
        torch.empty(0, dtype=dtype).numpy()
    except TypeError:
        return False
    return True


def tensors_to_record(name: str, tensors: Tensors, dtypes: ConfigRecord) -> ArrayRecord:
    """An ArrayRecord of ``tensors``; non-NumPy dtypes become integer views noted in ``dtypes``."""
    record = ArrayRecord()
    for key, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        if not _numpy_native(t.dtype):
            dtypes[f"{name}/{key}"] = str(t.dtype).removeprefix("torch.")
            t = t.view(_VIEW_AS[t.element_size()])
        record[key] = Array(t.numpy())
    return record


def record_to_tensors(name: str, record: ArrayRecord, dtypes: ConfigRecord) -> Tensors:
    """The tensors of an ArrayRecord, with viewed dtypes restored from ``dtypes``."""
    out: Tensors = {}
    for key, array in record.items():
        t = torch.from_numpy(np.array(array.numpy(), copy=True))
        original = dtypes.get(f"{name}/{key}")
        if original is not None:
            t = t.view(getattr(torch, str(original)))
        out[key] = t
    return out


@dataclass(frozen=True)
class DecodedJob:
    """What a ClientApp needs to train one client, decoded from a train message."""

    spec: ClientSpec
    payload: ClientPayload
    round_idx: int
    local_steps: int | None
    local_epochs: int | None
    seed: int


def encode_job(
    spec: ClientSpec,
    payload: ClientPayload,
    round_idx: int,
    *,
    local_steps: int | None,
    local_epochs: int | None,
    seed: int,
) -> RecordDict:
    """The content of one client's train message."""
    dtypes = ConfigRecord()
    content = RecordDict()
    for name in _PAYLOAD_RECORDS:
        content[name] = tensors_to_record(name, getattr(payload, name), dtypes)
    job: dict[str, int | float | str] = {
        "client-id": spec.client_id,
        "tier-index": spec.tier_index,
        "tier-name": spec.tier.name,
        "tier-beta": spec.tier.beta,
        "tier-share": spec.tier.share,
        "round": round_idx,
        "seed": seed,
    }
    optional = {"k": spec.k, "rank": spec.rank, "local-steps": local_steps, "local-epochs": local_epochs}
    job.update({key: int(value) for key, value in optional.items() if value is not None})
    content["job"] = ConfigRecord(job)
    content["dtypes"] = dtypes
    return content


def _optional_int(record: ConfigRecord, key: str) -> int | None:
    return int(record[key]) if key in record else None  # type: ignore[arg-type]


def decode_job(content: RecordDict) -> DecodedJob:
    """The inverse of :func:`encode_job`."""
    job, dtypes = content.config_records["job"], content.config_records["dtypes"]
    tier = Tier(
        name=str(job["tier-name"]),
        beta=float(job["tier-beta"]),  # type: ignore[arg-type]
        share=float(job["tier-share"]),  # type: ignore[arg-type]
    )
    spec = ClientSpec(
        client_id=int(job["client-id"]),  # type: ignore[arg-type]
        tier=tier,
        tier_index=int(job["tier-index"]),  # type: ignore[arg-type]
        k=_optional_int(job, "k"),
        rank=_optional_int(job, "rank"),
    )
    records = content.array_records
    payload = ClientPayload(**{name: record_to_tensors(name, records[name], dtypes) for name in _PAYLOAD_RECORDS})
    return DecodedJob(
        spec=spec,
        payload=payload,
        round_idx=int(job["round"]),  # type: ignore[arg-type]
        local_steps=_optional_int(job, "local-steps"),
        local_epochs=_optional_int(job, "local-epochs"),
        seed=int(job["seed"]),  # type: ignore[arg-type]
    )


def flatten_telemetry(telemetry: dict[str, Tensors]) -> Tensors:
    """``{layer: {statistic: tensor}}`` as ``{"layer/statistic": tensor}``."""
    return {
        f"{layer}{_TELEMETRY_SEP}{stat}": torch.as_tensor(value)
        for layer, stats in telemetry.items()
        for stat, value in stats.items()
    }


def unflatten_telemetry(flat: Tensors) -> dict[str, Tensors]:
    out: dict[str, Tensors] = {}
    for key, value in flat.items():
        layer, stat = key.rsplit(_TELEMETRY_SEP, 1)
        out.setdefault(layer, {})[stat] = value
    return out


def encode_update(update: ClientUpdate, seconds: float) -> RecordDict:
    """The content of a client's reply: its new state, PG defaults, telemetry and scalars."""
    dtypes = ConfigRecord()
    content = RecordDict()
    content["state"] = tensors_to_record("state", update.state, dtypes)
    content["pg_defaults"] = tensors_to_record("pg_defaults", update.pg_defaults, dtypes)
    content["telemetry"] = tensors_to_record("telemetry", flatten_telemetry(update.telemetry), dtypes)
    content["metrics"] = MetricRecord(
        {
            "client-id": update.spec.client_id,
            "num-examples": int(update.num_examples),
            "num-steps": int(update.num_steps),
            "train-loss": float(update.train_loss),
            "seconds": float(seconds),
            "simulated-delay": float(update.simulated_delay),  # an injected straggler's declared delay
            "train-seconds": float(update.train_seconds),
            "peak-memory-bytes": -1 if update.peak_memory_bytes is None else int(update.peak_memory_bytes),
        }
    )
    content["dtypes"] = dtypes
    return content


def decode_update(content: RecordDict, spec: ClientSpec) -> tuple[ClientUpdate, float]:
    """The :class:`ClientUpdate` (and client-side seconds) of a reply to ``spec``'s job."""
    metrics, dtypes = content.metric_records["metrics"], content.config_records["dtypes"]
    if int(metrics["client-id"]) != spec.client_id:  # type: ignore[arg-type]
        raise ValueError(f"reply names client {metrics['client-id']} but the job was for client {spec.client_id}")
    records = content.array_records
    update = ClientUpdate(
        spec=spec,
        state=record_to_tensors("state", records["state"], dtypes),
        num_examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
        telemetry=unflatten_telemetry(record_to_tensors("telemetry", records["telemetry"], dtypes)),
        pg_defaults=record_to_tensors("pg_defaults", records["pg_defaults"], dtypes),
        train_loss=float(metrics["train-loss"]),  # type: ignore[arg-type]
        num_steps=int(metrics["num-steps"]),  # type: ignore[arg-type]
        simulated_delay=float(metrics.get("simulated-delay", 0.0)),  # type: ignore[arg-type]
        train_seconds=float(metrics.get("train-seconds", 0.0)),  # type: ignore[arg-type]
        peak_memory_bytes=_optional_memory(metrics.get("peak-memory-bytes", -1)),
    )
    return update, float(metrics["seconds"])  # type: ignore[arg-type]


def _optional_memory(value: object) -> int | None:
    """A reply's peak memory: -1 (measured nowhere: no CUDA device) is None."""
    number = int(value)  # type: ignore[call-overload]
    return None if number < 0 else number


def encoded_bytes(content: RecordDict) -> int:
    """Bytes of a message content as Flower ships it: every distinct deflated object (records, arrays, chunks).

    Flower ships content-addressed objects (records, arrays, 5 MB array chunks) and each
    distinct object once, so two identical arrays in one message cost one.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
