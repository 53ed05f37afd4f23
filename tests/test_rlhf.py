import math

import pytest
import torch

import world as W
from conftest import tiny_gpt
from model import GPT, GPTConfig
from panacea import aggregate
from rlhf import (bradley_terry_loss, dpo_iteration, dpo_losses, encode_samples, gae, kl_penalised_rewards, pack,
                  policy_loss, response_mask, rollout, sequence_logprobs, value_loss)
from svd_lora import disable_adapters, inject_svd_lora, set_preference


def test_response_mask_covers_exactly_the_response_actions():
    # prompt of 3 tokens, response of 2 (+ end token): actions predicting tokens 3, 4, 5 are t = 2, 3, 4
    mask = response_mask(torch.tensor([3, 2]), torch.tensor([6, 4]), 7)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]]


def test_gae_equals_the_brute_force_sum():
    torch.manual_seed(0)
    B, T, m, gamma, lam = 2, 7, 3, 0.9, 0.8
    r, v = torch.randn(B, T, m), torch.randn(B, T, m)
    mask = torch.ones(B, T)
    mask[1, 5:] = 0
    adv, ret = gae(r, v, mask, gamma, lam)
    for b in range(B):
        L = int(mask[b].sum())
        vb = torch.cat([v[b, :L], torch.zeros(1, m)])  # the value after the last action is 0
        delta = [r[b, t] + gamma * vb[t + 1] - vb[t] for t in range(L)]
        for t in range(L):
            brute = sum((gamma * lam) ** k * delta[t + k] for k in range(L - t))
            assert torch.allclose(adv[b, t], brute, atol=1e-5)
            assert torch.allclose(ret[b, t], brute + v[b, t], atol=1e-5)
        assert (adv[b, L:] == 0).all()


def test_clipped_losses_at_ratio_one_and_when_clipping():
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.zeros(1, 3)
    loss, clipfrac = policy_loss(logp, logp, adv, mask)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2) and clipfrac.item() == 0
    # ratio e^1 > 1.2 with a positive advantage: the clipped term (1.2 A) is taken, gradient 0
    new = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    loss, clipfrac = policy_loss(new, logp, adv, mask)
    assert loss.item() == pytest.approx((-1.2 * 1.0 + 2.0) / 2) and clipfrac.item() == 0.5
    loss.backward()
    assert new.grad[0, 0] == 0
    # value loss: the larger of the clipped and unclipped errors
    v, old, ret = torch.tensor([[[1.0]]]), torch.tensor([[[0.0]]]), torch.tensor([[[1.0]]])
    assert value_loss(v, old, ret, torch.ones(1, 1), clip=0.2).item() == pytest.approx(0.5 * 0.8 ** 2)


def test_score_lands_on_the_last_response_token_and_kl_is_per_token():
    scores = torch.tensor([[1.0, -1.0], [2.0, 3.0]])
    plen, slen = torch.tensor([3, 2]), torch.tensor([6, 4])
    mask = response_mask(plen, slen, 7)
    logp, ref = torch.zeros(2, 6), torch.zeros(2, 6)
    logp[0, 2] = 0.5
    r = kl_penalised_rewards(scores, logp, ref, mask, slen, kl_coef=0.1)
    assert r.shape == (2, 6, 2)
    assert torch.allclose(r[0, 4], scores[0]) and torch.allclose(r[1, 2], scores[1])  # t = seq_len - 2
    assert torch.allclose(r[0, 2], torch.tensor([-0.05, -0.05]))  # the KL penalty goes to every objective
    assert r.abs().sum() == pytest.approx(scores.abs().sum() + 0.1)


def test_kl_reward_is_zero_when_the_policy_equals_the_reference():
    tok = W.Tokenizer()
    policy = inject_svd_lora(tiny_gpt(vocab_size=tok.vocab_size, block_size=96), rank=2, pref_dim=2, alpha=4.0).eval()
    prompts = [p for _, p in W.prompts("train")[:6]]
    prefs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]] * 2)
    tokens, plen, slen, texts = rollout(policy, tok, prompts, prefs, 20)
    assert tokens.shape[0] == 6 and all(tokens[b, : plen[b]].tolist() == tok.encode(W.chat(prompts[b])) for b in range(6))
    set_preference(policy, prefs)
    logp = sequence_logprobs(policy, tokens)
    with disable_adapters(policy):
        ref = sequence_logprobs(policy, tokens)
    mask = response_mask(plen, slen, tokens.size(1))
    r = kl_penalised_rewards(torch.zeros(6, 2), logp, ref, mask, slen, kl_coef=0.1)
    assert r.abs().max() == 0


def test_bradley_terry_loss():
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(1 + math.exp(-1)))


def test_dpo_losses_on_a_hand_computed_example_and_their_aggregation():
    h0, h1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    winners = torch.tensor([[0, 1], [1, 1]])  # pair 0: objective 0 prefers response_0, objective 1 response_1
    L = dpo_losses(h0, h1, winners, beta=0.5)
    sp = lambda x: math.log(1 + math.exp(-x))  # -log sigmoid(x)
    assert torch.allclose(L, torch.tensor([[sp(0.5), sp(-0.5)], [sp(1.0), sp(1.0)]]), atol=1e-6)
    Lbar, pref = L.mean(0), torch.tensor([0.3, 0.7])
    assert -aggregate(-Lbar, pref, "ls") == pytest.approx(float(0.3 * Lbar[0] + 0.7 * Lbar[1]))
    assert -aggregate(-Lbar, pref, "tche", 0.0) == pytest.approx(float(max(0.3 * Lbar[0], 0.7 * Lbar[1])))


