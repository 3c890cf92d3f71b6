"""How close each MoEfication keeps MiniLM to the dense model, per K, before any fine-tuning.

For every construction (how neurons are grouped, how the router starts, whether skipped
experts' typical output is added back) and every K of M = 8: the cosine of the hidden
states after each layer to the dense model's (token average) and of the mean-pooled final
embeddings (sentence average), on the first 64 SST-2 validation sentences; once with the
construction's router and once with the oracle router (per token the K experts whose output
is furthest from what skipping them adds: their output norm when nothing is added), the
ceiling of any router for those experts. Calibration (recorded activations for the
data-driven parts): 512 SST-2 training sentences drawn with seed 0, the way a run draws its
own from its training split.

Run: ``HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/moefy_quality.py``
(writes ``logs/bench/moefy_quality.json``; a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from ubsmoe.model import resolve_backbone_path
from ubsmoe.smoe.layer import MoEOptions
from ubsmoe.smoe.moefy import moefy
from ubsmoe.smoe.quality import hidden_states, moefied_closeness

ROOT = Path(__file__).resolve().parents[1]
# name -> (method, router_init, skip_defaults). `weights` is the construction that needs no calibration data.
CONSTRUCTIONS = {
    "weights": ("weights", "centroid", False),
    "coactivation": ("coactivation", "fitted", True),
    "coactivation_centroid_noskip": ("coactivation", "centroid", False),
    "coactivation_fitted_noskip": ("coactivation", "fitted", False),
    "weights_fitted_skip": ("weights", "fitted", True),
}
DEFAULT = "coactivation"  # configs/model/minilm.yaml's model.moefy.method / router_init / skip_defaults


def tokenize(tokenizer, sentences: list[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    return [
        dict(tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--glue-dir", type=Path, default=ROOT / "data" / "glue")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--eval-sentences", type=int, default=64)
    parser.add_argument("--calibration-sentences", type=int, default=512)
    parser.add_argument("--constructions", default=",".join(CONSTRUCTIONS))
    parser.add_argument("--cache-dir", type=Path, default=None, help="reuse constructions across runs (default: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench" / "moefy_quality.json")
    args = parser.parse_args()
    from transformers import AutoModel, AutoTokenizer

    path = resolve_backbone_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="sdpa").eval()
    train = pd.read_parquet(args.glue_dir / "sst2" / "train.parquet")
    calibration_text = train.sample(n=args.calibration_sentences, random_state=0)["sentence"].tolist()
    calibration = tokenize(tokenizer, calibration_text, 64, 128)
    val_text = pd.read_parquet(args.glue_dir / "sst2" / "validation.parquet")["sentence"].tolist()[: args.eval_sentences]
    batch = tokenize(tokenizer, val_text, len(val_text), 128)[0]
    reference = hidden_states(dense, batch)
    ks = [int(k) for k in args.ks.split(",")]
    results, timings = [], {}
    for name in args.constructions.split(","):
        method, router_init, skip = CONSTRUCTIONS[name]
        model = copy.deepcopy(dense)
        start, cpu_start = time.perf_counter(), time.process_time()
        blocks = moefy(
            model, num_experts=args.num_experts, router_init=router_init, method=method, skip_defaults=skip,
            calibration=calibration, cache_dir=args.cache_dir,
            options=MoEOptions(lora_rank=0, dmr=False, pg_router=False), generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        timings[name] = {"wall": round(time.perf_counter() - start, 2), "cpu": round(time.process_time() - cpu_start, 2)}
        for k in ks:
            learned = moefied_closeness(model, blocks, batch, reference, k)
            oracle = moefied_closeness(model, blocks, batch, reference, k, oracle=True)
            record = {
                "method": name, "moefy_method": method, "router_init": router_init, "skip_defaults": skip,
                "k": k, "num_experts": args.num_experts,
                "embedding_cosine": round(learned.embedding_cosine, 4),
                "layer_cosine": [round(v, 4) for v in learned.layer_cosine],
                "oracle_embedding_cosine": round(oracle.embedding_cosine, 4),
                "oracle_layer_cosine": [round(v, 4) for v in oracle.layer_cosine],
            }  # fmt: skip
            results.append(record)
            print(f"{name:30s} K={k}: embedding {learned.embedding_cosine:.3f} (oracle {oracle.embedding_cosine:.3f}); "
                  f"layers {[round(v, 3) for v in learned.layer_cosine]}", flush=True)  # fmt: skip
        print(f"{name}: built in {timings[name]['wall']} s ({timings[name]['cpu']} s of CPU)", flush=True)
    out = {
        "default": DEFAULT,
        "constructions": {n: dict(zip(("moefy_method", "router_init", "skip_defaults"), CONSTRUCTIONS[n], strict=True))
                          for n in args.constructions.split(",")},  # fmt: skip
        "eval": f"first {args.eval_sentences} SST-2 validation sentences, max_length 128",
        "calibration": f"{args.calibration_sentences} SST-2 training sentences (pandas sample, random_state 0)",
        "build_seconds": timings,  # wall and process CPU time of each construction (no cache)
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
