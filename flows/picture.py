"""The lineage picture of one invocation: the recipe's DAG (flows.lineage computes it) as an SVG.

MLflow draws no lineage graph, so the parent run carries this picture (``lineage.svg`` at its artifact root;
MLflow's artifact view shows SVG as an image). It is written as SVG text, not drawn with matplotlib: every
invocation logs one, a cached rerun included, and importing matplotlib alone took 1.2 s of CPU there
(the cached rerun is meant to be as quick as dvc's); boxes, text and arrows need no plotting library.
Per stage a box: name and kind, fingerprint, LoggedModel id, key metric, and how this invocation got it
(ran, with seconds / cached / not run / failed), coloured by that; arrows go from each upstream stage.

    dag = plan_dag(recipe, artifacts)
    draw_lineage(dag, {"world": "cached", "cnn": "ran"}, {"cnn": 4.2}, Path("lineage.svg"))
"""
from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

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


BOX_W, BOX_H, COL_W, ROW_H, LINE_H, PAD = 210, 86, 270, 110, 15, 30


def draw_lineage(dag: Dag, outcome: dict[str, str], seconds: dict[str, float], path: Path) -> Path:
    """Write the DAG as an SVG to ``path``; ``outcome``: {stage: ran | cached | failed}, others 'not run'."""
    pos = layout(dag)
    x0, y1 = min(p[0] for p in pos.values()), max(p[1] for p in pos.values())
    centre = {n: (PAD + BOX_W / 2 + (x - x0) * COL_W, PAD + 30 + BOX_H / 2 + (y1 - y) * ROW_H)
              for n, (x, y) in pos.items()}
    width = int(max(c[0] for c in centre.values()) + BOX_W / 2 + PAD)
    height = int(max(c[1] for c in centre.values()) + BOX_H / 2 + PAD + 30)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           '<defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#444"/></marker></defs>',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{PAD}" y="{PAD}" font-size="13">recipe {escape(dag.recipe)}: lineage of this invocation</text>']
    for u, d in dag.edges():
        (ux, uy), (dx, dy) = centre[u], centre[d]
        bend = "" if dx - ux <= COL_W else f" Q{(ux + dx) / 2},{min(uy, dy) - ROW_H * 0.6}"
        out.append(f'<path d="M{ux + BOX_W / 2},{uy}{bend} {dx - BOX_W / 2},{dy}" fill="none" stroke="#444" '
                   f'marker-end="url(#a)"/>')
    for name, n in dag.nodes.items():
        how = outcome.get(name, "not run")
        cx, cy = centre[name]
        out.append(f'<g class="stage" id="stage-{escape(name)}"><rect x="{cx - BOX_W / 2}" y="{cy - BOX_H / 2}" '
                   f'width="{BOX_W}" height="{BOX_H}" rx="8" fill="{COLOURS.get(how, "#ffffff")}" stroke="#333"/>')
        lines = node_label(n, how, seconds.get(name)).split("\n")
        for i, line in enumerate(lines):
            y = cy - BOX_H / 2 + 16 + i * LINE_H
            out.append(f'<text x="{cx}" y="{y}" text-anchor="middle">{escape(line)}</text>')
        out.append("</g>")
    for i, (k, c) in enumerate(COLOURS.items()):  # the legend
        x = PAD + i * 110
        out.append(f'<rect x="{x}" y="{height - PAD}" width="14" height="14" fill="{c}" stroke="#333"/>'
                   f'<text x="{x + 20}" y="{height - PAD + 11}">{k}</text>')
    out.append("</svg>")
    path = Path(path)
    path.write_text("\n".join(out), encoding="utf-8")
    return path
