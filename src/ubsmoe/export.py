"""Export a run's final global model as one tier's clients run it, and load it back for inference.

``python -m ubsmoe.export RUN_DIR [--tier NAME ...] [--out DIR]`` writes, per tier, a
directory that needs nothing of the run but a reference to the frozen backbone:

- ``manifest.json``: format, backbone reference (hub id, local path or ``minilm``), task
  (name, labels), the tier (name, beta, K, rank), the model and method settings the module
  is rebuilt from, the run's init seed, and the SHA-256 of every file;
- ``model.safetensors``: what training changed, as that tier's clients receive it
  (``state/...``: LoRA, router, phi, head; ``pg/...``: PG default outputs; ``base/...``: a
  merged base update, FLoRA), plus the expert conversion (``neuron_order/<layer>``: which
  dense neuron each expert row is, so the experts are rebuilt from the backbone alone);
- ``adapter/``: the attention LoRA in peft's format (``PeftModel.from_pretrained`` loads it
  onto the plain backbone), where the model has attention LoRA.

:func:`load_exported` returns an :class:`ExportedModel` (the module at the tier's K / rank,
in eval mode, and its tokenizer); ``python -m ubsmoe.predict DIR "a sentence" ...`` prints
labels and scores. An export is untrusted input when it is loaded: every file's checksum
is verified and tensors are read with safetensors (no pickle).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ubsmoe.data.glue import TASKS, GlueTask, build_metrics
from ubsmoe.errors import ConfigError
from ubsmoe.finished_run import FinishedRun, load_finished_run
from ubsmoe.fl.client import load_payload
from ubsmoe.model import FederatedClassifier, resolve_backbone_path
from ubsmoe.settings import MethodSettings, ModelSettings

FORMAT = "ubsmoe-export-v1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
ADAPTER_DIR = "adapter"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _settings_from_dict(cls: type, raw: dict[str, Any]) -> Any:
    """Rebuild a (nested) settings dataclass from its ``asdict`` form."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if isinstance(value, dict) and inner is not None and dataclasses.is_dataclass(inner()):
            value = _settings_from_dict(type(inner()), value)
        kwargs[f.name] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------------- export
