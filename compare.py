"""
Side-by-side comparison of trained runs (Panacea, Rewarded Soups, DPS, ...).

    python compare.py out/cmp/panacea-ls out/cmp/rs out/cmp/dps --out out/cmp/comparison

Reads each run's front.json, recomputes the Pareto metrics from its points with one shared
reference point (runs on different objectives or reference points are not comparable and are
refused), and writes OUT.md (a markdown table), OUT.json (the same numbers) and OUT.png (every
front, the oracle front and the SFT point). A run is labelled by its directory name.
"""
import argparse
import json
import os
import sys

from evaluate import RM_REFERENCE, plot_fronts
from panacea import front_metrics

COLUMNS = [("hv", "HV"), ("hv_ratio", "HV / oracle"), ("inner_product", "inner product"), ("sparsity", "sparsity"),
           ("spacing", "spacing"), ("rm_hv", "RM HV"), ("rm_inner_product", "RM inner product"), ("rm_sparsity", "RM sparsity"),
           ("rm_spacing", "RM spacing"), ("models", "models"), ("update_steps", "update steps"), ("seconds", "train s")]


def load(run):
    path = run if run.endswith(".json") else os.path.join(run, "front.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def compare(runs):
    """[(label, front)] -> rows of metrics, one per run."""
    first = runs[0][1]
    for label, fr in runs[1:]:
        if fr["objectives"] != first["objectives"] or fr["reference_point"] != first["reference_point"]:
            raise ValueError(f"{label} was evaluated on other objectives or another reference point than {runs[0][0]}")
    ref, m = first["reference_point"], len(first["objectives"])
    rows = []
    for label, fr in runs:
        j = front_metrics(fr["judge_scores"], fr["prefs"], ref)
        r = front_metrics(fr["rm_scores"], fr["prefs"], [RM_REFERENCE] * m)
        row = {"run": label, "hv": j["hypervolume"], "hv_ratio": j["hypervolume"] / fr["metrics"]["oracle_hypervolume"]}
        row.update({k: j[k] for k in ("inner_product", "sparsity", "spacing")})
        row.update({"rm_" + k: r[k if k != "hv" else "hypervolume"] for k in ("hv", "inner_product", "sparsity", "spacing")})
        row.update({k: fr.get("cost", {}).get(k) for k in ("models", "update_steps", "seconds")})
        rows.append(row)
    return rows


def markdown(rows, objectives):
    head = "| run | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [f"Objectives: {', '.join(objectives)}. HV and inner product: higher is better; sparsity and spacing: lower.", "",
             head, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [row[k] if isinstance(row[k], (int, str)) or row[k] is None else f"{row[k]:.4g}" for k, _ in COLUMNS]
        lines.append(f"| {row['run']} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description="Compare the Pareto fronts of trained runs.")
    p.error = lambda msg: p.exit(2, f"error: {msg} (see --help)\n")  # one line, no usage dump
    p.add_argument("runs", nargs="+", help="run directories (holding front.json) or front.json files")
    p.add_argument("--out", default="comparison", help="output path prefix: OUT.md, OUT.json, OUT.png")
    args = p.parse_args()
    try:
        runs = [(os.path.basename(os.path.normpath(r if not r.endswith(".json") else os.path.dirname(r) or r)), load(r)) for r in args.runs]
        rows = compare(runs)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    table = markdown(rows, runs[0][1]["objectives"])
    with open(args.out + ".md", "w") as f:
        f.write(table)
    with open(args.out + ".json", "w") as f:
        json.dump({"objectives": runs[0][1]["objectives"], "reference_point": runs[0][1]["reference_point"], "runs": rows}, f, indent=1)
    plot_fronts(runs, args.out + ".png")
    print(table)
    print(f"wrote {args.out}.md, {args.out}.json, {args.out}.png")


if __name__ == "__main__":
    main()
