"""``baton report SWEEP``: charts and an index.html from a sweep's finished stages; it never trains.

It reads the sweep's record (artifacts/sweeps/<name>.json: members and their fingerprints) and each
member's stages' ``result.json`` (the truth; a stage not complete is listed as missing, never run), and
writes ``artifacts/reports/<name>/``: one PNG per chart (matplotlib, Agg), ``numbers.json`` and
``index.html``. The charts follow the sweep file's ``report:`` block::

    report:
      title: Frozen vs fine-tuned
      claim: fine-tuning the whole network beats a frozen feature extractor for detection
      kind: bars                     # bars: one panel per metric, a bar per variant (mean, +-1 SD over seeds)
      metrics: [detector_x/val/map50, caption/val/CIDEr]    # <stage>/<metric name in result.json>
      # kind: scatter, x: cnn/val/top1, y: detector/val/map50   # a point per member, Pearson r [95% CI]
      expect: [{metric: detector_x/val/map50, better: finetune, than: linear_probe}]   # or [{r_above: 0}]
      ceiling: {detector_x/val/map50: 1.0}                     # say whether a metric is near its ceiling

Every chart shows the seeds (a dot per seed, error bars = 1 SD) and states n. The report is logged to the
sweep's MLflow run (``log_figure`` + the html and numbers as artifacts) and published as a Prefect markdown
artifact linked to the sweep's flow run (with the numbers and the links).
"""
from __future__ import annotations

import html
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.store import StageDir
from flows.sweep import find_record
from stages.recipe import RecipeError

log = logging.getLogger("baton")


def split_ref(ref: str) -> tuple[str, str]:
    """``detector/val/map50`` -> (``detector``, ``val/map50``)."""
    stage, sep, metric = ref.partition("/")
    if not sep:
        raise RecipeError(f"report: metric {ref!r}: expected <stage>/<metric>, e.g. detector/val/map50")
    return stage, metric


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n else math.nan

    def text(self, fmt: str = ".4g") -> str:
        return f"{self.mean:{fmt}} ± {self.sd:{fmt}} (n={self.n})" if self.n else "missing"


def pearson(x: list[float], y: list[float]) -> tuple[float, float | None, float | None]:
    """(r, low, high): Pearson's r with its 95% interval (Fisher z; None when n <= 3 or |r| = 1).

    >>> round(pearson([1, 2, 3, 4], [1, 2, 3, 5])[0], 3)
    0.983
    """
    n = len(x)
    if n < 2 or statistics.pstdev(x) == 0 or statistics.pstdev(y) == 0:
        return math.nan, None, None
    r = statistics.correlation(x, y)
    if n <= 3 or abs(r) >= 1:
        return r, None, None
    z, half = math.atanh(r), 1.959964 / math.sqrt(n - 3)
    return r, math.tanh(z - half), math.tanh(z + half)


@dataclass
class Report:
    name: str
    dir: Path
    index: Path
    charts: list[Path]
    numbers: dict[str, Any]
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"sweep": self.name, "dir": str(self.dir), "index": str(self.index),
                "charts": [str(c) for c in self.charts], "numbers": self.numbers, "verdicts": self.verdicts,
                "missing": self.missing}

    def text(self) -> str:
        lines = [f"report of sweep {self.name}: {self.index}"]
        for metric, groups in self.numbers["metrics"].items():
            lines.append(f"  {metric}")
            lines += [f"    {g:<28} {Stat(v['values']).text()}" for g, v in groups.items()]
        if "correlation" in self.numbers:
            lines.append(f"  {self.numbers['correlation']['text']}")
        lines += [f"  claim check: {v['text']}" for v in self.verdicts]
        lines += [f"  missing (not complete, not run by a report): {m}" for m in self.missing]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ reading


