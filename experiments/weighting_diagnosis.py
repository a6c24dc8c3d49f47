r"""What a weighting function of the loss can learn from the greedy hypergradient (issue #17).

At weights v = 1 one SGD step of size γ on (1/B) Σ v_i ℓ_i changes the clean validation loss f
by ∂f/∂v_i = −(γ/B) a_i with a_i = ∇ℓ_i(w)·∇f(w) (paper Eq. 6 with T = 1; the look-ahead
hypergradient of experiments/lookahead_weights.py at ε = 0). Meta-Weight-Net's outer gradient
is Σ_i ∂f/∂v_i ∂V(ℓ_i; θ)/∂θ, so a weighting function of the loss alone is pushed up at a loss
level ℓ iff Σ a_i over the examples with ℓ_i ≈ ℓ is > 0 (unnormalized), or iff their mean a_i
is above the minibatch's (weights divided by the batch mean). This module measures a_i on every
training example of a checkpoint, bins it by loss (and by the given label: the class-aware
variant), and reports the detector quality of the best weighting each input allows.

  python -m experiments.weighting_diagnosis --setting=flip --epochs=1,2,4,8 --out=diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

LOSS_EDGES = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, np.inf])


def alignments(classifier: keras.Model, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               chunk: int = 1000) -> np.ndarray:
    """a_i = ∇ℓ_i(w)·∇f(w) per training example (f: mean CE on all of (x_val, y_val)), from
    tf_bilevel's one-step hypergradient: a_i = −∂f(w − Σ ε_j ∇ℓ_j)/∂ε_i at ε = 0."""
    from experiments.models import lookahead_weights as lw

    hypergradient = lw.example_hypergradient(classifier, 1.0, jit_compile=False)
    params = [v.value for v in classifier.trainable_variables]
    out = []
    for start in range(0, len(y), chunk):
        xs, ys = x[start: start + chunk], y[start: start + chunk]
        _, h = hypergradient(params, tf.zeros(len(ys)), (xs, ys), (x_val, y_val))
        out.append(-h.numpy().astype(np.float64))
    return np.concatenate(out)


def auc(score: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney)."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    sorted_scores = np.asarray(score)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def cells(losses: np.ndarray, labels: Optional[np.ndarray], edges: np.ndarray = LOSS_EDGES) -> np.ndarray:
    """The cell of each example: its loss bin (labels None) or (label, loss bin)."""
    bins = np.clip(np.searchsorted(edges, losses, side="right") - 1, 0, len(edges) - 2)
    return bins if labels is None else np.asarray(labels) * (len(edges) - 1) + bins


def greedy_cell_weights(align: np.ndarray, cell: np.ndarray, normalization: str) -> np.ndarray:
    """The direction the greedy hypergradient pushes a weighting function that is constant on
    each cell: +1 / −1 per example, by the sign of its cell's Σ a_i ("none") or of its cell's mean
    a_i minus the mean over all examples ("mean": weights divided by their batch mean)."""
    reference = align.mean() if normalization == "mean" else 0.0
    sums = np.bincount(cell, weights=align - reference)
    return np.sign(sums)[cell]


def bin_table(losses: np.ndarray, align: np.ndarray, wrong: np.ndarray, edges: np.ndarray = LOSS_EDGES) -> list:
    """Per loss bin: examples, fraction of wrong labels, mean a_i of right and of wrong labels, Σ a_i."""
    rows = []
    cell = cells(losses, None, edges)
    for b in range(len(edges) - 1):
        sel = cell == b
        if not sel.any():
            continue
        r, w = sel & ~wrong, sel & wrong
        rows.append({"loss_from": float(edges[b]), "loss_to": float(edges[b + 1]), "n": int(sel.sum()),
                     "wrong_fraction": float(wrong[sel].mean()),
                     "mean_align_right": float(align[r].mean()) if r.any() else None,
                     "mean_align_wrong": float(align[w].mean()) if w.any() else None,
                     "sum_align": float(align[sel].sum())})
    return rows


def detector(down: np.ndarray, wrong: np.ndarray) -> dict:
    """A weighting that pushes `down` examples to 0: its precision and recall for wrong labels."""
    hits = int((down & wrong).sum())
    return {"down": int(down.sum()), "precision": hits / int(down.sum()) if down.any() else None,
            "recall": hits / int(wrong.sum()) if wrong.any() else None,
            "right_labels_down": float(down[~wrong].mean()) if (~wrong).any() else None}


