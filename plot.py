"""
Pictures of Pareto fronts (evaluate.write_front's pareto.png, compare.py's comparison).

    points(front)                  the scores a front is drawn with: the judges', or else the reward models'
    draw_limits(ax, front, a, b)   the world's attainable front, its LS points and the ceilings in one plane
    plot_fronts([(label, front)], path)   m = 2: one panel; m >= 3: pairwise projections + a 3-D view
"""
import math


def points(front):
    """The scores a front is drawn and compared with: the judges', or else the reward models'."""
    if "judge_scores" in front:
        return front["judge_scores"], front["sft_judge_scores"]
    return front["rm_scores"], front["sft_rm_scores"]


def draw_limits(ax, front, a, b):
    """The world's limit and ceilings in the (objective a, objective b) plane: the attainable front, its
    LS points and the KL optimum's points (mode) with the judges and with the reward models."""
    att = front["attainable_front"]
    if len(front["objectives"]) == 2:  # the attainable front is a staircase of many points; LS picks some of them
        att = sorted(att)
        ax.step([p[a] for p in att], [p[b] for p in att], "k-", where="pre", lw=0.8, alpha=0.6,
                label="attainable front")
    else:
        ax.plot([p[a] for p in att], [p[b] for p in att], ".", color="0.8", ms=1, label="attainable front (projected)")
    ls = front["ls_judge_scores"]
    ax.plot([p[a] for p in ls], [p[b] for p in ls], "kx", ms=6, alpha=0.7, label="its LS points")
    for key, who, style in (("judge_ceiling", "judges", "g+"), ("rm_ceiling", "reward models", "m1"),
                            ("dpo_ceiling", "DPO's labels", "c2")):
        if key in front:
            c = front[key]
            ax.plot([p[a] for p in c["mode"]], [p[b] for p in c["mode"]], style, ms=7, alpha=0.8,
                    label=f"KL optimum, {who} ({c['ratio']['mode']:.3f})")


def plot_fronts(runs, path):
    """Every run's learned front and the SFT point, each lambda labelled, taken from the run on the
    finest grid; on the world also the attainable front, its LS points and the ceilings. m >= 3: every
    pair of objectives, plus one 3-D view."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = max((fr for _, fr in runs), key=lambda fr: len(fr["prefs"]))
    objs, m, judged = first["objectives"], len(first["objectives"]), "judge_scores" in first
    pairs = [(0, 1)] if m == 2 else [(a, b) for a in range(m) for b in range(a + 1, m)]
    n = len(pairs) + (m >= 3)
    fig = plt.figure(figsize=(6 * min(n, 2), 5 * math.ceil(n / 2)))
    for k, (a, b) in enumerate(pairs):
        ax = fig.add_subplot(math.ceil(n / 2), min(n, 2), k + 1)
        if judged:
            draw_limits(ax, first, a, b)
        for label, fr in runs:
            pts = points(fr)[0]
            ax.plot([p[a] for p in pts], [p[b] for p in pts], "-o" if m == 2 else "o", ms=4, label=label)
            if fr is first:
                for pref, pt in zip(fr["prefs"], pts):
                    ax.annotate(",".join(f"{x:.2g}" for x in pref), (pt[a], pt[b]), fontsize=6, alpha=0.7)
        s = points(first)[1]
        ax.plot([s[a]], [s[b]], "r*", ms=12, label="SFT")
        ax.set(xlabel=objs[a], ylabel=objs[b])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if m >= 3:
        ax = fig.add_subplot(math.ceil(n / 2), min(n, 2), n, projection="3d")
        extra = [("LS points of the attainable front", first["ls_judge_scores"])] if judged else []
        for label, pts in extra + [(label, points(fr)[0]) for label, fr in runs]:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], s=12, label=label)
        ax.set(xlabel=objs[0], ylabel=objs[1], zlabel=objs[2])
        ax.legend(fontsize=7)
    fig.suptitle(f"Pareto front on held-out prompts (scored by {first.get('scored_by', 'the judges')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
