"""One model recovers the whole Pareto set, checked exactly on problems with a known answer.

x in R^4, two conflicting objectives built from the distances d_i = ||x - a_i|| (maximised):
    LS   on J_i = -d_i^2:  argmax sum_i lambda_i J_i          = lambda_1 a_1 + lambda_2 a_2
    Tche on J_i = -d_i:    argmax min_i lambda_i (J_i - 0)    = lambda_1 a_1 + lambda_2 a_2
(Tche balances lambda_1 d_1 = lambda_2 d_2 on the segment; LS on -d_i would jump to an endpoint,
so the Tche case also tells the two aggregations apart.) A frozen random MLP x = f(z) gets
SVD-LoRA on both layers and is trained with sampled lambda and `aggregate`; at held-out lambda
its output must match the closed form.
"""
import pytest
import torch
import torch.nn as nn

from panacea import aggregate, sample_prefs
from svd_lora import inject_svd_lora, set_preference


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, z):
        return self.c_proj(torch.tanh(self.c_fc(z)))


@pytest.mark.parametrize("method, power", [("ls", 2), ("tche", 1)])
def test_single_model_recovers_the_known_pareto_set(method, power):
    torch.manual_seed(0)
    a = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 0.5, 0.0, 1.0]])  # a_1, a_2
    model = inject_svd_lora(MLP(), rank=4, pref_dim=2, alpha=4.0)
    z = torch.randn(1, 8)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 800)
    for _ in range(800):
        prefs = sample_prefs(32, 2, vertex_prob=0.2)
        set_preference(model, prefs)
        x = model(z.expand(32, 8))  # (32, 4): one solution per preference
        J = -(x[:, None, :] - a[None]).norm(dim=-1) ** power  # (32, 2)
        loss = -aggregate(J, prefs, method, ideal=torch.zeros(2)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    D = (a[0] - a[1]).norm()
    for l1 in [0.05, 0.2, 0.37, 0.5, 0.63, 0.81, 0.95]:  # held out: Dirichlet draws never hit them exactly
        set_preference(model, torch.tensor([l1, 1 - l1]))
        with torch.no_grad():
            x = model(z)[0]
        target = l1 * a[0] + (1 - l1) * a[1]
        assert (x - target).norm() < 0.02 * D, (l1, x, target)
