"""
The Pareto front of a trained policy on held-out prompts (train.py, compare.py).

    measure(...)        for every lambda of the grid, and for the SFT model: responses to the held-out
                        prompts (fixed seed, greedy by default), scored by the source's judges (the
                        world's) and by the reward models -> per-lambda sums of the scores
    record(...)         the front.json record: the mean point xi(lambda) per lambda, the SFT point, the
                        Pareto metrics; where the source knows its limits (the world) also the attainable
                        front, its LS points, the fixed reference point and the hypervolume ratio, and the
                        ceilings below it (*_ceiling: the KL-regularised optimum with the judges and with
                        the run's reward models as rewards). Data without judges (your own) is measured
                        with the reward models alone, as in the paper, and the front says so ("scored_by").
    rm_reward(...)      the run's reward models as reward(prompts, texts), for the reward-model ceiling
    rm_ceiling(...)     that ceiling's hypervolume over the attainable front's (the rm stage prints it)
    pair_accuracy(...)  the share of held-out pairs the reward models order as their labels do, per head
    well_formed(...)    the share of a model's responses to the held-out prompts that are well formed (the world's)
    print_front, write_front(front, out_dir)   the table, front.json and pareto.png (plot.plot_fronts)
"""
import json
import math
import os

import torch
import torch.distributed as dist

from build import load_gpt, load_reward_model, policy_at
from common import all_reduce
from data import encode_samples, pair_batch
from panacea import front_metrics, hypervolume
from plot import plot_fronts, points
from rlhf import last_token_values, rollout, standardised_scores
from tokenizer import load as load_tokenizer

RM_REFERENCE = -2.0  # reward-model hypervolume reference: 2 SFT standard deviations below the SFT mean
MAX_STORED = 5000  # attainable-front points kept in front.json
CHUNK = 512  # (lambda, prompt) rows generated in one batch


@torch.no_grad()
def score(model, tok, prompts, prefs, rm, stats, judge, objectives, temperature, max_new_tokens):
    """Responses to prompt texts under prefs (N, m) or None -> (judge (N, m) scores, or the rm ones
    where there are no judges; rm (N, m) scores, standardised as in PPO)."""
    tokens, _, slen, texts = rollout(model, tok, [tok.chat(p) for p in prompts], prefs, max_new_tokens, temperature)
    finished = torch.tensor([t is not None for t in texts], device=tokens.device)
    r = standardised_scores(rm, tokens, slen, finished, stats)
    return (judge(prompts, texts, objectives).to(r.device) if judge is not None else r), r


@torch.no_grad()
def measure(sft_ck, rm_ck, pol_ck, grid, prompts, judge, temperature, max_new_tokens, seed, device, rank=0,
            world_size=1):
    """Sums over the held-out prompts, per lambda of the grid and for the SFT model (the last row):
    {"judge", "judge_sq", "rm"}: (G+1, m) sums of the judge scores (the rm's where judge is None),
    their squares and the rm scores, "n": (G+1,) counts. Every process scores its share of the
    (lambda, prompt) rows; the sums are all-reduced."""
    objectives = pol_ck["objectives"]
    tok = load_tokenizer(sft_ck["tokenizer"])
    rm, stats = load_reward_model(rm_ck, sft_ck, objectives, device)
    sums = {k: torch.zeros(len(grid) + 1, len(objectives), device=device) for k in ("judge", "judge_sq", "rm")}
    sums["n"] = torch.zeros(len(grid) + 1, device=device)
    args = (rm, stats, judge, objectives, temperature, max_new_tokens)

    def add(j, judged, r):
        sums["judge"][j] += judged.sum(0)
        sums["judge_sq"][j] += (judged ** 2).sum(0)
        sums["rm"][j] += r.sum(0)
        sums["n"][j] += len(judged)

    torch.manual_seed(seed)
    if pol_ck["method"] == "panacea":  # one model, one preference per row: every lambda in one batch
        model, _ = policy_at(sft_ck, pol_ck, grid[0], device)
        rows = [(j, p) for j in range(len(grid)) for p in prompts][rank::world_size]
        for chunk in range(0, len(rows), CHUNK):
            part = rows[chunk: chunk + CHUNK]
            prefs = torch.tensor([grid[j] for j, _ in part], device=device)  # (rows, m)
            judged, r = score(model, tok, [p for _, p in part], prefs, *args)
            for j in set(j for j, _ in part):
                sel = torch.tensor([jj == j for jj, _ in part], device=device)
                add(j, judged[sel], r[sel])
    else:  # a baseline: one model per lambda
        for j, pref in enumerate(grid):
            model, _ = policy_at(sft_ck, pol_ck, pref, device)
            add(j, *score(model, tok, prompts[rank::world_size], None, *args))
    add(len(grid), *score(load_gpt(sft_ck, device).eval(), tok, prompts[rank::world_size], None, *args))
    if world_size > 1:
        for t in sums.values():
            dist.all_reduce(t)
    return {k: v.cpu().double() for k, v in sums.items()}