def diagnose(losses: np.ndarray, align: np.ndarray, wrong: np.ndarray, labels: np.ndarray) -> dict:
    """The bin table, the AUCs of loss / a_i as wrong-label scores, and the greedy direction of a
    weighting function of the loss alone and of (loss, label), with either normalization."""
    out = {"n": len(losses), "wrong_fraction": float(wrong.mean()), "bins": bin_table(losses, align, wrong),
           "auc_loss": auc(losses, wrong), "auc_minus_alignment": auc(-align, wrong),
           "auc_loss_within_label": {int(c): auc(losses[labels == c], wrong[labels == c])
                                     for c in np.unique(labels)},
           "per_example_sign": detector(align < 0, wrong)}
    for inputs, lab in (("loss", None), ("loss_and_label", labels)):
        for normalization in ("none", "mean"):
            direction = greedy_cell_weights(align, cells(losses, lab), normalization)
            out[f"greedy_{inputs}_{normalization}"] = detector(direction < 0, wrong)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from experiments import reweighting as R

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="flip", choices=R.SETTINGS)
    parser.add_argument("--epochs", default="1,2,4,8", help="Checkpoints of plain training to diagnose (0: init).")
    parser.add_argument("--n_train", type=int, default=None, help="Train on this many training examples.")
    parser.add_argument("--n_diag", type=int, default=20000, help="Diagnose this many training examples.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=None, help="Also diagnose these trained weights (.weights.h5).")
    parser.add_argument("--out", required=True, help="JSON output file.")
    args = parser.parse_args(argv)
    cfg = R.Config(setting=args.setting, seed=args.seed, n_train=args.n_train).validated()
    data, _ = R.load_data(cfg)
    x, y = data["train"]
    x_val, y_val = data["val"]
    wrong = data["corrupted"]
    checkpoints = sorted(int(e) for e in args.epochs.split(","))
    model = R.build_model(cfg)
    model.compile(optimizer=keras.optimizers.SGD(cfg.lr, momentum=cfg.momentum),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    order = np.random.default_rng(args.seed).permutation(len(y))
    report = {"setting": args.setting, "seed": args.seed, "checkpoints": {}}

    def record(name: str) -> None:
        n = min(args.n_diag, len(y))
        idx = np.sort(np.random.default_rng(123).choice(len(y), n, replace=False))
        losses = R.per_example_losses(model, x[idx], y[idx])
        align = alignments(model, x[idx], y[idx], x_val, y_val)
        report["checkpoints"][name] = d = diagnose(losses, align, wrong[idx], y[idx])
        report["checkpoints"][name]["val_accuracy"] = float(np.mean(
            np.argmax(model.predict(x_val, batch_size=1000, verbose=0), 1) == y_val))
        print(f"[{name}] val {d['val_accuracy']:.3f}  AUC loss {d['auc_loss']:.3f}  AUC −a {d['auc_minus_alignment']:.3f}",
              flush=True)
        for row in d["bins"]:
            print(f"   ℓ∈[{row['loss_from']:.2f},{row['loss_to']:.2f}) n={row['n']:5d} wrong={row['wrong_fraction']:.2f} "
                  f"a_right={row['mean_align_right'] or 0:+.4f} a_wrong={row['mean_align_wrong'] or 0:+.4f} "
                  f"Σa={row['sum_align']:+.2f}", flush=True)
        for k in ("per_example_sign", "greedy_loss_none", "greedy_loss_mean", "greedy_loss_and_label_none",
                  "greedy_loss_and_label_mean"):
            print(f"   {k}: {d[k]}", flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    done = 0
    for epoch in checkpoints:
        if epoch > done:
            model.fit(x[order], y[order], batch_size=cfg.batch_size, epochs=epoch, initial_epoch=done, shuffle=True,
                      verbose=0)
            done = epoch
        record(f"plain_epoch{epoch}")
    if args.weights:
        model.load_weights(args.weights)
        record(os.path.basename(args.weights))
    return report


if __name__ == "__main__":
    main()
