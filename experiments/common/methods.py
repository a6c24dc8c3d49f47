"""Names, labels and plot styles of the methods the experiment programs compare: K-RMD for several
truncations K ("1", "10", ...), full RMD ("full") and the short-horizon baseline ("short_horizon").
Colors follow `plotting.truncation_colors` (one per K, full RMD black), so a K looks the same in
every figure; full RMD is dashed (the darkest K's color is close to black)."""

from __future__ import annotations

from typing import Optional

from experiments.common.plotting import truncation_colors


def method_name(truncate: Optional[int], short_horizon: bool = False) -> str:
    """The key of a method in results.json and in the resume state."""
    return "short_horizon" if short_horizon else "full" if truncate is None else str(truncate)


def method_label(name: str) -> str:
    return {"full": "Full RMD", "short_horizon": "Short horizon (T=1)"}.get(name, f"{name}-RMD")


def method_styles(names: list[str], steps: int) -> dict[str, dict]:
    """matplotlib keyword arguments (label, color, line style, marker) per method name."""
    ks = {name: steps if name == "full" else int(name) for name in names if name != "short_horizon"}
    colors = {**{name: truncation_colors(list(ks.values()), steps)[k] for name, k in ks.items()},
              "short_horizon": "tab:red"}
    return {name: dict(label=method_label(name), color=colors[name], marker="o", ms=4, lw=1.5,
                       ls={"full": "--", "short_horizon": ":"}.get(name, "-")) for name in names}
