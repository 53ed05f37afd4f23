"""
RLHF for Panacea: rollouts, multi-objective PPO with a preference-conditioned critic, the
Bradley-Terry reward-model loss and DPO. train.py runs the loops; this file holds their steps.

Sequence layout (one row per sample, right-padded with the end token <|endoftext|>):
    tokens (B, T) = prompt (P_b tokens) + response (R_b tokens, the last one the end token) + padding
    log-probs, values, rewards and the response mask live on the T-1 "actions":
    position t predicts tokens[:, t+1]; the response's actions are t = P_b-1 .. P_b+R_b-2.

Prompts arrive as text already rendered by the model's chat template (tok.chat): nothing here
knows where they come from, and judging the responses is the caller's business.

One PPO iteration, with lambda fixed per sequence (train.py: collect -> advantages -> update):
    collect     1. rollout: generate a response per prompt under its own lambda
                2. score: old log-probs (the generation's own), reference log-probs (same model, adapters off),
                   values (critic, one head per objective), standardised reward-model scores
    advantages  3. rewards: r_{i,t} = -beta (log pi - log pi_ref)_t  (+ score_i at the last response token)
                4. GAE per objective (gamma = 1, lambda_GAE = 0.95) -> advantages A_i, returns
                5. aggregate: A_lambda = sum_i w_i A_i with w = dg_lambda/dJ (LS: w = lambda; Tche: lambda_i
                   on the active objective, chosen from J_i estimated by the sequences' returns
                   score_i - beta KL, averaged over the sequences that share lambda), whitened per lambda group
    update      6. a few epochs of clipped policy loss + clipped value loss on minibatches
One Panacea-DPO step (dpo_update): reference log-ratios once, then epochs of minibatches of the
aggregated per-objective DPO losses.
Log-probs are computed from the first response position on: a pretrained model's LM head (49k
tokens) is a fifth of its weights, and the prompt's log-probs are never used.
"""
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import token_logprobs
from panacea import aggregation_weights
from svd_lora import disable_adapters, preference_dim, set_preference


@dataclass
class PPOConfig:
    max_new_tokens: int = 60  # response length cap of the rollouts
    temperature: float = 1.0  # rollout sampling temperature
    kl_coef: float = 0.05  # beta: the per-token KL penalty folded into every objective's reward
    gae_lambda: float = 0.95  # GAE's lambda (gamma = 1)
    agg: str = "ls"  # aggregation of the objectives: "ls" (linear scalarisation) or "tche" (Tchebycheff)
    tche_mu: float = 0.1  # Tche: smooth with this temperature (0: the hard min, which collapsed at 3 of 5 seeds)
    epochs: int = 2  # passes over each iteration's rollouts: 80 iterations of 2 beat 80 of 1 (RESULTS.md)
    minibatch_size: int = 32  # sequences per gradient step
    clip: float = 0.2  # epsilon of the clipped ratio pi / pi_old
    clip_value: float = 0.2  # how far a value may move from its rollout-time estimate before the loss is clipped
    vf_coef: float = 0.5  # weight of the value loss
    grad_clip: float = 1.0  # gradient-norm clip
    compile: bool = False  # decode the rollouts with a compiled step (torch.compile; a CUDA graph on a GPU)


@dataclass
class DPOConfig:
    dpo_beta: float = 0.5  # beta of -log sigmoid(beta (h_w - h_l)), h = log pi / pi_ref
    agg: str = "ls"  # aggregation of the per-objective losses: "ls" or "tche" (ideal point z = 0)
    tche_mu: float = 0.0  # Tche: > 0 smooth with this temperature (0: the hard min)
    epochs: int = 1  # passes over each iteration's pairs: one (a second overfits them, RESULTS.md)
    minibatch_size: int = 32  # pairs per gradient step
    grad_clip: float = 1.0  # gradient-norm clip


def response_mask(prompt_len, seq_len, T):
    """(B, T-1) float mask of the response's actions."""
    t = torch.arange(T - 1, device=prompt_len.device)
    return ((t >= prompt_len[:, None] - 1) & (t < seq_len[:, None] - 1)).float()


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def whiten(x, mask, group, eps=1e-8):
    """x (B, T) shifted and scaled to mean 0, variance 1 over the masked tokens of each group of rows
    (group: (B,) ids 0..G-1), 0 outside the mask."""
    n = torch.zeros(int(group.max()) + 1, device=x.device).index_add_(0, group, mask.sum(1)).clamp_min(1.0)  # (G,)
    mean = torch.zeros_like(n).index_add_(0, group, (x * mask).sum(1)) / n
    d = (x - mean[group, None]) * mask
    var = torch.zeros_like(n).index_add_(0, group, (d ** 2).sum(1)) / n
    return d * torch.rsqrt(var[group, None] + eps)


