"""
Pareto-front evaluation, and loading trained policies from checkpoints (train.py and sample.py).

    policy_at(sft_ck, pol_ck, pref)   the trained policy at lambda: Panacea writes lambda into its
                                      singular values; Rewarded Soups interpolates weight changes,
                                      W(lambda) = W0 + sum_i lambda_i Delta W_i; DPS has one model per grid point
    evaluate(...)                     for every lambda of the grid: responses to the held-out prompts
                                      (fixed seed, greedy by default) -> mean judge and reward-model
                                      scores xi(lambda); plus the SFT point, the attainable front, its LS points, the
                                      world's reference point and the Pareto metrics -> front dict
    write_front(front, out_dir)       front.json and pareto.png
    plot_fronts([(label, front)], path)   m = 2: one panel; m >= 3: pairwise projections + a 3-D view
"""
import json
import math
import os

import torch

import world
from model import GPT, GPTConfig
from panacea import front_metrics, hypervolume, pref_grid
from rlhf import last_token_values, rollout
from svd_lora import inject_svd_lora, lora_layers, set_preference

RM_REFERENCE = -2.0  # reward-model hypervolume reference: 2 SFT standard deviations below the SFT mean
MAX_STORED = 5000  # attainable-front points kept in front.json


def load_gpt(ck, device, n_heads_out=0):
    """A GPT with the SFT checkpoint's weights (an LM, or a trunk with fresh scalar heads)."""
    model = GPT(GPTConfig(**ck["model_args"], n_heads_out=n_heads_out)).to(device)
    state = {k: v for k, v in ck["model"].items() if not k.startswith("lm_head")} if n_heads_out else ck["model"]
    model.load_state_dict(state, strict=not n_heads_out)
    return model


def adapted_policy(sft_ck, m, conditioned, rank, alpha, device):
    """SFT model + adapter: Panacea's SVD-LoRA with k + m singular values, m of them lambda; the
    baselines an ordinary low-rank adapter of the same rank k + m (no preference slots)."""
    pd = m if conditioned else 0
    return inject_svd_lora(load_gpt(sft_ck, device), rank + m - pd, pd, lora_alpha(rank, m, pd, alpha))


def lora_alpha(rank, m, pref_dim, alpha):
    """The alpha that gives c = alpha / k for an adapter with rank + m - pref_dim free singular values:
    Panacea and the baselines then share one multiplier, and so one effective step size."""
    return alpha * (rank + m - pref_dim) / rank


def critic_model(sft_ck, rm_ck, m, conditioned, rank, alpha, device):
    """The PPO critic: the reward model's trunk with its own SVD-LoRA (conditioned like the policy)
    and a fresh, zero-initialised, trainable value head per objective."""
    critic = GPT(GPTConfig(**sft_ck["model_args"], n_heads_out=m)).to(device)
    critic.load_state_dict({k: v for k, v in rm_ck["model"].items() if not k.startswith("value_head")}, strict=False)
    torch.nn.init.zeros_(critic.value_head.weight), torch.nn.init.zeros_(critic.value_head.bias)
    pd = m if conditioned else 0
    inject_svd_lora(critic, rank + m - pd, pd, lora_alpha(rank, m, pd, alpha))
    critic.value_head.requires_grad_(True)
    return critic


def trained_model(sft_ck, pol_ck, j, device):
    """Model j of a policy checkpoint (Panacea has one; RS one per objective; DPS one per grid point)."""
    m, conditioned = len(pol_ck["objectives"]), pol_ck["fixed_prefs"][j] is None
    model = adapted_policy(sft_ck, m, conditioned, pol_ck["lora_rank"], pol_ck["lora_alpha"], device)
    missing = set(model.load_state_dict(pol_ck["adapters"][j], strict=False).missing_keys)
    assert not any(".lora_" in k for k in missing), "adapter weights missing from the checkpoint"
    return model.eval()


