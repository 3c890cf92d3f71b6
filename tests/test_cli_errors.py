"""Every mistake on the command line gets the project's one-line error and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import PROJECT_ROOT, compose_config

from ubsmoe.validate import validate
from ubsmoe.errors import ConfigError
from ubsmoe.schema import check_group_overrides, config_dir, group_options, run_groups


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "src" / "train.py"), *args],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("+federation.roundz=3",), "federation.roundz=3 is not valid"),
        (("federation.roundz=3",), "did you mean federation.rounds?"),
        (("+method.dmr.kapa=2",), "did you mean method.dmr.kappa?"),
        (("method=fedavg",), "method='fedavg' is not valid: one of"),
        (("tiers=three",), "tiers='three' is not valid: one of four, two, uniform"),
    ],
)
def test_cli_refuses_with_one_line_and_exit_2(args: tuple[str, ...], needle: str) -> None:
    proc = _cli(*args, "dry_run=true")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("group", run_groups())
def test_an_unknown_key_in_every_group_is_refused(group: str) -> None:
    cfg = compose_config(f"+{group}.no_such_key=1") if group != "tiers" else compose_config("+no_such_key=1")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key.endswith("no_such_key")


def test_every_group_choice_is_checked_against_its_files() -> None:
    for group in run_groups():
        for option in group_options(group):
            check_group_overrides([f"{group}={option}"])  # every real option passes
        with pytest.raises(ConfigError) as err:
            check_group_overrides([f"{group}=no_such_option"])
        assert err.value.key == group


def test_sweep_lists_are_checked_option_by_option() -> None:
    check_group_overrides(["method=ubsmoe,fedit", "experiment=smoke"])
    with pytest.raises(ConfigError, match="fedavg"):
        check_group_overrides(["method=ubsmoe,fedavg"])


def test_config_dir_is_the_repository_tree() -> None:
    assert config_dir() == PROJECT_ROOT / "configs"


def test_choosing_a_server_optimizer_by_its_key_alone_is_refused_with_the_group_to_use() -> None:
    # server.optimizer=fedadam alone would keep FedAvg's lr 1.0: a silent trap
    with pytest.raises(ConfigError) as err:
        check_group_overrides(["server.optimizer=fedadam"])
    assert err.value.key == "server.optimizer" and "server=fedadam" in str(err.value)
    with pytest.raises(ConfigError, match="one of"):
        check_group_overrides(["server.optimizer=sgd"])
    check_group_overrides(["server=fedadam", "server.optimizer=fedadam"])  # the preset itself: fine
    check_group_overrides(["server=fedadam", "server.lr=0.1"])