def sequence_logprobs(model, tokens, start=0):
    """(B, T-1) log-probs of each next token under the model's current preference / adapters, for
    actions t >= start (the response's: start = min prompt_len - 1); those before are 0."""
    return F.pad(token_logprobs(model(tokens, from_pos=start)[0], tokens[:, start:]), (start, 0))


def last_token_values(model, tokens, seq_len):
    """(B, n_heads_out) outputs of a reward model at each sequence's last token (<|endoftext|>)."""
    values, _ = model(tokens)
    return values[torch.arange(tokens.size(0), device=tokens.device), seq_len - 1]


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(r_w - r_l), the reward-model loss of a preference pair."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def reward_model_loss(model, batch):
    """Bradley-Terry loss of every head on its objective's labels (ties left out): batch from data.pair_batch."""
    tokens, _, slen, winners = batch
    r = last_token_values(model, tokens, slen).float()
    r0, r1 = r[: winners.size(0)], r[winners.size(0):]
    valid = winners >= 0
    chosen, rejected = torch.where(winners == 0, r0, r1), torch.where(winners == 0, r1, r0)
    return bradley_terry_loss(chosen[valid], rejected[valid])


def dpo_losses(logratio_0, logratio_1, winners, beta):
    """Per-objective DPO losses of pairs: log-ratios h = log pi/pi_ref of response_0 and response_1,
    (B,) each, winner ids (B, m) -> (B, m) of -log sigmoid(beta (h_w - h_l)). A tie (winner -1)
    states no preference on that objective: its loss is 0 and gives no gradient."""
    sign = torch.where(winners == 0, 1.0, -1.0)  # +1 where response_0 wins on that objective
    loss = -F.logsigmoid(beta * sign * (logratio_0 - logratio_1)[:, None])
    return torch.where(winners >= 0, loss, torch.zeros_like(loss))


def preference_groups(prefs):
    """(B,) ids of the groups of sequences that share a row of prefs (B, m): one lambda draw each."""
    return torch.unique(prefs, dim=0, return_inverse=True)[1]


def group_weights(J, prefs, agg, ideal=None, mu=0.0):
    """dg_lambda/dJ_i per sequence, with J estimated per *group* of sequences that share lambda.
    Tchebycheff, min_i lambda_i (J_i - z_i), is a function of the expected J under lambda: which
    objective is active must be decided on the group's mean, not per sequence (where the prompt,
    not lambda, would decide it). LS weights are lambda either way. J, prefs (B, m) -> (B, m)."""
    return aggregation_weights(group_mean(J, prefs), prefs, agg, ideal, mu)


def group_mean(x, prefs):
    """x (B, m) with each row replaced by the mean over its group of sequences sharing lambda."""
    group = preference_groups(prefs)  # (B,) group id of each sequence
    ones = torch.ones_like(group, dtype=torch.float)
    n = torch.zeros(int(group.max()) + 1, device=x.device).index_add_(0, group, ones)  # (G,) sequences per group
    return (torch.zeros(n.size(0), x.size(1), device=x.device).index_add_(0, group, x.float()) / n[:, None])[group]


# ----------------------------------------------------------------------------------------------
# Rollouts