def rm_reward(sft_ck, rm_ck, objectives, device):
    """reward(prompt texts, response texts) -> (N, m) numpy array: the run's reward models' scores of
    finished responses, standardised with the SFT samples' statistics as in PPO."""
    tok = load_tokenizer(sft_ck["tokenizer"])
    rm, stats = load_reward_model(rm_ck, sft_ck, objectives, device)

    @torch.no_grad()
    def reward(prompts, texts):
        tokens, _, slen = encode_samples(tok, [tok.chat(p) for p in prompts], texts)
        out = []
        for ix in torch.arange(len(texts)).split(256):
            T = int(slen[ix].max())
            r = last_token_values(rm, tokens[ix, :T].to(device), slen[ix].to(device)).float()
            out.append(((r - stats["mean"]) / stats["std"]).cpu())
        return torch.cat(out).numpy()

    return reward


def rm_ceiling(sft_ck, rm_ck, source, objectives, grid, beta, device):
    """HV / attainable of the KL optimum at beta with the run's reward models as rewards (world.kl_optimum)."""
    limits = source.limits(objectives, grid, grid, beta, rm_reward(sft_ck, rm_ck, objectives, device))
    return hypervolume(limits["rm_ceiling"]["mode"], limits["reference_point"]) / limits["attainable_hypervolume"]


@torch.no_grad()
def pair_accuracy(model, pairs, device, rank=0, world_size=1):
    """Per head, the share of pairs (data.pair_tensors) the reward models order as the labels do, ties left
    out; every process scores its share of the pairs, in batches of 256."""
    correct = count = 0
    for ix in torch.arange(len(pairs[3]))[rank::world_size].split(256):
        tokens, _, slen, winners = pair_batch(pairs, ix, device)
        r = last_token_values(model, tokens, slen).float()  # (2B, m): first responses 0, then responses 1
        labelled = winners >= 0
        correct = correct + (((r[: winners.size(0)] > r[winners.size(0):]) == (winners == 0)) & labelled).sum(0)
        count = count + labelled.sum(0)
    return (all_reduce(correct, device) / all_reduce(count, device)).tolist()


def well_formed(model, tok, source, temperature, max_new_tokens, device, rank=0, world_size=1):
    """The share of the model's responses to the source's held-out prompts that source.well_formed accepts
    (an unfinished response is not); every process answers its share of the prompts."""
    texts = rollout(model, tok, [tok.chat(q) for q in source.prompts("eval")[rank::world_size]], None,
                    max_new_tokens, temperature)[3]
    return all_reduce(sum(t is not None and source.well_formed(t) for t in texts) / len(texts), device).item()


