"""online_hpo's learned hyperparameters stay in the tuners' search space (--bound_hyperparameters):
log λ is clipped after each outer step (tfb.Hyperparameter(transform="exp", bounds=...)); inside the
bounds the clip changes nothing, bit for bit."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `experiments` is not an installed package.
from experiments import online_hpo as H  # noqa: E402
from experiments.common import online_program as oc  # noqa: E402
from test_online_hpo import _random_data  # noqa: E402


def _run(method: str, **config) -> dict:
    cfg = H.Config(epochs=1, n_val=128, hp_every=1, **config).validated().for_seed(0)
    return H.run_bilevel(cfg, _random_data(n_train=256), "cnn", method, oc.MethodStore(tempfile.mkdtemp()), "run")


def _recorded(row: dict) -> dict:
    """Every recorded value of each hyperparameter over the run (weight decays flattened)."""
    values: dict = {}
    for hp in row["record"]["hp"] + [row["hyperparameters"]]:
        for name, value in hp.items():
            values.setdefault(name, []).extend(np.ravel(value).tolist())
    return values


def test_learned_hyperparameters_clip_log_lambda_to_the_bounds_only_with_the_flag():
    bounded = H.learned(H.Config().validated(), 5e-4, (1e-4, 1e-2))
    assert bounded.transform == "exp" and bounded.bounds == (1e-4, 1e-2)
    raw = tf.constant([math.log(1e-6), math.log(5e-4), math.log(3e-3), math.log(1.0)], tf.float32)
    clipped = bounded.raw_constraint(raw).numpy()
    # outside: held on log(low), log(high) in float32 (within an ulp), with λ = exp(ν) inside the bounds
    np.testing.assert_allclose(clipped[[0, 3]], np.float32([math.log(1e-4), math.log(1e-2)]), rtol=2e-7)
    assert 1e-4 <= np.exp(np.float64(clipped[0])) and np.exp(np.float64(clipped[3])) <= 1e-2
    np.testing.assert_allclose(np.exp(clipped), [1e-4, 5e-4, 3e-3, 1e-2], rtol=1e-6)
    assert clipped[1] == raw.numpy()[1] and clipped[2] == raw.numpy()[2]  # inside: the same float
    free = H.learned(H.Config(bound_hyperparameters=False).validated(), 5e-4, (1e-4, 1e-2))
    assert free.bounds is None and free.raw_constraint is None


def test_bounds_are_the_tuners_search_space():
    cfg = H.Config(weight_decay_range=(1e-6, 1e-2), lr_range=(1e-3, 0.3), final_lr_fraction=0.01).validated()
    bounds = H.hyperparameter_bounds(cfg)
    assert bounds["weight_decay"] == (1e-6, 1e-2) and bounds["learning_rate"] == (1e-3, 0.3)
    assert bounds["lr_end"] == pytest.approx((1e-5, 3e-3))


@pytest.mark.parametrize("flag, value", [("init_weight_decay", 0.1), ("init_lr", 0.5)])
def test_an_initial_value_outside_the_bounds_is_refused_by_name(flag, value):
    with pytest.raises(ValueError, match=f"--{flag}={value} is outside the search space"):
        H.Config(**{flag: value}).validated()
    H.Config(bound_hyperparameters=False, **{flag: value}).validated()  # unbounded: allowed


@pytest.mark.parametrize("method", ["bilevel_T1", pytest.param("forward", marks=pytest.mark.slow)])
def test_a_huge_outer_step_keeps_every_hyperparameter_in_bounds_and_leaves_them_unbounded(method):
    # Adam 3.0 on log λ moves each hyperparameter by ~e^3 per hyper-iteration (2 here): unbounded, the
    # decays and γ leave the tuners' space within a few steps (the control); bounded, they stay.
    if method == "forward" and not H.has_online_forward():
        pytest.skip("online forward mode not in this tf_bilevel")
    bounded, free = (_recorded(_run(method, outer_lr=3.0, bound_hyperparameters=b)) for b in (True, False))
    cfg = H.Config().validated()
    limits = H.hyperparameter_bounds(cfg)
    limits["lr_peak"] = limits["learning_rate"]
    names = ["weight_decay", "lr_peak", "lr_end"] if method == "forward" else ["weight_decay", "learning_rate"]
    for name in names:
        low, high = limits[name]
        assert low * (1 - 1e-5) <= min(bounded[name]) and max(bounded[name]) <= high * (1 + 1e-5), name
    left = [name for name in names if not all(limits[name][0] * 0.99 <= v <= limits[name][1] * 1.01 for v in free[name])]
    assert left, "unbounded, no hyperparameter left the bounds: the control shows nothing"


def test_inside_the_bounds_a_bounded_run_is_the_unbounded_run_bit_for_bit():
    # The default outer step keeps λ far inside the bounds over this short run: the projection is
    # the identity, so results of runs that never reached a bound do not depend on the flag.
    bounded, free = (_run("bilevel_T1", bound_hyperparameters=b) for b in (True, False))
    assert bounded["record"]["test_accuracy"] == free["record"]["test_accuracy"]
    assert bounded["record"]["hp"] == free["record"]["hp"]
    assert bounded["hyperparameters"] == free["hyperparameters"]
