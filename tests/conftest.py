"""Shared pytest configuration and helpers for the tf_bilevel test suite.

* TF_CPP_MIN_LOG_LEVEL is set before TensorFlow is imported anywhere, and XLA_FLAGS compiles
  XLA's CPU code without LLVM optimization (the same HLO, compiled faster; see below).
* `mode` is a fixture parametrized over the three ways the engine runs:
    "function"  hypergradient_fn(jit_compile=False): a plain tf.function graph,
    "xla"       hypergradient_fn(jit_compile=True): compiled by XLA on CPU,
    "user_xla"  hg.compute(...) called inside the user's own tf.function(jit_compile=True)
                (the Keras train_step path).
  A test that takes `make_hg` runs once per mode; `@pytest.mark.parametrize("mode", [...])`
  overrides the set of modes for one test.
* `ridge` is a small ridge-regression bilevel problem with its closed form
  (w*(λ) and d_λ f by the implicit function theorem, all in numpy).
* Two tiers: a test that starts a Python process (a program, a worker, `python -c`) must be
  marked `@pytest.mark.slow`, or it fails with a message saying so; `pytest -m "not slow"` is
  the fast tier a developer runs after each change.
* Under `--dist loadfile` the files go to the workers longest first (their seconds in CI, in
  tests/test_seconds.json), not in xdist's order of their number of tests, so no long file runs
  alone at the end. After a CI run, `python tools/test_seconds.py REPORTS/fast.xml REPORTS/slow.xml`
  (REPORTS: the folder `.ci/run` prints; more runs' reports are averaged) rewrites the JSON.
* With the environment variable CI set, a skipped test fails (a missing data source or tool
  must not hide a whole area in CI).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA's CPU backend without LLVM's optimization passes: the same HLO (every XLA pass, fusion and
# op support, which is what the XLA tests check as the proxy for the GPU path) compiles in less
# time, and the test sizes are too small for the machine code's speed to matter. Inherited by
# the programs the slow tier starts. Speed is measured by the benchmarks, never under pytest.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import json  # noqa: E402
import multiprocessing.process  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Under pytest-xdist (`-n 2` on 2 cores) the workers share the cores: one intra-op thread per
# worker's share, not one per core each (their spinning threads otherwise take CPU from the other
# worker). test_meta_batch.py: 147.7 -> 131.6 CPU s under load. Programs the tests start keep
# TensorFlow's defaults.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    tf.config.threading.set_intra_op_parallelism_threads(max(1, (os.cpu_count() or 1) // _workers))

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import tf_bilevel as tfb  # noqa: E402

# Every test builds new tf.functions on purpose; TF's "excessive retracing" warning is noise here
# (retracing is asserted explicitly with hg.tracing_count in test_compilation.py).
tf.get_logger().setLevel("ERROR")

EXECUTION_MODES = ("function", "xla", "user_xla")


# ---------------------------------------------------------------------------------------
# Two tiers: an unmarked test that starts a Python process fails.
# ---------------------------------------------------------------------------------------

_running: list = [None]  # the test item whose setup, call or teardown runs now


def _is_python(argv: Any, executable: Any) -> bool:
    if executable is not None:
        program = executable
    elif isinstance(argv, (str, bytes, os.PathLike)):
        program = argv
    else:
        argv = list(argv)
        program = argv[0] if argv else ""
    name = os.path.basename(os.fsdecode(program)).split()[0] if program else ""
    return name.startswith("python") or os.fsdecode(program) == sys.executable


def _refuse_in_fast_tier(what: str) -> None:
    item = _running[0]
    if item is None or item.get_closest_marker("slow") is not None:
        return
    message = (f"{item.nodeid} {what} but is not marked @pytest.mark.slow: a test that starts a Python "
               f"process or runs a program belongs to the slow tier (README, testing notes)")
    item.stash[_UNMARKED] = message  # reported even if the test catches the error
    raise UnmarkedSlowTestError(message)


class UnmarkedSlowTestError(RuntimeError):
    pass


_UNMARKED = pytest.StashKey[str]()
_popen_init = subprocess.Popen.__init__
_process_start = multiprocessing.process.BaseProcess.start


def _checked_popen_init(self, args, *rest, **kwargs):
    if _is_python(args, kwargs.get("executable")):
        shown = args if isinstance(args, (str, bytes)) else " ".join(map(os.fsdecode, args))
        _refuse_in_fast_tier(f"starts a Python process ({str(shown)[:160]})")
    _popen_init(self, args, *rest, **kwargs)


def _checked_process_start(self):
    _refuse_in_fast_tier(f"starts a multiprocessing process ({self.name})")
    _process_start(self)


subprocess.Popen.__init__ = _checked_popen_init
multiprocessing.process.BaseProcess.start = _checked_process_start


# ---------------------------------------------------------------------------------------
# `--dist loadfile` hands out the longest files first.
# ---------------------------------------------------------------------------------------

# Seconds each file's tests took in CI, per tier (tests/test_seconds.json). Advisory: it only
# orders the files (a stale entry costs balance, never correctness); a file not listed, or no
# JSON or a malformed one (with a warning), counts 1 s per selected test.
SECONDS_FILE = Path(__file__).with_name("test_seconds.json")


def _ci_seconds() -> dict[str, dict[str, float]]:
    try:
        table = json.loads(SECONDS_FILE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:  # not JSON (or not UTF-8)
        table = None
    if isinstance(table, dict) and all(
        isinstance(tiers, dict) and set(tiers) == {"fast", "slow"}
        and all(isinstance(s, (int, float)) for s in tiers.values()) for tiers in table.values()
    ):
        return table
    warnings.warn(f"{SECONDS_FILE} is not {{file: {{'fast': s, 'slow': s}}}} (rewrite it with tools/test_seconds.py): "
                  "files are ordered as if each test took 1 s", stacklevel=1)
    return {}


def pytest_configure(config):
    # xdist hands files to the workers in the order of their number of tests unless told not to,
    # which puts a long file with few tests (online_hpo: about 300 s in 2) last, alone on one core.
    # Collection order instead (longest first, below): the order of `--no-loadscope-reorder`.
    if _loadfile(config):
        config.option.loadscopereorder = False


def _loadfile(config) -> bool:
    return getattr(config.option, "dist", None) == "loadfile"


@pytest.hookimpl(trylast=True)  # after `-m` deselected the other tier
def pytest_collection_modifyitems(session, config, items):
    """Files longest first (their CI seconds in the selected tiers), so the last files handed
    out are short and the workers end together; a file's own order is kept. Only in xdist's
    workers, whose collection order the controller hands out: without xdist the order given on
    the command line stands."""
    if not hasattr(config, "workerinput"):  # not an xdist worker (xdist sets its dist to "no")
        return
    known, cost = _ci_seconds(), {}
    for item in items:
        stem, tier = item.path.stem, "slow" if item.get_closest_marker("slow") is not None else "fast"
        tiers = cost.setdefault(stem, {"fast": 0.0, "slow": 0.0})
        tiers[tier] = known[stem][tier] if stem in known else tiers[tier] + 1.0
    items.sort(key=lambda item: -sum(cost[item.path.stem].values()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item
    try:
        yield
    finally:
        _running[0] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    unmarked = item.stash.get(_UNMARKED, None)
    if unmarked is not None and report.when in ("setup", "call") and not report.failed:
        report.outcome, report.longrepr = "failed", unmarked
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (f"skipped with CI set ({reason}): in CI a missing data source or tool fails the run; "
                           "provide it (see .ci/run)")


class ModeRunner(NamedTuple):
    """A hypergradient built for one execution mode, called like `hg`."""

    hg: tfb.Hypergradient
    mode: str
    call: Callable[..., tuple]  # (params, hparams[, inner_batch, outer_batch]) -> (value, hypergrad)
    detailed: Callable[..., tfb.HypergradientResult]
    tracing_count: Callable[[], int]  # traces of the outermost tf.function

    def __call__(self, *args):
        return self.call(*args)


def build_for_mode(mode: str, inner_loss, outer_loss, **kwargs: Any) -> ModeRunner:
    """`tfb.hypergradient_fn(inner_loss, outer_loss, **kwargs)` run in execution `mode`."""
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}")
    if mode in ("function", "xla"):
        hg = tfb.hypergradient_fn(inner_loss, outer_loss, jit_compile=(mode == "xla"), **kwargs)
        return ModeRunner(hg, mode, hg.__call__, hg.detailed, lambda: hg.tracing_count)

    hg = tfb.hypergradient_fn(inner_loss, outer_loss, jit_compile=False, **kwargs)

    @tf.function(jit_compile=True)
    def user_step(params, hparams, inner_batch=None, outer_batch=None):
        return hg.compute(params, hparams, inner_batch, outer_batch)

    def detailed(*args):
        return user_step(*args)

    def call(*args):
        result = user_step(*args)
        return result.outer_value, result.hypergrad

    return ModeRunner(hg, mode, call, detailed, user_step.experimental_get_tracing_count)


@pytest.fixture(params=EXECUTION_MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def make_hg(mode) -> Callable[..., ModeRunner]:
    """make_hg(inner_loss, outer_loss, **hypergradient_fn_kwargs) in the current `mode`."""

    def make(inner_loss, outer_loss, **kwargs):
        return build_for_mode(mode, inner_loss, outer_loss, **kwargs)

    return make


def flat_numpy(tree: Any) -> np.ndarray:
    """All leaves of a structure (in tf.nest order) as one float64 vector."""
    return np.concatenate([np.reshape(np.asarray(x, np.float64), [-1]) for x in tf.nest.flatten(tree)])


# ---------------------------------------------------------------------------------------
# Ridge regression with a per-coordinate L2 strength: a quadratic inner problem whose
# minimizer and hypergradient are known in closed form.
#   g(w, λ) = ½‖Xw − y‖² + ½ Σ_j exp(λ_j) w_j²
#   f(w, λ) = ½‖X_v w − y_v‖² + ½ c ‖λ‖²            (c > 0 makes ∇_λ f ≠ 0)
#   H = XᵀX + diag(e^λ),  w*(λ) = H⁻¹ Xᵀ y
#   d_λ f = ∇_λ f − ∇_λw g H⁻¹ ∇_w f,  with ∇_λw g = diag(e^λ ⊙ w*)            (Eq. 11)
# ---------------------------------------------------------------------------------------


class Ridge(NamedTuple):
    X: np.ndarray
    y: np.ndarray
    Xv: np.ndarray
    yv: np.ndarray
    lam: np.ndarray
    outer_l2: float
    learning_rate: float

    # -- TF losses (params = {"w": (d,)}, hparams = {"log_l2": (d,)}) --
    def inner_loss(self, params, hparams):
        return self.inner_loss_batch(params, hparams, (self.X, self.y))

    def outer_loss(self, params, hparams):
        return self.outer_loss_batch(params, hparams, (self.Xv, self.yv))

    def inner_loss_batch(self, params, hparams, batch):
        X, y = batch
        w = params["w"]
        residual = tf.linalg.matvec(X, w) - y
        return 0.5 * tf.reduce_sum(residual**2) + 0.5 * tf.reduce_sum(tf.exp(hparams["log_l2"]) * w**2)

    def outer_loss_batch(self, params, hparams, batch):
        X, y = batch
        residual = tf.linalg.matvec(X, params["w"]) - y
        return 0.5 * tf.reduce_sum(residual**2) + 0.5 * self.outer_l2 * tf.reduce_sum(hparams["log_l2"] ** 2)

    # -- numpy closed form --
    def hessian(self, lam=None, X=None) -> np.ndarray:
        lam = self.lam if lam is None else lam
        X = self.X if X is None else X
        return X.T @ X + np.diag(np.exp(lam))

    def w_star(self, lam=None, X=None, y=None) -> np.ndarray:
        X = self.X if X is None else X
        y = self.y if y is None else y
        return np.linalg.solve(self.hessian(lam, X), X.T @ y)

    def outer_grads(self, w, lam=None, Xv=None, yv=None) -> tuple[np.ndarray, np.ndarray]:
        """(∇_w f, ∇_λ f) at (w, λ)."""
        lam = self.lam if lam is None else lam
        Xv = self.Xv if Xv is None else Xv
        yv = self.yv if yv is None else yv
        return Xv.T @ (Xv @ w - yv), self.outer_l2 * lam

    def outer_value(self, w, lam=None, Xv=None, yv=None) -> float:
        lam = self.lam if lam is None else lam
        Xv = self.Xv if Xv is None else Xv
        yv = self.yv if yv is None else yv
        return 0.5 * np.sum((Xv @ w - yv) ** 2) + 0.5 * self.outer_l2 * np.sum(lam**2)

    def implicit_hypergradient(self, lam=None, X=None, y=None, Xv=None, yv=None) -> np.ndarray:
        """d_λ f at w*(λ) by the implicit function theorem (Eq. 11)."""
        lam = self.lam if lam is None else lam
        w = self.w_star(lam, X, y)
        grad_w, grad_lam = self.outer_grads(w, lam, Xv, yv)
        return grad_lam - np.exp(lam) * w * np.linalg.solve(self.hessian(lam, X), grad_w)

    def neumann_hypergradient(self, terms: int, lam=None) -> np.ndarray:
        """Eq. 11 with H⁻¹ replaced by the partial sum γ Σ_{k<K} (I − γH)^k (Eq. 12), at w*."""
        lam = self.lam if lam is None else lam
        w = self.w_star(lam)
        grad_w, grad_lam = self.outer_grads(w, lam)
        H = self.hessian(lam)
        A = np.eye(len(w)) - self.learning_rate * H
        total, term = np.zeros_like(grad_w), grad_w.copy()
        for _ in range(terms):
            total += term
            term = A @ term
        return grad_lam - np.exp(lam) * w * (self.learning_rate * total)

    def contraction(self, lam=None) -> float:
        """‖I − γH‖₂: the linear rate of gradient descent on g."""
        H = self.hessian(lam)
        return float(np.max(np.abs(1.0 - self.learning_rate * np.linalg.eigvalsh(H))))


def make_ridge(seed: int = 0, n: int = 12, d: int = 4, outer_l2: float = 0.05) -> Ridge:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) / np.sqrt(n)
    y = X @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    Xv = rng.normal(size=(n, d)) / np.sqrt(n)
    yv = Xv @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    lam = rng.uniform(-1.0, 0.5, size=d)
    H = X.T @ X + np.diag(np.exp(lam))
    learning_rate = float(1.0 / np.max(np.linalg.eigvalsh(H)))  # γ = 1/β
    return Ridge(X, y, Xv, yv, lam, outer_l2, learning_rate)


@pytest.fixture
def ridge() -> Ridge:
    return make_ridge()
