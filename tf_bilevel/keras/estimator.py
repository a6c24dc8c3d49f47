"""The trainer's core estimator: one settings record, one function that builds it.

Both the per-task problem (`KerasBilevelProblem`) and the stacked meta-batch problem
(`tasks.StackedTasks`) build their `tfb.Hypergradient` here, from the same
`EstimatorSettings`, so no path can drop a setting.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from tf_bilevel.api import Hypergradient, hypergradient_fn


@dataclasses.dataclass(frozen=True)
class EstimatorSettings:
    """The arguments of `tfb.hypergradient_fn` that the trainer's user chooses (every field is
    passed on by name: a new estimator option is one more field here, and one of the same name in
    `TrainerSpec` and the trainer's constructor). The defaults are `hypergradient_fn`'s, declared
    once here: `TrainerSpec` and the constructor take theirs from this class."""

    steps: int
    truncate: Optional[int] = None
    estimator: str = "reverse"
    iterations: Optional[int] = None
    tolerance: Optional[float] = 1e-10
    forget: Optional[float] = None

    @classmethod
    def of(cls, spec: Any) -> "EstimatorSettings":
        """The settings of a `TrainerSpec` (its fields of the same names)."""
        return cls(**{field.name: getattr(spec, field.name) for field in dataclasses.fields(cls)})

    def full_rmd(self) -> "EstimatorSettings":
        """Full reverse mode through all T steps (Eq. 6): the diagnostics' reference."""
        return EstimatorSettings(self.steps, truncate=None, estimator="reverse", iterations=None, tolerance=None, forget=None)


def build_estimator(
    settings: EstimatorSettings,
    inner_loss: Callable,
    outer_loss: Callable,
    *,
    inner_optimizer: Any,
    init_params: Optional[Callable],
    per_step_batches: Callable,
    stateful: bool = False,
) -> Hypergradient:
    """`tfb.hypergradient_fn` with `settings`, uncompiled and without numeric checks (the
    trainer compiles its steps and records non-finite values itself). `stateful`: the losses
    carry a layer state through the inner steps (the regime's, e.g. online BatchNorm)."""
    return hypergradient_fn(
        inner_loss, outer_loss, **dataclasses.asdict(settings),
        inner_optimizer=inner_optimizer, init_params=init_params, per_step_batches=per_step_batches,
        jit_compile=False, check_numerics=False, stateful=stateful,
    )
