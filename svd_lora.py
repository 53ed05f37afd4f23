"""
SVD-LoRA with the user's preference vector written into singular values (Panacea, Zhong et al. 2024).

Every adapted linear layer y = x W0^T + b (W0 frozen) becomes

    W(lambda) = W0 + c * U diag(sigma_1..sigma_k, s*lambda_1..s*lambda_m) V^T          (Panacea eq.)

    U: (d_out, k+m), V: (d_in, k+m)  learned singular vectors shared by all preferences
    sigma: (k,)                      learned, preference-agnostic singular values
    s: scalar                        learned, one per weight matrix, scales lambda to the sigmas
    lambda: (m,) or (B, m)           the preference: a buffer, an input, never trained
    c = alpha / k                    constant LoRA multiplier

Init sigma = 0, s = 0, U, V ~ N(0, 0.02): the adapted model equals the base model exactly.
The forward pass never forms Delta W: y = x W0^T + b + c * ((x V) * e) U^T with
e = [sigma; s*lambda] (r,) or, for one preference per sequence, (B, 1, r).
With pref_dim = 0 the layer is an ordinary (AdaLoRA-style) low-rank adapter: the baselines use it.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn


class SVDLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, pref_dim: int, alpha: float):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        r = rank + pref_dim
        self.lora_U = nn.Parameter(torch.randn(base.out_features, r, device=base.weight.device) * 0.02)
        self.lora_V = nn.Parameter(torch.randn(base.in_features, r, device=base.weight.device) * 0.02)
        self.lora_sigma = nn.Parameter(torch.zeros(rank, device=base.weight.device))
        self.lora_s = nn.Parameter(torch.zeros((), device=base.weight.device)) if pref_dim else None
        # lambda is an input: a buffer, not saved in checkpoints, never given gradient
        pref = torch.full((pref_dim,), 1.0 / max(pref_dim, 1), device=base.weight.device)
        self.register_buffer("pref", pref, persistent=False)
        self.rank, self.pref_dim, self.scaling = rank, pref_dim, alpha / rank
        self.enabled, self.merged = True, False

    def singular_values(self):
        """e = [sigma; s * lambda]: (k+m,) for one preference, (B, k+m) for one per sequence."""
        if not self.pref_dim:
            return self.lora_sigma
        e_pref = self.lora_s * self.pref
        return torch.cat([self.lora_sigma.expand(*e_pref.shape[:-1], self.rank), e_pref], dim=-1)

    def delta_weight(self):
        """c * U diag(e) V^T, (d_out, d_in), for the current single preference."""
        e = self.singular_values()
        assert e.dim() == 1, "Delta W exists for one preference, not one per sequence"
        return self.scaling * (self.lora_U * e) @ self.lora_V.T

    def forward(self, x):
        y = self.base(x)
        if not self.enabled or self.merged:
            return y
        e = self.singular_values() * self.scaling  # c folded into the r singular values, not the (B, T, d_out) output
        if e.dim() == 2:
            assert e.size(0) == x.size(0), f"{e.size(0)} preferences for a batch of {x.size(0)}"
            e = e.view(e.size(0), *([1] * (x.dim() - 2)), e.size(1))  # (B, 1, r): one per sequence
        h = ((x @ self.lora_V) * e).reshape(-1, e.size(-1))  # (B*T, r)
        return torch.addmm(y.reshape(-1, y.size(-1)), h, self.lora_U.T).view(y.shape)  # y + h U^T, (B, T, d_out)

    def extra_repr(self):
        return f"rank={self.rank}, pref_dim={self.pref_dim}, scaling={self.scaling:g}"


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, SVDLoRALinear)]


def preference_dim(model):
    """m of the model's preference-conditioned layers (0: none, e.g. an ordinary adapter)."""
    return max((l.pref_dim for l in lora_layers(model)), default=0)


GPT_MATRICES = ("c_attn", "c_proj", "c_fc")  # attention qkv and out-proj, MLP up and down
LLAMA_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def inject_svd_lora(model, rank=8, pref_dim=2, alpha=16.0, targets=GPT_MATRICES + LLAMA_MATRICES):
    """Freeze every parameter of `model`, then wrap each nn.Linear whose name ends in one of
    `targets` (default: every attention and MLP matrix of both block types) in an SVDLoRALinear.
    The LM head and embeddings are left alone. Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, SVDLoRALinear(child, rank, pref_dim, alpha))
    assert lora_layers(model), f"no linear layer named {targets} found"
    return model


def check_preference(pref, m):
    """pref as a float32 tensor of shape (m,) or (B, m), each row in the simplex, else ValueError."""
    pref = torch.as_tensor(pref, dtype=torch.float32)
    if pref.dim() not in (1, 2) or pref.size(-1) != m:
        raise ValueError(f"preference must have shape ({m},) or (B, {m}); got {tuple(pref.shape)}")
    if not torch.isfinite(pref).all():
        raise ValueError("preference has NaN or infinite values")
    if (pref < 0).any():
        raise ValueError("preference has negative values")
    if not torch.allclose(pref.sum(-1), torch.ones(()), atol=1e-4):
        raise ValueError(f"preference must sum to 1; sums to {pref.sum(-1).tolist()}")
    return pref


def set_preference(model, pref):
    """Write lambda into the last m singular values of every adapted layer: one preference for
    the batch (m,) or one per sequence (B, m)."""
    layers = [l for l in lora_layers(model) if l.pref_dim]
    if not layers:
        raise ValueError("model has no preference slots (inject_svd_lora with pref_dim > 0)")
    pref = check_preference(pref, layers[0].pref_dim)
    for l in layers:
        if l.merged:
            raise ValueError("unmerge() before changing the preference of a merged model")
        l.pref = pref.to(l.pref.device)


@torch.no_grad()
def merge(model):
    """Fold the current single preference into the frozen weights: W0 <- W0 + Delta W(lambda)."""
    for l in lora_layers(model):
        if not l.merged:
            l.base.weight += l.delta_weight().to(l.base.weight.dtype)
            l.merged = True


@torch.no_grad()
def unmerge(model):
    """Undo merge(): W0 <- W0 - Delta W(lambda), the same Delta W since lambda cannot change while merged."""
    for l in lora_layers(model):
        if l.merged:
            l.base.weight -= l.delta_weight().to(l.base.weight.dtype)
            l.merged = False


@contextmanager
def disable_adapters(model):
    """Inside the block the model computes its base model (the frozen reference policy)."""
    layers = lora_layers(model)
    if any(l.merged for l in layers):
        raise ValueError("unmerge() before disabling adapters")
    for l in layers:
        l.enabled = False
    try:
        yield model
    finally:
        for l in layers:
            l.enabled = True


def lora_state_dict(model):
    """The trained part of an adapted model: the adapter factors (the base stays with the SFT model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def orthogonal_penalty(model):
    """AdaLoRA's regulariser sum over layers of ||U^T U - I||_F + ||V^T V - I||_F (off by default)."""
    total = 0.0
    for l in lora_layers(model):
        eye = torch.eye(l.lora_U.size(1), device=l.lora_U.device)
        total = total + torch.linalg.norm(l.lora_U.T @ l.lora_U - eye) + torch.linalg.norm(l.lora_V.T @ l.lora_V - eye)
    return total