@torch.no_grad()
def rewarded_soup(sft_ck, pol_ck, pref, device):
    """Rewarded Soups: W(lambda) = W0 + sum_i lambda_i Delta W_i, Delta W_i = c U_i diag(e_i) V_i^T
    the real weight change of the one-objective model i. (Averaging U and V separately would give
    sum_i lambda_i U_i diag(.) sum_j lambda_j V_j^T, cross terms included: not the same model.)"""
    soup = load_gpt(sft_ck, device)
    for i, w in enumerate(pref):
        model_i = trained_model(sft_ck, pol_ck, i, device)
        for name, mod in model_i.named_modules():
            if mod in lora_layers(model_i):
                soup.get_submodule(name).weight += w * mod.delta_weight()
    return soup.eval()


def policy_at(sft_ck, pol_ck, pref, device):
    """(model, conditioned) answering preference `pref` (a list of m floats summing to 1)."""
    method = pol_ck["method"]
    if method == "panacea":
        model = trained_model(sft_ck, pol_ck, 0, device)
        set_preference(model, pref)
        return model, True
    if method == "rs":
        return rewarded_soup(sft_ck, pol_ck, pref, device), False
    grid = pol_ck["fixed_prefs"]
    j = min(range(len(grid)), key=lambda i: sum((a - b) ** 2 for a, b in zip(grid[i], pref)))
    if max(abs(a - b) for a, b in zip(grid[j], pref)) > 1e-6:
        raise ValueError(f"a DPS run has models only for the preferences {grid}")
    return trained_model(sft_ck, pol_ck, j, device), False


def load_reward_model(rm_ck, sft_ck, objectives, device):
    """The reward model with its heads restricted to `objectives`, and their standardisation stats."""
    heads = [rm_ck["objectives"].index(o) for o in objectives]
    rm = GPT(GPTConfig(**sft_ck["model_args"], n_heads_out=len(rm_ck["objectives"]))).to(device)
    rm.load_state_dict(rm_ck["model"])
    with torch.no_grad():
        head = torch.nn.Linear(rm.value_head.in_features, len(heads)).to(device)
        head.weight.copy_(rm.value_head.weight[heads]), head.bias.copy_(rm.value_head.bias[heads])
    rm.value_head = head
    return rm.eval(), {k: v[heads].to(device) for k, v in rm_ck["stats"].items()}


def judge_scores(tasks, texts, objectives):
    """(B, m) ground-truth judge scores; an unfinished response (None) is malformed."""
    return torch.tensor([world.judge_text(t, x, objectives) if x is not None else [world.MALFORMED] * len(objectives)
                         for t, x in zip(tasks, texts)])


@torch.no_grad()
def score(model, tok, rows, prefs, rm, stats, objectives, temperature, max_new_tokens):
    """Responses to rows [(task, prompt)] under prefs (N, m) or None -> judge (N, m), rm (N, m) scores
    (standardised; an unfinished response gets the SFT samples' lowest score, as in PPO)."""
    tokens, _, slen, texts = rollout(model, tok, [p for _, p in rows], prefs, max_new_tokens, temperature)
    r = (last_token_values(rm, tokens, slen).float() - stats["mean"]) / stats["std"]
    finished = torch.tensor([t is not None for t in texts], device=r.device)
    r = torch.where(finished[:, None], r, (stats["min"] - stats["mean"]) / stats["std"])
    return judge_scores([t for t, _ in rows], texts, objectives).to(r.device), r, texts