def _metric_refs(record: dict[str, Any], spec: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    """The metrics to chart: the report block's, else every final metric of the members' last stages."""
    if spec.get("kind") == "scatter":
        return [spec["x"], spec["y"]]
    if spec.get("metrics"):
        return list(spec["metrics"])
    leaves = record["spec"].get("only") or record["swept_stages"] or record["members"][0]["stages"][-1:]
    return sorted({f"{s}/{k}" for m in results.values() for s in leaves for k in (m.get(s) or {})})


def _results(art: Path, record: dict[str, Any]) -> tuple[dict[str, dict[str, dict[str, float]]], list[str]]:
    """({member: {stage: metrics}}, missing "member: stage" list) from the stage dirs' result.json."""
    out, missing = {}, []
    for m in record["members"]:
        out[m["name"]] = {}
        for stage, fp in m["fingerprints"].items():
            res = StageDir(art, stage, fp).result()
            if res is None:
                missing.append(f"{m['name']}: {stage} ({fp[:16]})")
            else:
                out[m["name"]][stage] = res.metrics
    return out, missing


def _value(results: dict[str, dict[str, float]], ref: str) -> float | None:
    stage, metric = split_ref(ref)
    v = (results.get(stage) or {}).get(metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _groups(record: dict[str, Any], results: dict, ref: str) -> dict[str, Stat]:
    """{variant: Stat over its seeds} in the sweep's member order."""
    out: dict[str, Stat] = {}
    for m in record["members"]:
        v = _value(results[m["name"]], ref)
        out.setdefault(m["variant"], Stat([]))
        if v is not None:
            out[m["variant"]].values.append(v)
    return out


# ------------------------------------------------------------------------------------------------ charts


def _bars(path: Path, refs: list[str], stats: dict[str, dict[str, Stat]], title: str, seeded: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(refs))
    rows = math.ceil(len(refs) / cols)
    width = max(3.5, 0.9 * len(next(iter(stats.values()))) + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 4.0 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(refs):]:
        ax.set_visible(False)
    for ax, ref in zip(axes.flat, refs):
        groups = stats[ref]
        names = list(groups)
        means = [groups[g].mean for g in names]
        ax.bar(range(len(names)), means, yerr=[groups[g].sd for g in names], capsize=5,
               color=[f"C{i}" for i in range(len(names))], alpha=0.75)
        for i, g in enumerate(names):
            ax.plot([i] * groups[g].n, groups[g].values, "k.", ms=5)
        ns = sorted({groups[g].n for g in names})
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_title(f"{ref}\nn={'/'.join(map(str, ns))} per bar", fontsize=9)
    fig.suptitle(f"{title}\nbars: mean, error bars: ±1 SD over seeds (dots); seeds varied {', '.join(seeded) or '-'}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scatter(path: Path, record: dict, results: dict, x: str, y: str, corr: dict, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    variants = list(dict.fromkeys(m["variant"] for m in record["members"]))
    for i, v in enumerate(variants):
        pts = [(_value(results[m["name"]], x), _value(results[m["name"]], y)) for m in record["members"]
               if m["variant"] == v]
        pts = [p for p in pts if None not in p]
        if pts:
            px, py = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(px, py, "o", color=f"C{i}", alpha=0.5, label=f"{v} (n={len(pts)})")
            ax.errorbar(statistics.fmean(px), statistics.fmean(py), xerr=Stat(px).sd, yerr=Stat(py).sd,
                        fmt="s", color=f"C{i}", capsize=4, ms=7)
    xs, ys = corr["x"], corr["y"]
    if len(xs) >= 2 and statistics.pstdev(xs) > 0:
        slope, icept = statistics.linear_regression(xs, ys)
        lo, hi = min(xs), max(xs)
        ax.plot([lo, hi], [icept + slope * lo, icept + slope * hi], "k--", lw=1)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}\n{corr['text']}\ndots: members (seeds); squares: variant mean ±1 SD", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ verdicts


def _verdicts(spec: dict[str, Any], stats: dict[str, dict[str, Stat]], corr: dict | None) -> list[dict[str, Any]]:
    out = []
    for e in spec.get("expect") or []:
        if "r_above" in e:
            if corr is None or math.isnan(corr["r"]):
                out.append({"expect": e, "held": None, "text": "no correlation could be computed"})
                continue
            lo = corr["low"]
            held = corr["r"] > e["r_above"]
            sure = lo is not None and lo > e["r_above"]
            out.append({"expect": e, "held": held, "clear": sure, "text": f"r > {e['r_above']}: "
                        + ("held" if held else "did NOT hold") + f" ({corr['text']}"
                        + ("; interval excludes it)" if sure else "; interval includes it: not conclusive)")})
            continue
        a, b = stats[e["metric"]].get(e["better"]), stats[e["metric"]].get(e["than"])
        if a is None or b is None or not a.n or not b.n:
            out.append({"expect": e, "held": None, "text": f"{e}: a variant has no results"})
            continue
        diff = a.mean - b.mean
        se = math.sqrt(a.se ** 2 + b.se ** 2) if a.n > 1 and b.n > 1 else math.nan
        held, clear = diff > 0, abs(diff) > 2 * se if not math.isnan(se) else False  # clear: either way
        out.append({"expect": e, "held": held, "clear": clear, "diff": diff, "se": se,
                    "text": f"{e['metric']}: {e['better']} > {e['than']}: " + ("held" if held else "did NOT hold")
                    + f" (difference {diff:+.4g}, " + ("n=1: no SE, not conclusive)" if math.isnan(se) else
                                                        f"SE {se:.2g}: " + ("more than 2 SE)" if clear else
                                                                            "within 2 SE: not conclusive)"))})
    return out


def _ceilings(spec: dict[str, Any], stats: dict[str, dict[str, Stat]]) -> list[str]:
    out = []
    for ref, top in (spec.get("ceiling") or {}).items():
        means = [s.mean for s in stats.get(ref, {}).values() if s.n]
        if means:
            worst = max(means)
            out.append(f"{ref}: variant means {min(means):.4g}..{worst:.4g} of ceiling {top}: "
                       + ("NEAR the ceiling (within 5%): differences are compressed" if worst >= 0.95 * top
                          else "off the ceiling"))
    return out


# ------------------------------------------------------------------------------------------------ the report


def make_report(artifacts: Path, ref: str, publish: bool = True, flow_run_id: str | None = None) -> Report:
    """Write artifacts/reports/<sweep>/ from the finished results of sweep ``ref`` (name, file or run id);
    with ``publish``, log it to the sweep's MLflow run and as a Prefect artifact."""
    art = Path(artifacts)
    record = find_record(art, ref)
    name, spec = record["sweep"], record["spec"].get("report") or {}
    results, missing = _results(art, record)
    refs = _metric_refs(record, spec, results)
    stats = {r: _groups(record, results, r) for r in refs}
    out = art / "reports" / name
    out.mkdir(parents=True, exist_ok=True)
    title = spec.get("title") or f"sweep {name}"
    numbers: dict[str, Any] = {"sweep": name, "recipe": record["recipe"], "seeded_stages": record["seeded_stages"],
                               "swept_stages": record["swept_stages"], "metrics": {
                                   r: {g: {"mean": s.mean, "sd": s.sd, "n": s.n, "values": s.values}
                                       for g, s in stats[r].items()} for r in refs}}
    corr = None
    if spec.get("kind") == "scatter":
        pairs = [(_value(results[m["name"]], spec["x"]), _value(results[m["name"]], spec["y"]))
                 for m in record["members"]]
        pairs = [p for p in pairs if None not in p]
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        r, lo, hi = pearson(xs, ys)
        ci = f" [95% CI {lo:.2f}, {hi:.2f}]" if lo is not None else " (no interval: n <= 3)"
        corr = {"x": xs, "y": ys, "r": r, "low": lo, "high": hi, "n": len(xs),
                "text": f"Pearson r = {r:.3f}{ci}, n = {len(xs)} points"}
        numbers["correlation"] = corr
        charts = [_scatter(out / "scatter.png", record, results, spec["x"], spec["y"], corr, title),
                  _bars(out / "bars.png", refs, stats, title, record["seeded_stages"])]
    else:
        charts = [_bars(out / "bars.png", refs, stats, title, record["seeded_stages"])] if refs else []
    verdicts = _verdicts(spec, stats, corr)
    numbers["verdicts"], numbers["ceilings"], numbers["missing"] = verdicts, _ceilings(spec, stats), missing
    (out / "numbers.json").write_text(json.dumps(numbers, indent=2, default=str))
    index = out / "index.html"
    index.write_text(_html(record, spec, title, numbers, charts, art))
    rep = Report(name, out, index, charts, numbers, verdicts, missing)
    if publish:
        _publish(art, record, rep, flow_run_id)
    return rep


def _table_rows(numbers: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": r, "variant": g, "mean": round(v["mean"], 5) if v["n"] else None,
             "sd": round(v["sd"], 5), "n": v["n"], "values": ", ".join(f"{x:.4g}" for x in v["values"])}
            for r, groups in numbers["metrics"].items() for g, v in groups.items()]


def _html(record: dict, spec: dict, title: str, numbers: dict, charts: list[Path], art: Path) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(r['metric'])}</td><td>{e(r['variant'])}</td><td>{r['mean']}</td><td>{r['sd']}</td>"
                   f"<td>{r['n']}</td><td>{e(r['values'])}</td></tr>" for r in _table_rows(numbers))
    members = "".join(f"<tr><td>{e(m['name'])}</td><td>{e(' '.join(m['overrides']))}</td><td>"
                      + "<br>".join(f"{e(s)}: <code>{fp[:16]}</code>" for s, fp in m["fingerprints"].items())
                      + "</td></tr>" for m in record["members"])
    verdicts = "".join(f"<li>{e(v['text'])}</li>" for v in numbers["verdicts"]) or "<li>no expectation stated</li>"
    ceilings = "".join(f"<li>{e(c)}</li>" for c in numbers["ceilings"])
    missing = "".join(f"<li>{e(m)}</li>" for m in numbers["missing"])
    corr = f"<p><b>{e(numbers['correlation']['text'])}</b></p>" if "correlation" in numbers else ""
    imgs = "".join(f'<p><img src="{c.name}" alt="{e(c.stem)}" style="max-width:100%"></p>' for c in charts)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} td,th{{border:1px solid #ccc;padding:3px 6px}}
table{{border-collapse:collapse}}</style></head><body>
<h1>{e(title)}</h1>
<p>Sweep <b>{e(record['sweep'])}</b> over {e(record['recipe'])}. {e(record['spec'].get('description') or '')}</p>
<p>Claim: {e(spec.get('claim') or '(none stated)')}</p>
<h2>Does it hold?</h2><ul>{verdicts}</ul>{corr}
<h2>Off the ceiling?</h2><ul>{ceilings or '<li>no ceiling stated</li>'}</ul>
<p>Seeds varied the stages: {e(', '.join(record['seeded_stages']) or 'none (one seed)')}; swept stages (changed by a
variant): {e(', '.join(record['swept_stages']) or 'none')}. Error bars are ±1 SD over seeds; n is stated on each
chart and in the table.</p>
{imgs}
<h2>Numbers</h2><table><tr><th>metric</th><th>variant</th><th>mean</th><th>SD</th><th>n</th><th>per seed</th></tr>
{rows}</table>
{f'<h2>Missing (not complete; a report never trains)</h2><ul>{missing}</ul>' if missing else ''}
<h2>Members</h2><table><tr><th>member</th><th>overrides</th><th>stage fingerprints
(<code>{e(str(art))}/stages/&lt;stage&gt;/&lt;fp&gt;</code>)</th></tr>{members}</table>
<p>MLflow sweep run: <code>{e(str(record.get('mlflow_run_id') or '-'))}</code> (<code>baton ui</code>); Prefect flow run:
<code>{e(str(record.get('prefect_flow_run_id') or '-'))}</code>.</p>
</body></html>
"""


def _markdown(rep: Report, record: dict) -> str:
    lines = [f"# {rep.numbers['sweep']}: report", "", f"Recipe `{record['recipe']}`; seeds varied "
             f"{', '.join(record['seeded_stages']) or '-'}; error bars = 1 SD, n per row below.", "",
             "| metric | variant | mean | SD | n | per seed |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['variant']} | {r['mean']} | {r['sd']} | {r['n']} | {r['values']} |"
              for r in _table_rows(rep.numbers)]
    if "correlation" in rep.numbers:
        lines += ["", f"**{rep.numbers['correlation']['text']}**"]
    lines += ["", *(f"- {v['text']}" for v in rep.verdicts), *(f"- {c}" for c in rep.numbers["ceilings"])]
    lines += ["", f"Files: `{rep.index}` ({', '.join(c.name for c in rep.charts)}); MLflow sweep run "
              f"`{record.get('mlflow_run_id') or '-'}` (artifacts under `report/`)."]
    return "\n".join(lines)


def _publish(art: Path, record: dict, rep: Report, flow_run_id: str | None) -> None:
    run_id = record.get("mlflow_run_id")
    if run_id:
        from flows.tracking import Tracking

        client = Tracking(art, record["recipe_name"]).client
        for f in [*rep.charts, rep.index, rep.dir / "numbers.json"]:  # the MLflow UI previews PNGs and html
            client.log_artifact(run_id, str(f), "report")
        client.set_tag(run_id, "baton.report", str(rep.index))
    _publish_prefect(art, record, rep, flow_run_id or record.get("prefect_flow_run_id"))


def _publish_prefect(art: Path, record: dict, rep: Report, flow_run_id: str | None) -> None:
    import os
    import uuid

    from flows.prefect_env import configure_prefect

    users = None
    if not os.environ.get("PREFECT_API_URL"):
        from flows.server import ensure_server

        configure_prefect(art)
        users = ensure_server(art)
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate

        key = "sweep-" + re.sub(r"[^a-z0-9-]+", "-", rep.name.lower()).strip("-")
        fid = uuid.UUID(flow_run_id) if flow_run_id else None
        with get_client(sync_client=True) as client:
            client.create_artifact(ArtifactCreate(key=key, type="markdown", data=_markdown(rep, record),
                                                  description=f"report of sweep {rep.name}", flow_run_id=fid))
            client.create_artifact(ArtifactCreate(key=f"{key}-table", type="table",
                                                  data=json.dumps(_table_rows(rep.numbers)),
                                                  description=f"numbers of sweep {rep.name}", flow_run_id=fid))
    finally:
        if users is not None:
            users.close()