@torch.no_grad()
def rollout(policy, tok, prompts, prefs, max_new_tokens, temperature=1.0, top_k=None, logprobs=False, compile=False):
    """One response per prompt text, generated under prefs[b] ((B, m), or None for a model
    without preference slots), all in one left-padded generate call. Returns the samples in the
    right-padded layout above, tokens, prompt_len, seq_len (on the policy's device), and the
    response texts; a response that never ends (no tok.eot) is returned as None. logprobs=True also
    returns the (B, T-1) log-probs of the response's actions under the policy (0 elsewhere), as
    sequence_logprobs computes them, taken from the generation's own logits. compile=True decodes with a
    compiled step (model.generate), the prompts padded to a multiple of 16 so that few shapes are traced."""
    device = next(policy.parameters()).device
    enc = [tok.encode(p) for p in prompts]
    P = max(len(e) for e in enc)
    P = -(-P // 16) * 16 if compile else P  # (left padding is masked and counts no position)
    idx = torch.tensor([[tok.eot] * (P - len(e)) + e for e in enc], device=device)
    real = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in enc], device=device)
    if prefs is not None:
        set_preference(policy, prefs)
    out, gen_logp = policy.generate(idx, max_new_tokens, temperature, top_k, stop_token=tok.eot, attention_mask=real,
                                    compile=compile, logprobs=True)
    resp = out[:, P:]  # (B, N) generated tokens, the end token repeated after a row's first one
    ended = (resp == tok.eot).any(1)
    resp_len = torch.where(ended, (resp == tok.eot).int().argmax(1) + 1, resp.size(1))  # end token included
    prompt_len = real.sum(1)
    seq_len = prompt_len + resp_len
    # left-padded -> right-padded: row b starts at its first real token, P - prompt_len[b]
    t = torch.arange(int(seq_len.max()), device=device)
    tokens = out.gather(1, (t + P - prompt_len[:, None]).clamp(max=out.size(1) - 1))
    tokens = torch.where(t < seq_len[:, None], tokens, tok.eot)  # (B, T)
    texts = [tok.decode(r[: n - 1]) if e else None for r, n, e in zip(resp.tolist(), resp_len.tolist(), ended.tolist())]
    if not logprobs:
        return tokens, prompt_len, seq_len, texts
    j = torch.arange(resp.size(1), device=device)  # generated token j is the action at t = prompt_len - 1 + j
    at = (prompt_len[:, None] - 1 + j).clamp(max=tokens.size(1) - 2)  # (B, N); clamped ones lie past the end
    logp = torch.zeros(len(enc), tokens.size(1) - 1, device=device)
    logp.scatter_add_(1, at, torch.where(j < resp_len[:, None], gen_logp, 0.0))  # adds 0 where clamped
    return tokens, prompt_len, seq_len, texts, logp


def standardised_scores(reward_model, tokens, seq_len, finished, stats):
    """(B, m) reward-model scores (r - mean) / std, with the SFT samples' statistics. A response cut
    off by max_new_tokens ends on a token the reward model never scored in training: it gets the
    lowest score of the SFT samples instead of an extrapolation."""
    scores = (last_token_values(reward_model, tokens, seq_len).float() - stats["mean"]) / stats["std"]
    return torch.where(finished[:, None], scores, (stats["min"] - stats["mean"]) / stats["std"])


@torch.no_grad()
def finished_scores(reward_model, policy, tok, prompts, max_new_tokens):
    """(N, heads) reward-model outputs on the policy's sampled responses to rendered prompts, for the
    N that end within max_new_tokens (the reward model scores a response at its end token)."""
    tokens, _, seq_len, texts = rollout(policy, tok, prompts, None, max_new_tokens, 1.0)
    return last_token_values(reward_model, tokens, seq_len).float()[[t is not None for t in texts]]


# ----------------------------------------------------------------------------------------------
# PPO pieces

def kl_penalised_rewards(scores, logp, ref_logp, mask, seq_len, kl_coef):
    """(B, T-1, m) token rewards: -beta (log pi - log pi_ref) for every objective (the KL penalty
    folded into each J_i, so sum_i lambda_i r_i,t = sum_i lambda_i score_i - beta KL_t), plus each
    objective's sequence score at the last response action (t = seq_len - 2)."""
    kl = (logp - ref_logp) * mask  # per-token k1 estimator
    rewards = (-kl_coef * kl).unsqueeze(-1).repeat(1, 1, scores.size(-1))
    rewards[torch.arange(scores.size(0)), seq_len - 2] += scores
    return rewards


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation per objective: rewards, values (B, T, m), mask (B, T).
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1}; returns = A + V.
    Outside the response, rewards and values count as zero, so the last action bootstraps from 0."""
    values, rewards = values * mask.unsqueeze(-1), rewards * mask.unsqueeze(-1)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_v = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask.unsqueeze(-1)
    return adv, adv + values


def policy_loss(logp, old_logp, adv, mask, clip=0.2):
    """Clipped surrogate: E[max(-A r, -A clip(r, 1-eps, 1+eps))], r = pi / pi_old. Also the clip fraction."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
    return masked_mean(loss, mask), masked_mean(((ratio - 1).abs() > clip).float(), mask)