def evaluate(sft_ck, rm_ck, pol_ck, config, device, rank=0, world_size=1, autocast=None):
    """The front of a trained policy checkpoint. Every process scores its share of the (lambda,
    prompt) rows; sums are all-reduced. Returns the front.json record."""
    import torch.distributed as dist
    objectives, m = pol_ck["objectives"], len(pol_ck["objectives"])
    divisions = config.get("eval_divisions") or (10 if m == 2 else 4)
    standard = pref_grid(m, divisions)
    grid = pol_ck["fixed_prefs"] if pol_ck["method"] == "dps" else standard
    tok = world.Tokenizer(sft_ck["vocab"])
    rm, stats = load_reward_model(rm_ck, sft_ck, objectives, device)
    prompts = world.prompts("eval", config["seed"])
    temp, mnt = config["eval_temperature"], config["max_new_tokens"]
    ctx = autocast if autocast is not None else torch.autocast("cpu", enabled=False)
    # per grid point (and the SFT point last): sums of judge scores, their squares, rm scores, count
    sums = torch.zeros(len(grid) + 1, 3 * m + 1, device=device)

    def add(j, judge, r):
        sums[j] += torch.cat([judge.sum(0), (judge ** 2).sum(0), r.sum(0), torch.tensor([len(judge)], device=device)])

    torch.manual_seed(config["seed"])
    with ctx:
        if pol_ck["method"] == "panacea":  # one model, one preference per row: every lambda in one batch
            model, _ = policy_at(sft_ck, pol_ck, grid[0], device)
            rows = [(j, tp) for j in range(len(grid)) for tp in prompts][rank::world_size]
            for chunk in range(0, len(rows), 512):
                part = rows[chunk: chunk + 512]
                prefs = torch.tensor([grid[j] for j, _ in part], device=device)
                judge, r, _ = score(model, tok, [tp for _, tp in part], prefs, rm, stats, objectives, temp, mnt)
                for j in set(j for j, _ in part):
                    sel = torch.tensor([jj == j for jj, _ in part], device=device)
                    add(j, judge[sel], r[sel])
        else:
            for j, pref in enumerate(grid):
                model, _ = policy_at(sft_ck, pol_ck, pref, device)
                judge, r, _ = score(model, tok, prompts[rank::world_size], None, rm, stats, objectives, temp, mnt)
                add(j, judge, r)
        judge, r, _ = score(load_gpt(sft_ck, device).eval(), tok, prompts[rank::world_size], None, rm, stats, objectives, temp, mnt)
        add(len(grid), judge, r)
    if world_size > 1:
        dist.all_reduce(sums)
    sums = sums.cpu().double()
    n = sums[:, -1:]
    mean, sq, rm_mean = sums[:, :m] / n, sums[:, m: 2 * m] / n, sums[:, 2 * m: 3 * m] / n
    stderr = ((sq - mean ** 2).clamp_min(0) / (n - 1).clamp_min(1)).sqrt()
    judge_pts, rm_pts, sft_pt = mean[:-1].tolist(), rm_mean[:-1].tolist(), mean[-1].tolist()
    ref = world.reference_point(objectives, standard, seed=config["seed"])
    cache = os.path.join(config.get("base_dir") or config.get("out_dir") or ".", "data")
    attainable = world.attainable_front(objectives, seed=config["seed"], cache_dir=cache)
    attainable_hv = hypervolume(attainable, ref)
    jm = front_metrics(judge_pts, grid, ref)
    jm["mean_stderr"] = float(stderr[:-1].mean())
    if m == 2:  # largest move against lambda along the grid (lambda_1 ascending: objective 1 up, 2 down)
        d = [(b[0] - a[0], a[1] - b[1]) for a, b in zip(judge_pts, judge_pts[1:])]
        jm["max_reversal"] = max(0.0, -min(min(x) for x in d))
    # the front is stored whole up to MAX_STORED points (m = 2: a few hundred), else evenly thinned
    keep = attainable[:: math.ceil(len(attainable) / MAX_STORED)]
    return {
        "objectives": objectives,
        "prefs": grid,
        "judge_scores": judge_pts,
        "rm_scores": rm_pts,
        "sft_judge_scores": sft_pt,
        "ls_judge_scores": world.ls_front(objectives, grid, seed=config["seed"]),
        "attainable_front": keep.round(6).tolist(),
        "reference_point": ref,
        "metrics": {"judge": jm, "rm": front_metrics(rm_pts, grid, [RM_REFERENCE] * m),
                    "attainable_hypervolume": attainable_hv, "attainable_points": len(attainable),
                    "hypervolume_ratio": jm["hypervolume"] / attainable_hv,
                    "ls_hypervolume": hypervolume(world.ls_front(objectives, standard, seed=config["seed"]), ref),
                    "sft_hypervolume": hypervolume([sft_pt], ref)},
        "cost": {"models": len(pol_ck["fixed_prefs"]), "update_steps": pol_ck["update_steps"],
                 "seconds": round(pol_ck["seconds"], 1)},
    }


