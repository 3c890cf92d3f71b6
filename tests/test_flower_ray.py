"""The real Ray simulation: ``backend=flower`` (2 workers) equals ``backend=local``, on loopback only."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import psutil
import pytest
from flower_helpers import TINY, assert_same_final_state, assert_same_metrics
from helpers import compose_config

from ubsmoe.runner import run_experiment

pytestmark = pytest.mark.slow



def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped 127.x (``::ffff:127.0.0.1``); never a wildcard."""
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class ListenWatch:
    """Samples the listening sockets of this process and its descendants (Ray's GCS, raylet, actors)."""

    def __init__(self) -> None:
        self.addresses: set[tuple[str, int, str]] = set()
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.5):
            try:
                procs = [me, *me.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    self.pids.add(proc.pid)
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            self.addresses.add((conn.laddr.ip, conn.laddr.port, proc.name()))
                except psutil.Error:
                    continue

    def __enter__(self) -> ListenWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_ray_simulation_equals_local_and_stays_on_loopback(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    common = (*TINY, "federation.rounds=2", f"data.local_dir={glue_dir}", f"paths.cache_dir={cache_dir}")
    run_experiment(compose_config(*common, f"paths.output_dir={tmp_path / 'local'}"))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with ListenWatch() as watch:
        run_experiment(
            compose_config(
                *common,
                f"paths.output_dir={tmp_path / 'ray'}",
                "backend=flower",
                "backend.mode=simulation",
                "backend.num_workers=2",
                "backend.client_cpus=1",
                # Ray's actors import torch before they answer the first query: on a loaded
                # machine that took more than the default 60 s, and every client then counted as failed
                "backend.node_wait=600",
            )
        )
    try:
        assert_same_metrics(tmp_path / "local", tmp_path / "ray")
        assert_same_final_state(tmp_path / "local", tmp_path / "ray")
        assert watch.addresses, "the watcher saw no listening socket: Ray did not run?"
        outward = {a for a in watch.addresses if not is_loopback(a[0])}
        assert not outward, f"listening beyond loopback: {outward}"
    finally:
        # Ray is shut down by the simulation; anything it left behind is stopped by pid.
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for proc in left:
            proc.terminate()
        _, alive = psutil.wait_procs(left, timeout=15)
        for proc in alive:
            proc.kill()