def record(sums, grid, pol_ck, limits, n_prompts):
    """The front.json record of measured sums: the learned points (judge and rm), the SFT point, the
    metrics and the cost; with the source's limits (None for your own data) the attainable front,
    its LS points, the reference point and the hypervolume ratio, and the ceilings' points (mode and
    expectation of pi*), their KL to pi_ref and their hypervolume ratios."""
    objectives, m = pol_ck["objectives"], len(pol_ck["objectives"])
    n = sums["n"][:, None]
    mean, rm_mean = sums["judge"] / n, sums["rm"] / n
    stderr = ((sums["judge_sq"] / n - mean ** 2).clamp_min(0) / (n - 1).clamp_min(1)).sqrt()
    rm_pts = rm_mean[:-1].tolist()
    front = {"objectives": objectives, "prefs": grid, "n_prompts": n_prompts, "rm_scores": rm_pts,
             "sft_rm_scores": rm_mean[-1].tolist(), "cost": {"models": len(pol_ck["fixed_prefs"]),
             "update_steps": pol_ck["update_steps"], "seconds": round(pol_ck["seconds"], 1)}}
    rm_metrics = front_metrics(rm_pts, grid, [RM_REFERENCE] * m)
    if limits is None:
        rm_metrics["mean_stderr"] = float(stderr[:-1].mean())
        return dict(front, scored_by="reward models (the data has no judges)", metrics={"rm": rm_metrics})
    judge_pts, sft_pt, ref = mean[:-1].tolist(), mean[-1].tolist(), limits["reference_point"]
    jm = front_metrics(judge_pts, grid, ref)
    jm["mean_stderr"] = float(stderr[:-1].mean())
    if m == 2:  # largest move against lambda along the grid (lambda_1 ascending: objective 1 up, 2 down)
        d = [(b[0] - a[0], a[1] - b[1]) for a, b in zip(judge_pts, judge_pts[1:])]
        jm["max_reversal"] = max(0.0, -min(min(x) for x in d))
    # the front is stored whole up to MAX_STORED points (m = 2: a few hundred), else evenly thinned
    attainable = limits["attainable_front"]
    keep = attainable[:: math.ceil(len(attainable) / MAX_STORED)]
    for name in ("judge_ceiling", "rm_ceiling", "dpo_ceiling"):  # pi*_lambda's points, and their share of the limit
        if name not in limits:
            continue
        c = limits[name]
        hv = {k: hypervolume(c[k], ref) for k in ("mode", "expectation")}
        front[name] = {"beta": c["beta"], "mode": c["mode"].tolist(), "expectation": c["expectation"].tolist(),
                       "kl": c["kl"].tolist(), "hypervolume": hv,
                       "ratio": {k: v / limits["attainable_hypervolume"] for k, v in hv.items()}}
    return dict(
        front, scored_by="the world's judges", judge_scores=judge_pts, sft_judge_scores=sft_pt,
        ls_judge_scores=limits["ls_points"], attainable_front=keep.round(6).tolist(), reference_point=ref,
        metrics={"judge": jm, "rm": rm_metrics, "attainable_hypervolume": limits["attainable_hypervolume"],
                 "attainable_points": len(attainable),
                 "hypervolume_ratio": jm["hypervolume"] / limits["attainable_hypervolume"],
                 "ls_hypervolume": limits["ls_hypervolume"], "sft_hypervolume": hypervolume([sft_pt], ref)})


def print_front(front):
    objs, (pts, sft) = front["objectives"], points(front)
    world_front = "judge_scores" in front
    print("lambda".ljust(22) + "".join(f"{o:>10}" for o in objs)
          + f"   (scored by {front['scored_by']} on {front['n_prompts']} held-out prompts"
          + ("; the attainable front's LS point in brackets)" if world_front else "; standardised scores)"))
    for k, (pref, pt) in enumerate(zip(front["prefs"], pts)):
        ls = "   [" + ", ".join(f"{x:.3f}" for x in front["ls_judge_scores"][k]) + "]" if world_front else ""
        print(",".join(f"{x:.2f}" for x in pref).ljust(22) + "".join(f"{x:10.3f}" for x in pt) + ls)
    print("sft".ljust(22) + "".join(f"{x:10.3f}" for x in sft))
    mt = front["metrics"]
    if world_front:
        print(f"hypervolume {mt['judge']['hypervolume']:.4f} (attainable {mt['attainable_hypervolume']:.4f}, "
              f"ratio {mt['hypervolume_ratio']:.3f}; LS points {mt['ls_hypervolume']:.4f}; "
              f"sft point {mt['sft_hypervolume']:.4f}), "
              f"inner product {mt['judge']['inner_product']:.3f}, sparsity {mt['judge']['sparsity']:.4f}, "
              f"spacing {mt['judge']['spacing']:.4f}, mean stderr {mt['judge']['mean_stderr']:.3f}")
        print("where the hypervolume goes (HV / attainable): attainable front 1.000 > its LS points "
              f"{mt['ls_hypervolume'] / mt['attainable_hypervolume']:.3f}"
              + "".join(f" > KL optimum with the {who} (beta {c['beta']:g}) {c['ratio']['mode']:.3f} "
                        f"(expectation {c['ratio']['expectation']:.3f})"
                        for who, c in (("judges", front.get("judge_ceiling")),
                                       ("reward models", front.get("rm_ceiling")),
                                       ("DPO's labels", front.get("dpo_ceiling"))) if c)
              + f" > learned {mt['hypervolume_ratio']:.3f}")
    else:
        print(f"reward-model hypervolume {mt['rm']['hypervolume']:.4f} (reference {RM_REFERENCE} per objective), "
              f"inner product {mt['rm']['inner_product']:.3f}, sparsity {mt['rm']['sparsity']:.4f}, "
              f"mean stderr {mt['rm']['mean_stderr']:.3f}; no ceilings: the data has no judges to compute them")


def write_front(front, out_dir, label):
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "front.json.tmp")
    with open(tmp, "w") as f:
        json.dump(front, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "front.json"))
    plot_fronts([(label, front)], os.path.join(out_dir, "pareto.png"))