def _peft_adapter(module: Any, state: dict[str, torch.Tensor], out: Path) -> bool:
    """Write the attention LoRA of ``state`` as a peft adapter directory; False when there is none."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    prefix = "backbone."
    tensors, targets = {}, set()
    for name, value in state.items():
        if not name.startswith(prefix) or ".attention." not in name or "lora_" not in name:
            continue
        inner = name[len(prefix) :].replace(".default.weight", ".weight")  # peft drops the adapter name
        tensors[f"base_model.model.{inner}"] = value.contiguous()
        targets.add(inner.split(".lora_")[0])
    if not tensors:
        return False
    lora = module.model_settings.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=sorted(targets),
                        bias="none")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return True


def export_tier(run: FinishedRun, tier_index: int, out: Path) -> Path:
    """Write one tier's model into ``out`` (created); returns ``out``."""
    from safetensors.torch import save_file


    spec = run.tier_specs[tier_index]
    payload = run.strategy.configure_client(run.server, spec)
    load_payload(run.module, spec, payload)  # also checks that the payload fits the module
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"state/{k}": v for k, v in payload.state.items()})
    tensors.update({f"pg/{k}": v for k, v in payload.pg_defaults.items()})
    tensors.update({f"base/{k}": v for k, v in payload.base_deltas.items()})
    for layer, block in run.module.blocks.items():
        order = getattr(block, "neuron_order", None)
        if order is not None:
            tensors[f"neuron_order/{layer}"] = order
        defaults = getattr(block, "skip_default", None)
        if defaults is not None:
            tensors[f"skip_default/{layer}"] = defaults
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / WEIGHTS))
    files = [WEIGHTS]
    if _peft_adapter(run.module, payload.state, out / ADAPTER_DIR):
        files += [f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/adapter_model.safetensors"]
    tier = spec.tier
    manifest = {
        "format": FORMAT,
        "backbone": run.module.model_settings.backbone,
        "task": {"name": run.task.name, "label_names": list(run.task.label_names), "num_labels": run.task.num_labels,
                 "text_fields": list(run.task.text_fields), "main_metric": run.task.main_metric},
        "tier": {"name": tier.name, "beta": tier.beta, "index": tier_index, "k": spec.k, "rank": spec.rank},
        "num_tiers": len(run.tier_specs),
        "model": dataclasses.asdict(run.module.model_settings),
        "method": dataclasses.asdict(run.module.method),
        "init_seed": run.init_seed,
        "max_length": int(run.cfg.data.max_length),
        "round": run.server.round,
        "files": {name: _sha256(out / name) for name in files},
    }  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def export_run(run_dir: str | Path, out: str | Path | None = None, tiers: list[str] | None = None) -> list[Path]:
    """Export the named tiers (default: all) of a finished run into ``out/<tier>`` (default ``RUN_DIR/export``)."""
    run_dir = Path(run_dir)
    run = load_finished_run(run_dir)
    names = [s.tier.name for s in run.tier_specs]
    wanted = tiers or names
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise ConfigError("--tier", unknown[0], f"one of the run's tiers: {', '.join(names)}")
    root = Path(out) if out is not None else run_dir / "export"
    return [export_tier(run, names.index(t), root / t) for t in wanted]


# ----------------------------------------------------------------------------------- load
@dataclass
class ExportedModel:
    """A loaded export: the module at the tier's K / rank (eval mode), its tokenizer and manifest."""

    module: Any
    tokenizer: Any
    manifest: dict[str, Any]

    @torch.no_grad()
    def predict(self, texts: list[str] | list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Label and scores per input (a sentence, or a pair for two-sentence tasks)."""
        task = self.manifest["task"]
        pairs = [t if isinstance(t, (tuple, list)) else (t,) for t in texts]
        if any(len(p) != len(task["text_fields"]) for p in pairs):
            raise ConfigError("texts", texts[0], f"{len(task['text_fields'])} text(s) per example: {task['text_fields']}")
        columns = list(zip(*pairs, strict=True))
        batch = self.tokenizer(*columns, padding=True, truncation=True, max_length=self.manifest["max_length"],
                               return_tensors="pt")  # fmt: skip
        logits = self.module._logits(dict(batch)).float()
        out = []
        if task["num_labels"] == 1:
            return [{"label": None, "score": float(v)} for v in logits]
        probs = torch.softmax(logits, dim=-1)
        for row in probs:
            best = int(row.argmax())
            out.append({"label": task["label_names"][best],
                        "scores": {name: float(p) for name, p in zip(task["label_names"], row, strict=True)}})
        return out


def _reorder_experts(block: Any, order: torch.Tensor) -> None:
    """Make a block's frozen experts follow ``order`` (dense neuron of each expert row), from its current order."""
    current = block.neuron_order
    if torch.equal(current, order):
        return
    m, de, h = block.w1.shape
    take = torch.argsort(current)[order]  # row of the current layout holding each wanted neuron
    with torch.no_grad():
        block.w1.copy_(block.w1.reshape(m * de, h)[take].reshape(m, de, h))
        block.b1.copy_(block.b1.reshape(-1)[take].reshape(m, de))
        block.w2t.copy_(block.w2t.reshape(m * de, h)[take].reshape(m, de, h))
    block.neuron_order = order.clone()


def load_exported(path: str | Path) -> ExportedModel:
    """Rebuild an exported tier model; every file is checked against the manifest's checksum first."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError("export", str(root), f"a directory written by ubsmoe.export (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError("export", str(root), f"an export of format {FORMAT} (got {manifest.get('format')!r})")
    for name, expected in manifest["files"].items():
        if not (root / name).is_file() or _sha256(root / name) != expected:
            raise ConfigError("export", str(root / name), "the file the manifest lists, unchanged (checksum differs)")
    model = _settings_from_dict(ModelSettings, manifest["model"])
    # The experts are rebuilt from the backbone by weights and then put in the exported
    # neuron order; what the data decided (router, skip defaults) is in the file, so
    # loading needs no training text.
    model = dataclasses.replace(
        model, router_init="zeros", moefy=dataclasses.replace(model.moefy, method="weights", skip_defaults=False)
    )
    method = _settings_from_dict(MethodSettings, manifest["method"])
    info = manifest["task"]
    task = TASKS.get(info["name"]) or GlueTask(  # a user task (data.custom) is described by the manifest
        info["name"], tuple(info["text_fields"]), info["num_labels"], tuple(info["label_names"]), ("validation",),
        info["main_metric"],
    )
    module = FederatedClassifier(model=model, method=method, num_labels=task.num_labels, metrics=build_metrics(task),
                                 num_tiers=manifest["num_tiers"], init_seed=manifest["init_seed"],
                                 main_metric=task.main_metric)  # fmt: skip
    tensors = load_file(str(root / WEIGHTS))
    for layer, block in module.blocks.items():
        order = tensors.get(f"neuron_order/{layer}")
        if order is not None and hasattr(block, "neuron_order"):
            _reorder_experts(block, order)
        block.set_skip_default(tensors.get(f"skip_default/{layer}"))
    tier = manifest["tier"]
    module.set_client(k=tier["k"], rank=tier["rank"], tier_index=tier["index"])
    module.set_base_deltas({k.removeprefix("base/"): v for k, v in tensors.items() if k.startswith("base/")})
    module.load_trainable_state({k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")})
    module.set_pg_defaults({k.removeprefix("pg/"): v for k, v in tensors.items() if k.startswith("pg/")})
    module.eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path(model.backbone))
    return ExportedModel(module=module, tokenizer=tokenizer, manifest=manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ubsmoe.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory (with .hydra/ and checkpoints/)")
    parser.add_argument("--tier", action="append", help="tier name (repeatable; default: every tier)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    try:
        for path in export_run(args.run_dir, args.out, args.tier):
            print(path)
    except ConfigError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
