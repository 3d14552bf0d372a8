"""Two nodes of one process each, met by a c10d rendezvous on loopback, equal one process.

The two launchers are the very lines ``tunesmith launch --nodes 2`` renders
(with the address and a free port filled in), started side by side as two
machines would start them: the rendering is exercised for real, not only read.
Both "nodes" share this machine's file system, and so the run folder: only the
process of global rank 0 writes it, and the other waits for it at each barrier.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from distributed_fixtures import TORCHRUN, ddp_config, launcher_env
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.runs.launch import node_command, plan

NODES = 2
TIMEOUT_S = 240


def free_port() -> int:
    """A port free on loopback now (the rendezvous binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_nodes(command: str, env: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    """One shell per node running ``command``, its rank in $NODE_RANK as a scheduler sets it.

    Each node is a session of its own, so a failure kills its launcher's workers too;
    output goes to files, which never fill up and block a node the way a pipe can.
    """
    nodes = []
    for rank in range(NODES):
        with open(logs / f"node{rank}.log", "w") as log:
            nodes.append(
                subprocess.Popen(
                    ["bash", "-c", command],
                    env={**env, "NODE_RANK": str(rank)},
                    cwd=logs,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return nodes


def wait_all(nodes: list[subprocess.Popen], logs: Path, timeout: float) -> None:
    """Wait for every node; on a failure or past ``timeout`` kill them all and show their logs.

    A node left alone after the other failed would wait for it in a collective or in
    the rendezvous for many minutes.
    """
    deadline = time.monotonic() + timeout
    codes = [node.poll() for node in nodes]
    while None in codes and not any(codes) and time.monotonic() < deadline:
        time.sleep(0.2)
        codes = [node.poll() for node in nodes]
    if codes == [0] * NODES:
        return
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    tails = [(logs / f"node{rank}.log").read_text()[-3000:] for rank in range(NODES)]
    codes = [node.returncode for node in nodes]
    pytest.fail(f"nodes exited {codes} (timeout {timeout} s):\n" + "\n---\n".join(tails))


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_two_nodes_equal_one_process_over_the_same_global_batch(tiny_bert, tmp_path):
    single = ddp_config(tiny_bert, tmp_path, tmp_path / "one", batch_size=8)
    train(Config.from_dict(single), progress=False)

    config = tmp_path / "two nodes.yaml"  # a space: the rendered line must quote it
    config.write_text(yaml.safe_dump(ddp_config(tiny_bert, tmp_path, tmp_path / "two", 4)))
    launch = plan(
        Config.load(config),
        config,
        NODES,
        main_address="127.0.0.1",
        port=free_port(),
        progress=False,
    )
    start = time.monotonic()
    wait_all(start_nodes(node_command(launch), launcher_env(), tmp_path), tmp_path, TIMEOUT_S)
    seconds = time.monotonic() - start
    print(f"2 nodes x 1 process: {seconds:.1f} s")

    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max abs weight difference: {worst:.3g}")
    assert worst <= 1e-5, worst
    # One writer: the records of the shared run folder are the one-process run's, none twice.
    records = [(tmp_path / run / "metrics.jsonl").read_text().count("\n") for run in ("one", "two")]
    assert records[0] == records[1] > 0, records
