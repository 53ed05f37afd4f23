"""
Every network of the pipeline, built from the checkpoints train.py writes (SFT, reward model,
Panacea or a baseline); train.py, evaluate.py and sample.py use these.

    load_gpt(sft_ck)                  the SFT model (a GPT or a pretrained Llama-style model, by its model_args),
                                      or its trunk with fresh scalar heads (n_heads_out > 0)
    RewardEnsemble(members)           the reward model: K copies of the SFT trunk with one Bradley-Terry head per
                                      objective each, trained side by side; it scores with their mean
    load_reward_model(rm_ck, sft_ck)  the trained ensemble, its heads restricted to the run's objectives, and the
                                      score statistics
    adapted_policy(...)               SFT model + Panacea's SVD-LoRA (k + m singular values, m of them lambda),
                                      or the baselines' plain low-rank adapter of the same rank
    critic_model(...)                 PPO's critic: the reward model's trunk, its own adapter, a value head each
    policy_at(sft_ck, pol_ck, pref)   the trained policy at lambda: Panacea writes lambda into its
                                      singular values; Rewarded Soups interpolates weight changes,
                                      W(lambda) = W0 + sum_i lambda_i Delta W_i; DPS has one model per grid point
    load_trained(out_dir)             a run's finished policy checkpoint, for sample.py
"""
import os

import torch

from model import GPT, GPTConfig
from svd_lora import inject_svd_lora, lora_layers, set_preference


def load_gpt(ck, device, n_heads_out=0, dtype=None):
    """A GPT with the SFT checkpoint's weights (an LM, or a trunk with fresh scalar heads), in dtype
    (None: as stored; bfloat16 halves a frozen copy's memory, as the Panacea stage's are on a GPU)."""
    model = GPT(GPTConfig(**ck["model_args"], n_heads_out=n_heads_out)).to(device)
    state = {k: v for k, v in ck["model"].items() if not k.startswith("lm_head")} if n_heads_out else ck["model"]
    model.load_state_dict(state, strict=not n_heads_out)
    return model.to(dtype) if dtype is not None else model


class RewardEnsemble(torch.nn.Module):
    """K reward models, each the SFT trunk with one scalar head per objective, trained on batches of their own
    (train.py:train_rm); the ensemble's output is their mean, (B, T, heads). A reward model fitted to
    Bradley-Terry labels is wrong in its own way on the rare answers that decide a trade-off (a fourth
    step, a warning after it); K independent fits average some of that out (RESULTS.md measures it)."""

    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, idx):
        return torch.stack([m(idx)[0] for m in self.members]).mean(0), None

    configure_optimizers = GPT.configure_optimizers  # AdamW over every member's parameters


def adapted_policy(sft_ck, m, conditioned, rank, alpha, device, dtype=None):
    """SFT model (frozen, in dtype) + adapter (float32): Panacea's SVD-LoRA with k + m singular values, m
    of them lambda; the baselines an ordinary low-rank adapter of the same rank k + m (no preference slots)."""
    pd = m if conditioned else 0
    return inject_svd_lora(load_gpt(sft_ck, device, dtype=dtype), rank + m - pd, pd, lora_alpha(rank, m, pd, alpha))


def lora_alpha(rank, m, pref_dim, alpha):
    """The alpha that gives c = alpha / k for an adapter with rank + m - pref_dim free singular values:
    Panacea and the baselines then share one multiplier, and so one effective step size."""
    return alpha * (rank + m - pref_dim) / rank


def critic_model(sft_ck, rm_ck, m, conditioned, rank, alpha, device, dtype=None):
    """The PPO critic: the first reward model's trunk (frozen, in dtype) with its own SVD-LoRA (conditioned like
    the policy) and a fresh, zero-initialised, trainable float32 value head per objective."""
    critic = GPT(GPTConfig(**sft_ck["model_args"], n_heads_out=m)).to(device)
    first = "members.0."
    critic.load_state_dict({k[len(first):]: v for k, v in rm_ck["model"].items()
                            if k.startswith(first) and not k.startswith(first + "value_head")}, strict=False)
    critic = critic.to(dtype) if dtype is not None else critic
    critic.value_head.float()
    torch.nn.init.zeros_(critic.value_head.weight)
    torch.nn.init.zeros_(critic.value_head.bias)
    pd = m if conditioned else 0
    inject_svd_lora(critic, rank + m - pd, pd, lora_alpha(rank, m, pd, alpha))
    critic.value_head.requires_grad_(True)
    return critic


def trained_model(sft_ck, pol_ck, j, device):
    """Model j of a policy checkpoint (Panacea has one; RS one per objective; DPS one per grid point)."""
    m, conditioned = len(pol_ck["objectives"]), pol_ck["method"] == "panacea"
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
        adapted = set(lora_layers(model_i))
        for name, mod in model_i.named_modules():
            if mod in adapted:
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


def load_reward_model(rm_ck, sft_ck, objectives, device, dtype=None):
    """The reward model ensemble (in dtype), its heads restricted to `objectives`, and their standardisation stats."""
    heads = [rm_ck["objectives"].index(o) for o in objectives]
    config = GPTConfig(**sft_ck["model_args"], n_heads_out=len(rm_ck["objectives"]))
    rm = RewardEnsemble([GPT(config) for _ in range(rm_ck["members"])]).to(device)
    rm.load_state_dict(rm_ck["model"])
    for member in rm.members:
        with torch.no_grad():
            head = torch.nn.Linear(member.value_head.in_features, len(heads)).to(device)
            head.weight.copy_(member.value_head.weight[heads])
            head.bias.copy_(member.value_head.bias[heads])
        member.value_head = head
    rm = rm.to(dtype) if dtype is not None else rm
    return rm.eval(), {k: v[heads].to(device) for k, v in rm_ck["stats"].items()}


def load_trained(out_dir, device):
    """The finished policy checkpoint OUT_DIR/panacea/ckpt.pt (self-contained: it holds its SFT base
    under "base"); a ValueError says what to do when it is missing, unreadable or unfinished."""
    path = os.path.join(out_dir, "panacea", "ckpt.pt")
    if not os.path.exists(path):
        raise ValueError(f"no trained model at {path}: run python train.py --out_dir {out_dir} first")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} ({type(e).__name__}); train again or point --out_dir elsewhere") from None
    if not ck.get("finished"):
        raise ValueError(f"{path} is unfinished: run python train.py --out_dir {out_dir} to complete it")
    return ck
