"""Reading run directories for the figures: metrics files, Hydra overrides, variants, tables.

Everything here reads only the two metrics files a run writes (``metrics.jsonl`` and
``experts.jsonl``, schema in :mod:`ubsmoe.callbacks.metrics_writer`) and, when present,
Hydra's ``.hydra/overrides.yaml`` beside them. Nothing talks to W&B's servers, so a sweep
can be plotted from disk, offline, long after it ran.

Runs that share a *variant* (the method plus every Hydra override that differs between the
runs being compared, except the seed) are one line: the mean over their seeds, with a band
from the lowest to the highest seed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

METRICS_FILE = "metrics.jsonl"
EXPERTS_FILE = "experts.jsonl"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
RUN_DIRS_ENV = "UBSMOE_RUN_DIRS"

# Overrides that never distinguish one variant from another: where a run writes, how it
# logs, and the seed (runs that differ only by seed are averaged into one line).
# The method group itself is not listed: a variant label starts with the method's name anyway.
_NOT_A_VARIANT = ("seed", "paths", "hydra", "logger", "fabric", "callbacks", "data.local_dir", "resume", "debug",
                  "dry_run")
# Short names for the override keys that most often label a variant.
_SHORT_KEYS = {"federation.dirichlet_alpha": "alpha", "federation.partition": "partition"}


class RunDirError(ValueError):
    """A run directory that cannot be plotted (missing or malformed metrics files); names the path."""


# ------------------------------------------------------------------------------------ loading
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: is {path.parent} a run directory (it should hold {path.name})?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RunDirError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    return records


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """One row per (round, tier) of ``RUN_DIR/metrics.jsonl``, sorted by round.

    The task metrics dict is also spread into columns ``val_<name>`` (e.g. ``val_accuracy``),
    and ``run`` holds the run directory. A resumed run that rewrote a round keeps its last record.
    """
    run_dir = Path(run_dir)
    records = _read_jsonl(run_dir / METRICS_FILE)
    if not records:
        raise RunDirError(f"{run_dir / METRICS_FILE} has no rounds yet: nothing to plot")
    frame = pd.DataFrame.from_records(records)
    missing = {"round", "tier", "method", "main_metric", "train_loss"} - set(frame.columns)
    if missing:
        raise RunDirError(
            f"{run_dir / METRICS_FILE} lacks the fields {sorted(missing)}: not a metrics file of this project"
        )
    frame = frame.drop_duplicates(subset=["round", "tier"], keep="last")
    frame = frame.sort_values("round", kind="stable").reset_index(drop=True)
    spread = pd.DataFrame.from_records([m or {} for m in frame["metrics"]], index=frame.index)
    for name in spread.columns:
        frame[f"val_{name}"] = spread[name].astype(float)
    frame["run"] = str(run_dir)
    return frame


def load_experts(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/experts.jsonl`` (one per round, sorted; a rewritten round keeps its last)."""
    by_round = {r["round"]: r for r in _read_jsonl(Path(run_dir) / EXPERTS_FILE)}
    return [by_round[k] for k in sorted(by_round)]


def run_overrides(run_dir: str | Path) -> dict[str, str]:
    """The command-line overrides Hydra saved for this run (``.hydra/overrides.yaml``), as key -> value."""
    path = Path(run_dir) / OVERRIDES_FILE
    if not path.is_file():
        return {}
    import yaml

    out: dict[str, str] = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _is_variant_key(key: str) -> bool:
    return key != "method" and not any(key == p or key.startswith(p + ".") for p in _NOT_A_VARIANT)


def _short_key(key: str) -> str:
    return _SHORT_KEYS.get(key, key.removeprefix("method."))


def load_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """``load_metrics`` of every run, concatenated, with a ``variant`` column naming each line of a plot.

    The variant is the method plus the overrides whose values differ between these runs
    (seed and output settings excluded); each such override also becomes a column, so
    ``df[df["alpha"] == "0.1"]`` picks a slice before plotting.
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise RunDirError("no run directories given")
    frames = [load_metrics(d) for d in dirs]
    overrides = [run_overrides(d) for d in dirs]
    keys = sorted({k for o in overrides for k in o if _is_variant_key(k)})
    differing = [k for k in keys if len({o.get(k, "(default)") for o in overrides}) > 1]
    for frame, over in zip(frames, overrides, strict=True):
        parts = [str(frame["method"].iloc[0])]
        for key in differing:
            value = over.get(key, "(default)")
            frame[_short_key(key)] = value
            parts.append(f"{_short_key(key)}={value}")
        frame["variant"] = " ".join(parts)
    return pd.concat(frames, ignore_index=True)


def run_label(run_dir: str | Path, others: Sequence[str | Path] = ()) -> str:
    """A short unique name for a run directory: its path below the runs' common parent, '/' -> '_'."""
    run_dir = Path(run_dir).resolve()
    paths = [run_dir, *(Path(o).resolve() for o in others)]
    if len(paths) == 1:
        return run_dir.name
    parent = Path(os.path.commonpath(paths))
    rel = run_dir.relative_to(parent)
    label = "_".join(rel.parts) or run_dir.name
    if run_dir.name.isdigit():  # a multirun job directory: name it by its overrides, not "0", "1"
        overrides = run_overrides(run_dir)
        others_overrides = [run_overrides(o) for o in others]
        differing = [k for k in overrides if _is_variant_key(k) or k == "method"]
        differing = [k for k in differing if len({o.get(k) for o in [overrides, *others_overrides]}) > 1]
        if differing:
            label += "_" + "_".join(f"{_short_key(k)}={overrides[k]}" for k in differing)
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "-", label)


