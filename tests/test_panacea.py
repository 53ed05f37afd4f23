import math

import numpy as np
import pytest
import torch

from panacea import (aggregate, aggregation_weights, hypervolume, inner_product, parse_pref, pareto_front, pref_grid,
                     sample_prefs, sparsity, spacing)


def test_linear_scalarisation_and_tchebycheff_on_hand_computed_examples():
    J = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    pref = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    assert torch.allclose(aggregate(J, pref, "ls"), torch.tensor([0.25 - 1.5, 0.5]))
    z = torch.tensor([2.0, 1.0])
    # lambda_i (J_i - z_i): row 0: 0.25*(-1) = -0.25, 0.75*(-3) = -2.25 -> min -2.25; row 1: -0.75, -0.25 -> -0.75
    assert torch.allclose(aggregate(J, pref, "tche", ideal=z), torch.tensor([-2.25, -0.75]))
    smooth = aggregate(J, pref, "tche", ideal=z, mu=0.01)
    assert torch.allclose(smooth, torch.tensor([-2.25, -0.75]), atol=0.01)
    assert (smooth <= torch.tensor([-2.25, -0.75])).all()
    with pytest.raises(ValueError):
        aggregate(J, pref, "max")


def test_aggregation_weights_are_lambda_for_ls_and_the_active_objective_for_tche():
    J, pref, z = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.25, 0.75]]), torch.tensor([2.0, 1.0])
    assert torch.allclose(aggregation_weights(J, pref, "ls"), pref)
    assert torch.allclose(aggregation_weights(J, pref, "tche", z), torch.tensor([[0.0, 0.75]]))
    w = aggregation_weights(J, pref, "tche", z, mu=1.0)  # smooth: both objectives, the active one more
    assert (w > 0).all() and w[0, 1] > w[0, 0]


def test_parse_pref_normalises_and_rejects_bad_input_with_the_objectives_named():
    objs = ["helpful", "harmless"]
    assert torch.allclose(parse_pref("0.2,0.8", objs), torch.tensor([0.2, 0.8]))
    assert torch.allclose(parse_pref("1,3", objs), torch.tensor([0.25, 0.75]))
    for bad in ["0.2", "0.2,0.3,0.5", "-0.1,1.1", "nan,1", "inf,1", "0,0", "a,b", ""]:
        with pytest.raises(ValueError, match="helpful,harmless"):
            parse_pref(bad, objs)


def test_sampled_preferences_lie_on_the_simplex_with_the_configured_share_of_vertices():
    g = torch.Generator().manual_seed(0)
    p = sample_prefs(20000, 3, vertex_prob=0.3, generator=g)
    assert p.dtype == torch.float32 and (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(20000), atol=1e-6)
    vertex = (p.max(-1).values == 1.0).float().mean()
    assert abs(vertex - 0.3) < 0.02
    interior = p[p.max(-1).values < 1.0]
    assert abs(interior[:, 0].mean() - 1 / 3) < 0.01  # Dirichlet(1) is symmetric


def test_preference_grids():
    g2 = pref_grid(2)
    assert len(g2) == 11 and g2[0] == [0.0, 1.0] and g2[-1] == [1.0, 0.0]
    assert len(pref_grid(3, 4)) == 15 and len(pref_grid(3, 2)) == 6
    for p in pref_grid(4, 3):
        assert math.isclose(sum(p), 1.0) and min(p) >= 0


def test_hypervolume_of_known_fronts_in_2d_and_3d():
    ref = [0.0, 0.0]
    assert hypervolume([[1.0, 1.0]], ref) == pytest.approx(1.0)
    # staircase: union of [0,3]x[0,1], [0,2]x[0,2], [0,1]x[0,3] = 3 + 2 + 1
    assert hypervolume([[3, 1], [2, 2], [1, 3]], ref) == pytest.approx(6.0)
    # a dominated point and points outside the reference box add nothing
    assert hypervolume([[3, 1], [2, 2], [1, 3], [1, 1], [5, -1], [-2, 9], [4, 0]], ref) == pytest.approx(6.0)
    assert hypervolume([[3, 1], [2, 2]], [1, 0]) == pytest.approx(2 * 1 + 1 * 1)
    assert hypervolume([], ref) == 0.0
    # 3-D: two boxes [0,2]x[0,1]x[0,1] and [0,1]x[0,2]x[0,2] overlap in [0,1]x[0,1]x[0,1]
    assert hypervolume([[2, 1, 1], [1, 2, 2]], [0, 0, 0]) == pytest.approx(2 + 4 - 1)
    # 3-D against a Monte Carlo estimate on a random front
    rng = np.random.default_rng(0)
    P = rng.uniform(0.2, 1.0, (8, 3))
    X = rng.uniform(0, 1, (200000, 3))
    mc = np.mean(np.any(np.all(X[:, None, :] <= P[None], -1), -1))
    assert hypervolume(P, [0, 0, 0]) == pytest.approx(mc, abs=0.005)


def test_pareto_front_against_brute_force_in_2_3_and_4_dimensions():
    assert pareto_front([[3, 1], [2, 2], [1, 3], [1, 1], [2, 2], [2, 1]]).tolist() == [[3, 1], [2, 2], [1, 3]]
    rng = np.random.default_rng(1)
    for m in (2, 3, 4):
        P = rng.integers(0, 6, (300, m)).astype(float)  # many ties and duplicates
        brute = {tuple(p) for p in P if not np.any(np.all(P >= p, 1) & np.any(P > p, 1))}
        assert {tuple(p) for p in pareto_front(P)} == brute


def test_hypervolume_sweeps_equal_the_recursive_slicing():
    from panacea import _hv
    rng = np.random.default_rng(2)
    for m in (2, 3):
        for _ in range(20):
            P = np.round(rng.uniform(0, 1, (int(rng.integers(1, 40)), m)), 1)  # ties on every axis
            assert hypervolume(P, [0.05] * m) == pytest.approx(_hv(P[np.all(P > 0.05, 1)] - 0.05))


def test_inner_product_sparsity_and_spacing():
    assert inner_product([[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.5], [0.0, 1.0]]) == pytest.approx((0.5 + 2.0) / 2)
    # sorted columns [1,2,4] and [0,1,3]: gaps 1,2 and 1,2 -> (1+4+1+4) / (m (N-1)) = 10 / 4
    assert sparsity([[1, 3], [2, 1], [4, 0]]) == pytest.approx(2.5)
    # evenly spaced points have zero spacing; uneven ones do not
    assert spacing([[0, 3], [1, 2], [2, 1], [3, 0]]) == pytest.approx(0.0)
    # L1 nearest-neighbour distances of [0,0],[1,0],[3,0]: 1, 1, 2 -> std (ddof 1) = 0.57735
    assert spacing([[0, 0], [1, 0], [3, 0]]) == pytest.approx(math.sqrt(1 / 3))
