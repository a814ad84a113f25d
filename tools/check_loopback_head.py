"""Which addresses a local ``ray start --head --node-ip-address=127.0.0.1`` listens on, without and
with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the README's "Submitting to Ray" says to set it).

    python tools/check_loopback_head.py

For each setting it starts a head (``RAY_AUTH_MODE=disabled``, every port a free non-default one, its
own temp dir and process group), waits for the dashboard, lists the listening TCP sockets of every
process the head started (psutil), then stops exactly those processes by PID (never ``ray stop``,
which would stop every Ray on the machine). Prints one line per setting: the non-loopback listening
addresses and the loopback ones.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_group(pgid: int) -> set[int]:
    """Every process of the head's process group (also those re-parented away from ``ray start``)."""
    pids = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                pids.add(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return pids


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _listening(pids: set[int]) -> set[tuple[str, int, str]]:
    found = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def check(cluster_switch: str | None) -> str:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    if cluster_switch is None:
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    else:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = cluster_switch
    dashboard = _port()
    temp_dir = tempfile.mkdtemp(prefix="rayl")
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={_port()}",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={_port()}",
        f"--dashboard-agent-grpc-port={_port()}",
        f"--metrics-export-port={_port()}",
        f"--runtime-env-agent-port={_port()}",
        f"--ray-client-server-port={_port()}",
        "--num-cpus=1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    return f"switch={cluster_switch}: the head did not come up"
                time.sleep(1)
        time.sleep(15)  # the agents open their ports after the dashboard answers
        sockets = _listening(_process_group(head.pid))
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's own process group: only what it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    exposed = sorted(f"{ip}:{port} ({name})" for ip, port, name in sockets if not _is_loopback(ip))
    loopback = sorted(f"{ip}:{port} ({name})" for ip, port, name in sockets if _is_loopback(ip))
    return (
        f"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER={cluster_switch or '(unset)'}: "
        f"{len(exposed)} listening on other addresses {exposed}; {len(loopback)} on loopback {loopback}"
    )


if __name__ == "__main__":
    for switch in (None, "0"):
        print(check(switch), flush=True)