def value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss 0.5 E[max((V - R)^2, (V_old + clip(V - V_old) - R)^2)], averaged over objectives."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2).mean(-1)
    return masked_mean(loss, mask)


def optimizer_step(optimizer, loss, grad_clip):
    """Backward, clip the gradient norm, step. A non-finite loss or gradient norm raises
    FloatingPointError before the step, so bad gradients never reach the weights (under DDP the
    norm is of the all-reduced gradients, so every rank raises alike)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    if not math.isfinite(loss.item() + norm.item()):
        raise FloatingPointError("loss or gradient is not finite")
    optimizer.step()


@torch.no_grad()
def collect(policy, critic, reward_model, tok, prompts, prefs, cfg, rm_stats):
    """Steps 1-2: responses to the rendered prompts under prefs (B, m) (the baselines' adapters have
    no preference slots: their rows are their fixed lambda, used for aggregation only) and what PPO
    needs of them before any update. policy and critic are the plain modules (not DDP-wrapped: this
    is inference) and stay in eval mode: with dropout, the old and new log-probs of the ratio would
    come from different functions. Returns the batch as a dict."""
    conditioned = preference_dim(policy) > 0
    policy.eval()
    critic.eval()
    tokens, plen, slen, texts, logp = rollout(policy, tok, prompts, prefs if conditioned else None, cfg.max_new_tokens,
                                              cfg.temperature, logprobs=True, compile=cfg.compile)  # logp: its own
    finished = torch.tensor([t is not None for t in texts], device=tokens.device)
    if conditioned:
        set_preference(critic, prefs)
    start = int(plen.min()) - 1
    with disable_adapters(policy):
        ref_logp = sequence_logprobs(policy, tokens, start)
    return dict(tokens=tokens, plen=plen, slen=slen, texts=texts, finished=finished, prefs=prefs,
                conditioned=conditioned,
                mask=response_mask(plen, slen, tokens.size(1)), logp=logp, ref_logp=ref_logp,
                scores=standardised_scores(reward_model, tokens, slen, finished, rm_stats),
                values=critic(tokens)[0][:, :-1])  # (B, T-1, m): V(s_t) before action t


@torch.no_grad()
def advantages(batch, cfg, ideal=None):
    """Steps 3-5: KL-penalised rewards, GAE per objective, and Eq. (LS) / (Tche) on advantages:
    A_lambda = sum_i (dg/dJ_i) A_i, whitened within each group sharing lambda: A_lambda's scale differs
    from one lambda to another (at a vertex one objective counts, in the middle both), and whitened
    over the whole batch the lambdas with the largest spread would steer the shared adapter and
    drown the small differences that matter at the others (RESULTS.md measures the difference). For
    Tche, J_i(lambda) is the group's mean return of objective i, score_i - beta KL(sequence): a Monte-Carlo
    estimate from the batch itself. (The critic's value at the first response action estimates the same,
    but it starts from zero value heads and lags the policy, and an active objective chosen from its
    estimates drove one seed's front to collapse: RESULTS.md.) Adds "adv", "returns"."""
    mask, values = batch["mask"], batch["values"]
    rewards = kl_penalised_rewards(batch["scores"], batch["logp"], batch["ref_logp"], mask, batch["slen"], cfg.kl_coef)
    adv, batch["returns"] = gae(rewards, values, mask, 1.0, cfg.gae_lambda)
    J = batch["scores"] - cfg.kl_coef * ((batch["logp"] - batch["ref_logp"]) * mask).sum(-1, keepdim=True)  # (B, m)
    batch["J"] = group_mean(J, batch["prefs"])  # (B, m): the estimate of J_i(lambda) of each sequence's group
    w = aggregation_weights(batch["J"], batch["prefs"], cfg.agg, ideal, cfg.tche_mu)
    batch["adv"] = whiten((adv * w[:, None, :]).sum(-1), mask, preference_groups(batch["prefs"]))
    return batch


def update(policy, critic, optimizer, batch, cfg):
    """Step 6: epochs of minibatch steps on the clipped policy and value losses; returns mean logs.
    policy and critic may be DDP-wrapped: preferences reach the adapted layers inside either way."""
    stats, n_mb = defaultdict(float), 0
    for _ in range(cfg.epochs):
        for mb in torch.randperm(batch["tokens"].size(0), device=batch["tokens"].device).split(cfg.minibatch_size):
            if batch["conditioned"]:
                set_preference(policy, batch["prefs"][mb])
                set_preference(critic, batch["prefs"][mb])
            T = int(batch["slen"][mb].max())  # the minibatch's longest sequence: no work on the padding after it
            tokens, mask, a = batch["tokens"][mb, :T], batch["mask"][mb, : T - 1], (mb, slice(0, T - 1))
            logp = sequence_logprobs(policy, tokens, int(batch["plen"][mb].min()) - 1)
            pg, clipfrac = policy_loss(logp, batch["logp"][a], batch["adv"][a], mask, cfg.clip)
            vf = value_loss(critic(tokens)[0][:, :-1], batch["values"][a], batch["returns"][a], mask, cfg.clip_value)
            optimizer_step(optimizer, pg + cfg.vf_coef * vf, cfg.grad_clip)
            for k, v in (("pg_loss", pg), ("vf_loss", vf), ("clipfrac", clipfrac)):
                stats[k] += v.item()
            n_mb += 1
    return {k: v / n_mb for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------
# DPO

def pair_losses(policy, batch, mask, ref, ix, prefs, beta):
    """(b, m) per-objective DPO losses of pairs ix under their preferences prefs[ix], and their
    log-ratio margins h(y_0) - h(y_1), h = log pi/pi_ref summed over the response (ref: log pi_ref, (2B,))."""
    tokens, plen, _, winners = batch
    rows = torch.cat([ix, ix + winners.size(0)])  # both responses of each pair
    if preference_dim(policy):
        set_preference(policy, prefs[ix].repeat(2, 1))  # each response under its pair's lambda
    h = (sequence_logprobs(policy, tokens[rows], int(plen[rows].min()) - 1) * mask[rows]).sum(-1) - ref[rows]
    n = len(ix)
    return dpo_losses(h[:n], h[n:], winners[ix], beta), h[:n] - h[n:]


def dpo_update(policy, optimizer, batch, prefs, cfg):
    """One Panacea-DPO iteration on a batch of pairs from data.pair_batch: tokens (2B, T), prompt_len,
    seq_len, winners (B, m), with one preference per pair, prefs (B, m) (the baselines' rows: their
    fixed lambda). Reference log-probs once, then a few epochs of minibatch steps, as in PPO.
    J_i = -L_i (the DPO log-likelihood) is aggregated with weights dg/dJ_i (group_weights, on the
    batch's losses before the update): LS: loss = sum_i lambda_i L_i. Tche with ideal point z = 0
    (no log-likelihood exceeds 0): g = min_i lambda_i (J_i - 0), so the loss is lambda_i* L_i of the
    group's active objective i* = argmax_i lambda_i mean L_i. policy may be DDP-wrapped."""
    tokens, plen, slen, winners = batch
    B = winners.size(0)
    mask = response_mask(plen, slen, tokens.size(1))
    policy.eval()  # no dropout: the reference and the policy are the same function at init
    with torch.no_grad():
        with disable_adapters(policy):
            ref = (sequence_logprobs(policy, tokens, int(plen.min()) - 1) * mask).sum(-1)  # (2B,)
        w = prefs
        if cfg.agg != "ls":
            L, _ = pair_losses(policy, batch, mask, ref, torch.arange(B, device=tokens.device), prefs, cfg.dpo_beta)
            w = group_weights(-L, prefs, cfg.agg, 0.0, cfg.tche_mu)
    stats, n_mb = defaultdict(float), 0
    for _ in range(cfg.epochs):
        for mb in torch.randperm(B, device=tokens.device).split(cfg.minibatch_size):
            L, margin = pair_losses(policy, batch, mask, ref, mb, prefs, cfg.dpo_beta)  # (b, m)
            loss = (w[mb] * L).sum(-1).mean()
            optimizer_step(optimizer, loss, cfg.grad_clip)
            stats["loss"] += loss.item()
            stats["margin"] += margin.abs().mean().item()
            stats["dpo"] += L.detach().mean(0)
            n_mb += 1
    return {"loss": stats["loss"] / n_mb, "margin": stats["margin"] / n_mb, "dpo": (stats["dpo"] / n_mb).tolist()}
