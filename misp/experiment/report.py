"""The experiment's report: ``results.md`` (mean ± std over seeds, chosen values, settings, timing) and a
figure with error bars, both made from ``results.jsonl`` alone, so anyone can remake them from the raw rows."""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path

from misp.experiment.results import mean_std, summarise

DEFAULT_METRICS = [
    "chair/chair_i", "chair/recall", "chair/object_f1", "cooccurrence/partner_rate",
    "cooccurrence/partner_present_rate", "pope/adversarial/f1", "mmvp/pair_accuracy", "grounding/likelihood",
]
LOWER_IS_BETTER = {"chair/chair_i", "chair/chair_s", "cooccurrence/partner_rate", "cooccurrence/other_rate"}
TRAINING_KEYS = ["img/accuracies", "loss/image", "img/advantage_mean", "img/advantage_std", "is/ess", "loss/text",
                 "diag/grad_share/image", "diag/grad_share/text", "diag/grad_cos/image_text"]
"""Training diagnostics reported per variant (first logged value -> last), when a run logged them."""


def _cell(mean: float, std: float, n: int) -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def _label(metric: str) -> str:
    return metric.replace("cooccurrence/", "").replace("chair/", "").replace("/", " ")


def compare(rows: list[dict], main: str, other: str, metric: str) -> tuple[float, float] | None:
    """Difference of means (main - other) over seeds and its standard error (Welch); None without seeds."""
    a = [r["metrics"][metric] for r in rows if r["variant"] == main and r["split"] == "test" and metric in r["metrics"]]
    b = [r["metrics"][metric] for r in rows if r["variant"] == other and r["split"] == "test" and metric in r["metrics"]]
    if not a or not b:
        return None
    va = statistics.variance(a) if len(a) > 1 else 0.0
    vb = statistics.variance(b) if len(b) > 1 else 0.0
    return statistics.fmean(a) - statistics.fmean(b), math.sqrt(va / len(a) + vb / len(b))


def verdict(diff: float, se: float, metric: str) -> str:
    """Whether ``diff`` (main - other) is beyond twice its standard error, and in whose favour."""
    if se == 0:
        return "no spread to judge by" if diff else "equal"
    if abs(diff) <= 2 * se:
        return "within spread"
    better = (diff < 0) if metric in LOWER_IS_BETTER else (diff > 0)
    return "main better" if better else "main worse"


def _table(summary: dict, variants: list[str], metrics: list[str], chosen: dict, labels: dict) -> list[str]:
    head = "| variant | " + " | ".join(_label(m) for m in metrics) + " | chosen |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for v in variants:
        if v not in summary:
            continue
        values = ", ".join(f"{k} {x:g}" for k, x in chosen.get(v, {}).items())
        lines.append(f"| {labels.get(v, v)} | " + " | ".join(_cell(*summary[v][m]) for m in metrics) + f" | {values} |")
    return lines


