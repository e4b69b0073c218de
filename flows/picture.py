"""The lineage picture of one invocation: the recipe's DAG (flows.lineage computes it) drawn with matplotlib.

MLflow draws no lineage graph, so the parent run carries this PNG (``lineage.png`` at its artifact root).
Per stage a box: name and kind, fingerprint, LoggedModel id, key metric, and how this invocation got it
(ran, with seconds / cached / not run / failed), coloured by that; arrows go from each upstream stage.

    dag = plan_dag(recipe, artifacts)
    draw_lineage(dag, {"world": "cached", "cnn": "ran"}, {"cnn": 4.2}, Path("lineage.png"))
"""
from __future__ import annotations

from pathlib import Path

from flows.lineage import Dag, Node

COLOURS = {"ran": "#b7e4c7", "cached": "#dde6f0", "failed": "#f4b6b6", "not run": "#ffffff"}


def key_metric(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The metric a box shows: the stage's first ``val/`` metric (its headline, in the order it reports them),
    else its first metric."""
    for k, v in metrics.items():
        if k.startswith("val/"):
            return k, v
    return next(iter(metrics.items()), None)


def node_label(n: Node, outcome: str, seconds: float | None) -> str:
    km = key_metric(n.metrics)
    how = f"ran {seconds:.1f}s" if outcome == "ran" and seconds is not None else outcome
    return "\n".join([f"{n.stage} ({n.kind})", f"fp {n.fingerprint[:12]}",
                      f"model {n.model_id[:14] if n.model_id else '-'}",
                      f"{km[0]} = {km[1]:.4g}" if km else "no metrics", how])


def layout(dag: Dag) -> dict[str, tuple[float, float]]:
    """(x, y) per stage: x its depth (longest upstream path), y its place among the stages of that depth."""
    depth: dict[str, int] = {}
    for name, n in dag.nodes.items():  # topological order
        depth[name] = 1 + max((depth[u] for u in n.upstream if u in depth), default=-1)
    columns: dict[int, list[str]] = {}
    for name in dag.nodes:
        columns.setdefault(depth[name], []).append(name)
    tallest = max((len(c) for c in columns.values()), default=1)
    pos = {}
    for d, names in columns.items():
        for i, name in enumerate(names):
            pos[name] = (float(d), (tallest - 1) / 2 - i + (len(names) - 1) / 2 - (tallest - 1) / 2)
    return pos


def draw_lineage(dag: Dag, outcome: dict[str, str], seconds: dict[str, float], path: Path) -> Path:
    """Write the DAG as a PNG to ``path``; ``outcome``: {stage: ran | cached | failed}, others 'not run'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    pos = layout(dag)
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    fig, ax = plt.subplots(figsize=(3.2 * (max(xs) + 1) + 1, 1.9 * (max(ys) - min(ys) + 1) + 1), dpi=110)
    box = dict(boxstyle="round,pad=0.5", edgecolor="#333333")
    for u, d in dag.edges():
        far = pos[d][0] - pos[u][0] > 1  # skips a column: bend it around the boxes in between
        ax.annotate("", xy=pos[d], xytext=pos[u], arrowprops=dict(
            arrowstyle="-|>", color="#999999" if far else "#444444", shrinkA=58, shrinkB=58,
            connectionstyle=f"arc3,rad={-0.25 if far else 0.0}"))
    for name, n in dag.nodes.items():
        how = outcome.get(name, "not run")
        ax.text(*pos[name], node_label(n, how, seconds.get(name)), ha="center", va="center", fontsize=8,
                family="monospace", bbox=box | {"facecolor": COLOURS.get(how, "#ffffff")})
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.axis("off")
    ax.set_title(f"recipe {dag.recipe}: lineage of this invocation", fontsize=10)
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#333333", label=k) for k, c in COLOURS.items()],
              loc="lower right", fontsize=7, frameon=False, ncol=4)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