def test_dpo_step_increases_the_chosen_responses_log_ratio():
    tok = W.Tokenizer()
    torch.manual_seed(0)
    policy = inject_svd_lora(GPT(GPTConfig(block_size=96, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64)),
                             rank=2, pref_dim=2, alpha=4.0)
    rng = __import__("random").Random(0)
    prompts = [p for _, p in W.prompts("train")[:8]]
    r0 = [W.sample_response(W.task_of(p), rng).text() for p in prompts]
    r1 = [W.sample_response(W.task_of(p), rng).text() for p in prompts]
    tokens, plen, slen = encode_samples(tok, prompts * 2, r0 + r1)
    winners = torch.tensor([[0, 1]] * 8)  # objective 0 prefers response_0
    pref = torch.tensor([1.0, 0.0])
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    cfg = {"dpo_beta": 0.1, "agg": "ls", "tche_mu": 0.0, "grad_clip": 1.0, "epochs": 1, "minibatch_size": 8}

    def margin():
        set_preference(policy, pref)
        mask = response_mask(plen, slen, tokens.size(1))
        with torch.no_grad():
            h = (sequence_logprobs(policy, tokens) * mask).sum(-1)
            with disable_adapters(policy):
                h = h - (sequence_logprobs(policy, tokens) * mask).sum(-1)
        return (h[:8] - h[8:]).mean().item()

    assert margin() == 0.0  # policy = reference at init
    for _ in range(5):
        dpo_iteration(policy, opt, (tokens, plen, slen, winners), pref.expand(8, 2), cfg)
    assert margin() > 0.1


def test_pack_right_pads():
    t, n = pack([[1, 2, 3], [4]], pad=0)
    assert t.tolist() == [[1, 2, 3], [4, 0, 0]] and n.tolist() == [3, 1]


class JudgeRewardModel(torch.nn.Module):
    """A reward model that is exact: the world's judges applied to the decoded text, at every position."""

    def __init__(self, tok, objectives):
        super().__init__()
        self.tok, self.objectives = tok, objectives

    def forward(self, idx):
        out = []
        for row in idx.tolist():
            text = self.tok.decode(row[: row.index(self.tok.eot)] if self.tok.eot in row else row)
            prompt, _, response = text.partition("\nAssistant:")
            out.append(W.judge_text(W.task_of(prompt), response, self.objectives))
        return torch.tensor(out)[:, None, :].expand(-1, idx.size(1), -1), None  # (B, T, m)


@pytest.fixture(scope="module")
def tiny_sft():
    """A tiny policy taught the world's response format in a few seconds."""
    tok = W.Tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64))
    recs = W.sft_corpus(2000, seed=0)
    tokens, plen, slen = encode_samples(tok, [r["prompt"] for r in recs], [r["response"] for r in recs])
    targets = torch.where(response_mask(plen, slen, tokens.size(1)).bool(), tokens[:, 1:], -1)
    opt = model.configure_optimizers(0.0, 3e-3)
    for _ in range(200):
        ix = torch.randint(len(tokens), (32,))
        loss = model(tokens[ix, :-1], targets[ix])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tok, model.state_dict()


@pytest.mark.parametrize("objective", [0, 1])
def test_ppo_at_a_one_hot_preference_raises_that_objective_and_moves_away_from_the_reference(objective, tiny_sft):
    from rlhf import ppo_iteration
    tok, state = tiny_sft
    torch.manual_seed(1)
    cfg = dict(block_size=96, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64)
    policy = GPT(GPTConfig(**cfg))
    policy.load_state_dict(state)
    policy = inject_svd_lora(policy, rank=4, pref_dim=2, alpha=8.0)
    critic = inject_svd_lora(GPT(GPTConfig(**cfg, n_heads_out=2)), rank=4, pref_dim=2, alpha=8.0)
    critic.value_head.requires_grad_(True)
    params = [p for p in list(policy.parameters()) + list(critic.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    objectives = ["helpful", "harmless"]
    rm = JudgeRewardModel(tok, objectives)
    stats = {"mean": torch.zeros(2), "std": torch.ones(2)}
    run_cfg = dict(max_new_tokens=50, temperature=1.0, kl_coef=0.01, gae_lambda=0.95, agg="ls", tche_mu=0.0, epochs=2,
                   minibatch_size=16, clip=0.2, clip_value=0.2, vf_coef=0.5, grad_clip=1.0, objectives=objectives)
    prompts = W.prompts("train")
    pref = torch.eye(2)[objective].expand(32, 2)
    scores, kls = [], []
    for it in range(12):
        batch = [prompts[i] for i in torch.randint(len(prompts), (32,)).tolist()]
        s = ppo_iteration(policy, critic, rm, opt, tok, batch, pref, run_cfg, stats)
        scores.append(s["judge"][objective])
        kls.append(s["kl"])
    print(objective, [round(x, 3) for x in scores], [round(x, 3) for x in kls])
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.1
    assert kls[-1] > 0.1


def test_optimizer_step_refuses_a_non_finite_gradient_before_stepping():
    from rlhf import optimizer_step
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    optimizer_step(opt, (w * 2).sum(), 1.0)
    moved = w.detach().clone()
    assert not torch.equal(moved, torch.ones(3))
    with pytest.raises(FloatingPointError):
        optimizer_step(opt, (w * float("nan")).sum(), 1.0)
    assert torch.equal(w.detach(), moved)