def print_front(front):
    objs = front["objectives"]
    print("lambda".ljust(22) + "".join(f"{o:>10}" for o in objs) + "   (judge scores; the attainable front's LS point in brackets)")
    for pref, pt, ls in zip(front["prefs"], front["judge_scores"], front["ls_judge_scores"]):
        print(",".join(f"{x:.2f}" for x in pref).ljust(22) + "".join(f"{x:10.3f}" for x in pt) +
              "   [" + ", ".join(f"{x:.3f}" for x in ls) + "]")
    print("sft".ljust(22) + "".join(f"{x:10.3f}" for x in front["sft_judge_scores"]))
    mt = front["metrics"]
    print(f"hypervolume {mt['judge']['hypervolume']:.4f} (attainable {mt['attainable_hypervolume']:.4f}, "
          f"ratio {mt['hypervolume_ratio']:.3f}; LS points {mt['ls_hypervolume']:.4f}; sft point {mt['sft_hypervolume']:.4f}), "
          f"inner product {mt['judge']['inner_product']:.3f}, sparsity {mt['judge']['sparsity']:.4f}, "
          f"spacing {mt['judge']['spacing']:.4f}, mean stderr {mt['judge']['mean_stderr']:.3f}")


def write_front(front, out_dir, label):
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "front.json.tmp")
    with open(tmp, "w") as f:
        json.dump(front, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "front.json"))
    plot_fronts([(label, front)], os.path.join(out_dir, "pareto.png"))


def plot_fronts(runs, path):
    """Every run's learned front, the attainable front, its LS points and the SFT point, each lambda labelled, taken
    from the run on the finest grid. m >= 3: every pair of objectives, plus one 3-D view."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first = max((fr for _, fr in runs), key=lambda fr: len(fr["prefs"]))
    objs, m = first["objectives"], len(first["objectives"])
    pairs = [(0, 1)] if m == 2 else [(a, b) for a in range(m) for b in range(a + 1, m)]
    n = len(pairs) + (m >= 3)
    fig = plt.figure(figsize=(6 * min(n, 2), 5 * math.ceil(n / 2)))
    for k, (a, b) in enumerate(pairs):
        ax = fig.add_subplot(math.ceil(n / 2), min(n, 2), k + 1)
        att = first["attainable_front"]
        if m == 2:  # the attainable front is a staircase of many points; LS picks some of them
            att = sorted(att)
            ax.step([p[a] for p in att], [p[b] for p in att], "k-", where="pre", lw=0.8, alpha=0.6, label="attainable front")
        else:
            ax.plot([p[a] for p in att], [p[b] for p in att], ".", color="0.8", ms=1, label="attainable front (projected)")
        ls = first["ls_judge_scores"]
        ax.plot([p[a] for p in ls], [p[b] for p in ls], "kx", ms=6, alpha=0.7, label="its LS points")
        for label, fr in runs:
            pts = fr["judge_scores"]
            ax.plot([p[a] for p in pts], [p[b] for p in pts], "-o" if m == 2 else "o", ms=4, label=label)
            if fr is first:
                for pref, pt in zip(fr["prefs"], pts):
                    ax.annotate(",".join(f"{x:.2g}" for x in pref), (pt[a], pt[b]), fontsize=6, alpha=0.7)
        s = first["sft_judge_scores"]
        ax.plot([s[a]], [s[b]], "r*", ms=12, label="SFT")
        ax.set_xlabel(objs[a]), ax.set_ylabel(objs[b]), ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if m >= 3:
        ax = fig.add_subplot(math.ceil(n / 2), min(n, 2), n, projection="3d")
        for label, fr in [("LS points of the attainable front", {"judge_scores": first["ls_judge_scores"]})] + list(runs):
            pts = fr["judge_scores"]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], s=12, label=label)
        ax.set_xlabel(objs[0]), ax.set_ylabel(objs[1]), ax.set_zlabel(objs[2])
        ax.legend(fontsize=7)
    fig.suptitle("Pareto front on held-out prompts (ground-truth judge scores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