def write_report(workspace: Path, out: Path, config: dict, summary_json: dict, command: str,
                 labels: dict | None = None) -> Path:
    """``out`` (markdown) and ``out`` with ``.png`` (the figure) from the workspace's results.jsonl."""
    labels = labels or {}
    rows = [json.loads(line) for line in (workspace / "results.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
    metrics = config.get("metrics") or DEFAULT_METRICS
    summary = summarise(rows, metrics)
    methods = [v["name"] for v in config["methods"]]
    ablations = [v["name"] for v in config["ablations"]]
    chosen = summary_json["chosen"]
    chosen_of = {**chosen, **{v["name"]: chosen.get(v.get("like") or config["main"], {}) for v in config["ablations"]}}
    main = config["main"]
    world = json.loads((workspace / "worlds/shapes/world.json").read_text())["config"]
    timing = summary_json["timing"]
    fits = [r for r in rows if r.get("fit_s")]
    lines = [
        f"# Results: experiment `{config['name']}`",
        "",
        f"Made by `{command}` on {platform.machine()} / {platform.python_version()} ({_cpu_line()}); wall time "
        f"{timing['total_s'] / 60:.1f} min (the shared chain {timing['chain_s'] / 60:.1f} min; {len(fits)} "
        f"preference fits, {statistics.fmean(r['fit_s'] for r in fits) if fits else 0:.0f} s each on average"
        + (f"; summed over the {timing['calls']} calls that built it" if timing.get("calls", 1) > 1 else "") + "). "
        f"Raw rows (one per evaluated run): [`{out.with_suffix('.jsonl').name}`]({out.with_suffix('.jsonl').name}); "
        "remake this report from them with the same command plus `--report_only true`.",
        "",
        "## Protocol",
        "",
        f"- Seeds {config['seeds']}: every method trains from the same base model (one SFT run), so the spread "
        "is over preference-training seeds (negatives drawn, batch order, initialisation of q_phi), not over base models.",
        f"- Same budget for every method: {config['max_epochs']} epochs over the same preference records and batch size "
        "(CLIP-DPO trains on its own generated pairs, as that method prescribes).",
        f"- Each method's grid {_grid_text(config['grid'])} is searched on seed {config['seeds'][0]} and chosen by "
        f"**{config['select_metric']}** ({config['select_mode']}) on the **validation split**; the test split "
        "chose nothing. Ablations take their method's chosen values.",
        f"- World: {_world_text(world)}.",
        "- Table cells: mean ± sample std over seeds on the test split. `partner_rate`: the trigger's partner named "
        "when absent (lower is better); `partner_present_rate`: named when present (higher is better).",
        "",
        "## Methods",
        "",
        *_table(summary, ["base", *methods], metrics, chosen_of, labels),
        "",
    ]
    if ablations:
        lines += [f"## Ablations (of {labels.get(main, main)} unless said)", "",
                  *_table(summary, [main, *ablations], metrics, chosen_of, labels), ""]
    lines += _comparison(rows, main, methods + ablations, metrics, labels)
    lines += _grid_section(rows, methods, config, labels)
    lines += _training_section(rows, methods + ablations, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = plot(summary, ["base", *methods, *ablations], metrics, out.with_suffix(".png"), labels)
    lines += ["## Figure", "", f"![results]({figure.name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".jsonl").write_text((workspace / "results.jsonl").read_text())
    out.write_text("\n".join(lines))
    return out


def _cpu_line() -> str:
    import os

    return f"{os.cpu_count()} CPU cores"


def _grid_text(grid: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]} ∈ {v}" for k, v in grid.items())


def _world_text(world: dict) -> str:
    keys = [k for k in world if k.startswith("n_")]
    return "seed " + str(world.get("seed")) + ", " + ", ".join(f"{k} {world[k]}" for k in keys)


def _comparison(rows, main, others, metrics, labels) -> list[str]:
    lines = [f"## {labels.get(main, main)} against each other variant", "",
             "Difference of means (main − other) ± its standard error over seeds; *beyond spread* means more than two "
             "standard errors (with 3 seeds a rough screen, not a significance test).", "",
             "| other | " + " | ".join(_label(m) for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for other in ["base", *[o for o in others if o != main]]:
        cells = []
        for m in metrics:
            c = compare(rows, main, other, m)
            cells.append("–" if c is None else f"{c[0]:+.3f} ± {c[1]:.3f} ({verdict(*c, m)})")
        lines.append(f"| {labels.get(other, other)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _grid_section(rows, methods, config, labels) -> list[str]:
    metric = config["select_metric"]
    lines = [f"## Tuning on the validation split ({metric})", ""]
    for v in methods:
        tuned = [r for r in rows if r["variant"] == v and r["split"] == "val"]
        if tuned:
            cells = ", ".join(f"{_values(r['values'])}: {r['metrics'].get(metric, math.nan):.3f}" for r in tuned)
            lines.append(f"- {labels.get(v, v)}: {cells}")
    return lines + [""]


def _values(values: dict) -> str:
    return " ".join(f"{k} {x:g}" for k, x in values.items())


def _training_section(rows, variants, labels) -> list[str]:
    """Logged training diagnostics, first logged value -> last, mean over seeds."""
    present = [k for k in TRAINING_KEYS if any(k in r.get("training", {}) for r in rows)]
    if not present:
        return []
    lines = ["## How hard the negatives are over training", "",
             "First logged value → last, mean over seeds (training batches, not evaluation).", "",
             "| variant | " + " | ".join(present) + " |", "|" + "---|" * (len(present) + 1)]
    for v in variants:
        runs = [r for r in rows if r["variant"] == v and r["split"] == "test"]
        cells = []
        for k in present:
            first = mean_std(r["training"][k]["first"] for r in runs if k in r.get("training", {}))
            last = mean_std(r["training"][k]["last"] for r in runs if k in r.get("training", {}))
            cells.append("–" if first[2] == 0 else f"{first[0]:.2f} → {last[0]:.2f}")
        if any(c != "–" for c in cells):
            lines.append(f"| {labels.get(v, v)} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(summary: dict, variants: list[str], metrics: list[str], path: Path, labels: dict) -> Path:
    """One panel per metric: a bar per variant at its mean, error bar one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [v for v in variants if v in summary]
    cols = min(4, len(metrics))
    rows_n = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        means = [summary[v][metric][0] for v in shown]
        stds = [summary[v][metric][1] for v in shown]
        ax.bar(range(len(shown)), means, yerr=stds, capsize=3, color=["#888" if v == "base" else "#4477aa" for v in shown])
        ax.set_xticks(range(len(shown)), [labels.get(v, v) for v in shown], rotation=70, fontsize=7)
        ax.set_title(_label(metric) + (" (lower better)" if metric in LOWER_IS_BETTER else ""), fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