# ------------------------------------------------------------------------------------ run dirs for notebooks
def project_root() -> Path:
    """The project directory: $PROJECT_ROOT, else the first of cwd and its parents holding configs/train.yaml."""
    if os.environ.get("PROJECT_ROOT"):
        return Path(os.environ["PROJECT_ROOT"])
    for candidate in (Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents):
        if (candidate / "configs" / "train.yaml").is_file():
            return candidate
    return Path.cwd()


def newest_run_dir(runs_root: str | Path | None = None) -> Path:
    """The directory under ``logs/runs/`` whose metrics.jsonl was written last."""
    root = Path(runs_root) if runs_root is not None else project_root() / "logs" / "runs"
    candidates = list(root.rglob(METRICS_FILE)) if root.is_dir() else []
    if not candidates:
        raise RunDirError(
            f"no run directory with {METRICS_FILE} under {root}: run `make smoke`, or name run directories "
            f"in RUN_DIRS or ${RUN_DIRS_ENV} (colon-separated)"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime).parent


def resolve_run_dirs(run_dirs: Sequence[str | Path] = (), runs_root: str | Path | None = None) -> list[Path]:
    """The run directories a notebook plots: those given, else $UBSMOE_RUN_DIRS, else the newest run.

    Each is checked to hold a metrics.jsonl, so a typo fails here with the path in the message.
    """
    if run_dirs:
        dirs = [Path(d) for d in run_dirs]
    elif os.environ.get(RUN_DIRS_ENV):
        dirs = [Path(d) for d in os.environ[RUN_DIRS_ENV].split(os.pathsep) if d]
    else:
        dirs = [newest_run_dir(runs_root)]
    for d in dirs:
        if not (d / METRICS_FILE).is_file():
            raise RunDirError(f"{d} has no {METRICS_FILE}: not a run directory")
    return dirs


# ------------------------------------------------------------------------------------ tables
def tier_order(df: pd.DataFrame) -> list[str]:
    """Tier names from the weakest budget to the strongest."""
    tiers = df[["tier", "beta"]].drop_duplicates("tier") if "beta" in df else df[["tier"]].drop_duplicates()
    if "beta" in tiers:
        tiers = tiers.sort_values("beta", kind="stable")
    return [str(t) for t in tiers["tier"]]


def main_metric_name(df: pd.DataFrame) -> str | None:
    """Which task metric ``main_metric`` is (the metrics key equal to it on every evaluated row)."""
    evaluated = df[df["main_metric"].notna()]
    if evaluated.empty:
        return None
    for column in (c for c in df.columns if c.startswith("val_")):
        if np.allclose(evaluated[column].to_numpy(dtype=float), evaluated["main_metric"].to_numpy(dtype=float)):
            return column.removeprefix("val_")
    return None


def final_table(df: pd.DataFrame, metric: str = "main_metric") -> pd.DataFrame:
    """Variant x tier: ``metric`` at each run's last evaluated round, averaged over runs (seeds).

    The ``mean`` column is the mean over tiers, the number a sweep optimises.
    """
    df = with_variant(df)
    evaluated = df[df[metric].notna()]
    if evaluated.empty:
        return pd.DataFrame()
    last_round = evaluated.groupby("run")["round"].transform("max")
    last = evaluated[evaluated["round"] == last_round]
    table = last.pivot_table(index="variant", columns="tier", values=metric, aggfunc="mean")
    table = table[[t for t in tier_order(df) if t in table.columns]]
    per_run = last.groupby(["variant", "run"])[metric].mean().groupby("variant").mean()
    table["mean"] = per_run
    table.columns.name = None
    return table


def with_variant(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``variant`` column: the one :func:`load_runs` wrote, else the method."""
    return df if "variant" in df else df.assign(variant=df["method"])
