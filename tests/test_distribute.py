"""Distribution: the meta-batch spreads over replicas, and λ follows the same path as on one
device (issue #3, "Distribution").

Three subprocesses run tests/distribute_worker.py at the same time (TF's devices and
strategies are set up once per process): MirroredStrategy over 2 logical CPU devices, and
MultiWorkerMirroredStrategy over 2 worker processes on 127.0.0.1. Meanwhile this process
computes the single-device reference on the same tasks. In float64 with plain SGD on λ, the
hyperparameters after 3 steps (which carry the hypergradients) must agree to 1e-6; so must
the hyper model's BatchNorm statistics (averaged over tasks and replicas) and the outer loss.

XLA: TF 2.21 on CPU cannot compile the replicated step (no XLA:CPU kernels for collective
ops; MirroredStrategy over logical CPUs also hits XLA's "variable on a different device"),
so all runs here use jit_compile=False. (With inner_init="random", XLA and TF kernels also
draw different w0, so an XLA reference would not be comparable.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import distribute_worker as problem

pytestmark = pytest.mark.slow  # every test here starts Python processes

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("distribute_worker.py")
TIMEOUT = 300  # seconds; a worker stuck in a collective must fail the test, not hang it
TOLERANCE = 1e-6


def _free_loopback_ports(count: int) -> list[int]:
    """Ports the OS hands out on 127.0.0.1, all held open together so that they differ."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _launch(mode: str, output: Path, tf_config: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    with open(output.with_suffix(".log"), "wb") as log:  # a file, not a pipe: nothing blocks on a full pipe
        return subprocess.Popen(
            [sys.executable, str(WORKER), "--mode", mode, "--output", str(output)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )


class Runs:
    """The three subprocesses, started together; `result(name)` waits for one."""

    def __init__(self, directory: Path):
        ports = _free_loopback_ports(2)
        cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
        self.outputs = {
            "mirrored": directory / "mirrored.npz",
            "worker0": directory / "worker0.npz",
            "worker1": directory / "worker1.npz",
        }
        self.processes = {
            "mirrored": _launch("mirrored", self.outputs["mirrored"]),
            **{
                f"worker{i}": _launch("multi_worker", self.outputs[f"worker{i}"],
                                      {"cluster": cluster, "task": {"type": "worker", "index": i}})
                for i in range(2)
            },
        }
        self.deadline = time.monotonic() + TIMEOUT

    def result(self, name: str) -> dict:
        process = self.processes[name]
        log = self.outputs[name].with_suffix(".log")
        try:
            process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{name} did not finish within {TIMEOUT} s:\n{log.read_text(errors='replace')[-3000:]}")
        assert process.returncode == 0, f"{name} failed:\n{log.read_text(errors='replace')[-3000:]}"
        with np.load(self.outputs[name]) as data:
            return {key: data[key] for key in data.files}

    def kill(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    started = Runs(tmp_path_factory.mktemp("distribute"))
    yield started
    started.kill()  # only if a test failed before waiting for them


@pytest.fixture(scope="module")
def single_device(runs) -> dict:  # requests `runs` so that the subprocesses start first
    """The same STEPS hyper-iterations on one device (computed while they run)."""
    return problem.train(problem.make_trainer(jit_compile=False), problem.task_stream())


@pytest.fixture(scope="module")
def initial_hyperparameters() -> np.ndarray:
    trainer = problem.make_trainer(jit_compile=False)
    trainer.build_from_spec(problem.task_stream().element_spec)
    return np.concatenate([np.ravel(v.numpy()) for v in trainer.hyper_variables])


def _assert_same_path(distributed: dict, reference: dict, initial: np.ndarray) -> None:
    moved = np.max(np.abs(reference["hyperparameters"] - initial))
    assert moved > 1e3 * TOLERANCE, "λ barely moved: the comparison would not be informative"
    np.testing.assert_allclose(distributed["hyperparameters"], reference["hyperparameters"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(distributed["hyper_state"], reference["hyper_state"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(distributed["loss"], reference["loss"], rtol=1e-6)
    assert int(distributed["meta_step"]) == problem.STEPS and int(distributed["num_replicas"]) == 2


def test_mirrored_strategy_on_two_devices_matches_one_device(runs, single_device, initial_hyperparameters):
    _assert_same_path(runs.result("mirrored"), single_device, initial_hyperparameters)


def test_multi_worker_mirrored_strategy_on_two_processes_matches_one_device(runs, single_device, initial_hyperparameters):
    workers = [runs.result("worker0"), runs.result("worker1")]
    for worker in workers:
        _assert_same_path(worker, single_device, initial_hyperparameters)
    np.testing.assert_array_equal(workers[0]["hyperparameters"], workers[1]["hyperparameters"])


def test_the_comparison_sees_a_missing_replica(single_device):
    """Training on one replica's share of every meta-batch (tasks 0,1 | 4,5 | 8,9) ends far
    from the all-replica path: the 1e-6 agreement above is not a coincidence of the data."""
    shares = [i for step in range(problem.STEPS) for i in range(step * problem.TASKS_PER_STEP, step * problem.TASKS_PER_STEP + 2)]
    one_replica = problem.train(problem.make_trainer(jit_compile=False), problem.task_stream(shares))
    distance = np.max(np.abs(one_replica["hyperparameters"] - single_device["hyperparameters"]))
    assert distance > 1e3 * TOLERANCE
