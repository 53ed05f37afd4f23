"""
Side-by-side comparison of trained runs (Panacea, Rewarded Soups, DPS, ...), over seeds.

    python compare.py out/cmp/panacea-ls out/cmp/rs out/cmp/dps --out out/cmp/comparison
    python compare.py "panacea-ls=out/seeds/*" "rs=out/seeds/*/rs" --out out/seeds/comparison

A run is a directory holding front.json (or the file itself), labelled by its directory name, or
LABEL=PATTERN: every directory the glob pattern matches that holds a front.json, pooled under one
label. Each run's Pareto metrics are recomputed from its points against its own reference point
(the world fixes it per seed: runs of one seed share it, so their HV compare directly; across seeds
compare HV / attainable). Each row gives the mean and standard deviation over its runs (n of them);
runs on other objectives are refused. Writes OUT.md (a markdown table), OUT.json (every run's
numbers and the rows) and OUT.png (each row's mean front over its runs, the attainable front and
the SFT point of its first run).
"""
import glob
import json
import os

import numpy as np

from cli import Parser, fail
from evaluate import RM_REFERENCE
from plot import plot_fronts
from panacea import front_metrics

COLUMNS = [("hv", "HV"), ("hv_ratio", "HV / attainable"), ("rm_ceiling", "RM ceiling"),
           ("of_ceiling", "HV / RM ceiling"), ("inner_product", "inner product"), ("sparsity", "sparsity"),
           ("spacing", "spacing"), ("rm_hv", "RM HV"),
           ("models", "models"), ("update_steps", "update steps"), ("seconds", "train s")]


def load(path):
    path = path if path.endswith(".json") else os.path.join(path, "front.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def expand(args):
    """[(label, [paths])] from the command line, in order; a label given twice pools its runs."""
    groups = {}
    for a in args:
        if "=" in a:
            label, pattern = a.split("=", 1)
            paths = sorted(p for p in glob.glob(pattern) if os.path.exists(os.path.join(p, "front.json")))
            if not paths:
                raise ValueError(f"{pattern} matches no directory holding a front.json")
        else:
            label, paths = os.path.basename(os.path.normpath(os.path.dirname(a) if a.endswith(".json") else a)), [a]
        groups.setdefault(label, []).extend(paths)
    return list(groups.items())


def run_metrics(fr):
    """The metrics of one front, recomputed from its points against its own reference point (a front
    without judges, on your own data: from its reward-model scores, and no ratio to an attainable front)."""
    m = len(fr["objectives"])
    rm = front_metrics(fr["rm_scores"], fr["prefs"], [RM_REFERENCE] * m)
    j = front_metrics(fr["judge_scores"], fr["prefs"], fr["reference_point"]) if "judge_scores" in fr else rm
    ratio = j["hypervolume"] / fr["metrics"]["attainable_hypervolume"] if "judge_scores" in fr else None
    row = {"hv": j["hypervolume"], "hv_ratio": ratio, "inner_product": j["inner_product"], "sparsity": j["sparsity"],
           "spacing": j["spacing"], "rm_hv": rm["hypervolume"]}
    row.update({k: fr.get("cost", {}).get(k) for k in ("models", "update_steps", "seconds")})
    # the reward-model ceiling (the KL optimum of the run's objective, as a share of the attainable front) and
    # the share of it the run reached; PPO runs on the world only
    row["rm_ceiling"] = fr["rm_ceiling"]["ratio"]["mode"] if "rm_ceiling" in fr else None
    row["of_ceiling"] = ratio / row["rm_ceiling"] if row["rm_ceiling"] and ratio is not None else None
    return row


def compare(groups):
    """[(label, [front])] -> one row per label: mean and sd (ddof 1) of every column over its runs."""
    objectives = groups[0][1][0]["objectives"]
    rows = []
    for label, fronts in groups:
        if any(fr["objectives"] != objectives for fr in fronts):
            raise ValueError(f"{label} was evaluated on other objectives than {','.join(objectives)}")
        if len({"judge_scores" in fr for g in groups for fr in g[1]}) > 1:
            raise ValueError("some runs were scored by the world's judges and others by reward models only: "
                             "compare them apart")
        runs = [run_metrics(fr) for fr in fronts]
        row = {"run": label, "n": len(runs), "runs": runs}
        for k, _ in COLUMNS:
            vals = np.array([r[k] for r in runs if r[k] is not None], dtype=float)
            row[k] = float(vals.mean()) if len(vals) else None
            row[k + "_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else None
        rows.append(row)
    return rows


def cell(row, k):
    if row[k] is None:
        return ""
    if k in ("models", "update_steps"):
        return str(int(round(row[k])))
    sd = row[k + "_sd"]
    return f"{row[k]:.3g}" + (f" ± {sd:.2g}" if sd is not None else "")


def markdown(rows, objectives):
    lines = [f"Objectives: {', '.join(objectives)}. Mean ± standard deviation over n runs. HV, HV / attainable and "
             "inner product: higher is better; sparsity and spacing: lower. Runs without judges (your own data): HV "
             "and the others from the reward models' scores.", "",
             "| run | n | " + " | ".join(name for _, name in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for row in rows:
        lines.append(f"| {row['run']} | {row['n']} | " + " | ".join(cell(row, k) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def mean_front(fronts):
    """A row's front for the plot: the mean point per lambda over its runs (same grid)."""
    fr = dict(fronts[0])
    key = "judge_scores" if "judge_scores" in fr else "rm_scores"
    if all(f["prefs"] == fr["prefs"] for f in fronts):
        fr[key] = np.mean([f[key] for f in fronts], axis=0).tolist()
    return fr


def main():
    p = Parser("Compare the Pareto fronts of trained runs, over seeds.")
    p.add_argument("runs", nargs="+", help="run directories (holding front.json), front.json files, or LABEL=GLOB")
    p.add_argument("--out", default="comparison", help="output path prefix: OUT.md, OUT.json, OUT.png")
    args = p.parse_args()
    try:
        groups = [(label, [load(q) for q in paths]) for label, paths in expand(args.runs)]
        rows = compare(groups)
    except (ValueError, KeyError) as e:
        fail(e)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    objectives = groups[0][1][0]["objectives"]
    table = markdown(rows, objectives)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    with open(args.out + ".json", "w") as f:
        json.dump({"objectives": objectives, "rows": rows}, f, indent=1)
    plot_fronts([(label + (f" (mean of {len(fr)})" if len(fr) > 1 else ""), mean_front(fr)) for label, fr in groups],
                args.out + ".png")
    print(table)
    print(f"wrote {args.out}.md, {args.out}.json, {args.out}.png")


if __name__ == "__main__":
    main()
