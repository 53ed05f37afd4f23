import numpy as np
import pytest

import world as W
from panacea import hypervolume, pref_grid

OBJS, SEED = ("helpful", "harmless"), 1337  # the project defaults
GRID = pref_grid(2, 10)


@pytest.fixture(scope="module")
def limit():
    """(reference point, attainable front, its hypervolume) at the defaults."""
    ref = W.reference_point(OBJS, GRID, seed=SEED)
    front = W.attainable_front(OBJS, seed=SEED)
    return ref, front, hypervolume(front, ref)


def standardised_judges(objectives):
    """reward(prompts, texts) -> (N, m): the judges, standardised as kl_optimum's default is."""
    mean, std = W.judge_stats(objectives, "train", SEED)

    def reward(prompts, texts):
        return (np.array([W.judge_text(W.task_of(p), y, objectives) for p, y in zip(prompts, texts)]) - mean) / std

    return reward


def test_judge_stats_are_the_sft_behaviours_moments_on_the_training_prompts():
    mean, std = W.judge_stats(OBJS, "train", SEED)
    ps = W.prompts("train", SEED)
    second = [sum(p * W.judge(t, r, o) ** 2 for t, _ in ps for p, r in W.behaviour(t)) / len(ps) for o in OBJS]
    assert mean == pytest.approx(W.sft_point(OBJS, "train", SEED), abs=1e-12)
    assert std == pytest.approx(np.sqrt(np.array(second) - mean ** 2), abs=1e-9)


@pytest.mark.parametrize("beta", [1e-4, 0.01, 0.05, 0.2, 1.0, 1e4])
def test_no_ceiling_exceeds_the_attainable_front(limit, beta):
    ref, front, attainable_hv = limit
    c = W.kl_optimum(OBJS, GRID, beta, seed=SEED)
    for k in ("mode", "expectation"):
        assert np.all(np.isfinite(c[k])) and c[k].shape == (len(GRID), 2)
        assert hypervolume(c[k], ref) <= attainable_hv + 1e-12, k
    # the mode answers each prompt with one response, so the attainable front weakly dominates it;
    # the expectation mixes responses per prompt and may land in the gaps of the front's staircase
    assert all(np.any(np.all(front >= p - 1e-9, axis=1)) for p in c["mode"])
    assert np.all(c["kl"] >= -1e-12)


def brute_force_ls(objectives, pref):
    """Per held-out prompt the behaviour responses maximising sum_i lambda_i (J_i - mean_i) / std_i;
    mean judge scores over the prompts of (the likelier maximiser, then the first; the maximisers
    weighted by their behaviour probabilities, which is where pi* goes as beta vanishes)."""
    mean, std = W.judge_stats(objectives, "train", SEED)
    modes, mixtures = [], []
    for t, _ in W.prompts("eval", SEED):
        b = W.behaviour(t)
        scores = [[W.judge(t, r, o) for o in objectives] for _, r in b]
        ls = [round(sum(l * (s - mu) / sd for l, s, mu, sd in zip(pref, row, mean, std)), 9) for row in scores]
        best = [j for j in range(len(b)) if ls[j] == max(ls)]
        modes.append(scores[max(best, key=lambda j: (b[j][0], -j))])
        mixtures.append(np.average([scores[j] for j in best], axis=0, weights=[b[j][0] for j in best]))
    return np.mean(modes, axis=0), np.mean(mixtures, axis=0)


@pytest.mark.parametrize("beta", [1e-4, 1e-6])
def test_as_beta_vanishes_the_mode_becomes_the_ls_optimum_over_the_behaviours_support(beta):
    c = W.kl_optimum(OBJS, GRID, beta, seed=SEED)
    mode, mixture = zip(*[brute_force_ls(OBJS, p) for p in GRID])
    np.testing.assert_allclose(c["mode"], mode, atol=1e-12)
    # exact ties (at lambda = (1, 0) a warning on a risky task, at (0, 1) the steps on a benign one) keep pi_ref's odds
    np.testing.assert_allclose(c["expectation"], mixture, atol=1e-6)
    assert not np.allclose(c["expectation"], c["mode"])


def test_as_beta_grows_the_expectation_becomes_the_sft_point():
    sft = W.sft_point(OBJS, seed=SEED)
    far, farther = (np.abs(W.kl_optimum(OBJS, GRID, b, seed=SEED)["expectation"] - sft).max() for b in (1e2, 1e4))
    assert farther < 1e-3 and farther < far / 10  # the distance shrinks like 1 / beta
    assert W.kl_optimum(OBJS, GRID, 1e4, seed=SEED)["kl"].max() < 1e-6


def test_a_reward_callable_of_the_standardised_judges_gives_the_judge_ceiling_exactly():
    calls = []

    def reward(prompts, texts):
        calls.append(len(texts))
        return standardised_judges(OBJS)(prompts, texts)

    for beta in (0.01, 0.05, 0.2):
        default = W.kl_optimum(OBJS, GRID, beta, seed=SEED)
        given = W.kl_optimum(OBJS, GRID, beta, reward=reward, seed=SEED)
        for k in default:
            np.testing.assert_allclose(given[k], default[k], rtol=0, atol=1e-12)
    n_rows = sum(len(W.behaviour(t)) for t, _ in W.prompts("eval", SEED))
    assert calls == [n_rows] * 3  # one call per ceiling, on every (prompt, behaviour response) pair


def test_a_reward_that_ignores_an_objective_costs_hypervolume(limit):
    """The reward path is used for more than the judges: a reward that scores harmlessness as
    helpfulness cannot find the harmless end of the front."""
    ref, _, _ = limit
    judges = standardised_judges(OBJS)
    only_helpful = lambda prompts, texts: judges(prompts, texts)[:, [0, 0]]  # noqa: E731
    good = W.kl_optimum(OBJS, GRID, 0.05, seed=SEED)["mode"]
    bad = W.kl_optimum(OBJS, GRID, 0.05, reward=only_helpful, seed=SEED)["mode"]
    assert hypervolume(bad, ref) < 0.9 * hypervolume(good, ref)
    assert np.allclose(bad, bad[0])  # every lambda now weighs the same score


def test_ceiling_ratios_at_the_defaults(limit):
    """The hypervolume ratios against the attainable front: the ceilings lie below the LS points at
    beta 0.05 (0.919, as an independent computation of the same optimum measured) and fall as beta
    grows (the KL term keeps pi* near pi_ref)."""
    ref, _, attainable_hv = limit
    ls = hypervolume(W.ls_front(OBJS, GRID, seed=SEED), ref) / attainable_hv
    ratios = {}
    for beta in (0.01, 0.05, 0.2):
        c = W.kl_optimum(OBJS, GRID, beta, seed=SEED)
        ratios[beta] = {k: hypervolume(c[k], ref) / attainable_hv for k in ("mode", "expectation")}
    assert ratios[0.05]["mode"] < ls and ratios[0.05]["mode"] == pytest.approx(0.919, abs=1e-3)
    assert ratios[0.2]["mode"] < ratios[0.05]["mode"] and ratios[0.2]["expectation"] < ratios[0.05]["expectation"]


def test_the_evaluation_records_the_ceilings_and_a_reward_model_of_judges_meets_the_judge_ceiling(tmp_path, limit):
    """Through the data source and evaluate.record, as train.py evaluates a run: with the standardised
    judges standing in for the reward models, the reward-model ceiling is the judge ceiling, and every
    recorded ratio is a share of the attainable front."""
    import torch
    from data import World
    from evaluate import record
    ref, front, attainable_hv = limit
    source = World(str(tmp_path), SEED, n_sft=10, n_pairs=10, label_temperature=0.1)
    limits = source.limits(list(OBJS), GRID, GRID, 0.05, standardised_judges(OBJS))
    assert limits["reference_point"] == pytest.approx(ref)
    assert limits["attainable_hypervolume"] == pytest.approx(attainable_hv)
    sums = {"judge": torch.zeros(12, 2, dtype=torch.float64), "judge_sq": torch.zeros(12, 2, dtype=torch.float64),
            "rm": torch.zeros(12, 2, dtype=torch.float64), "n": torch.ones(12, dtype=torch.float64)}
    pol = {"objectives": list(OBJS), "fixed_prefs": [None], "update_steps": 0, "seconds": 0.0}
    fr = record(sums, GRID, pol, limits, 40)
    judge, rm = fr["judge_ceiling"], fr["rm_ceiling"]
    assert np.allclose(judge["mode"], rm["mode"], atol=1e-12) and np.allclose(judge["expectation"], rm["expectation"])
    assert judge["ratio"]["mode"] == pytest.approx(hypervolume(judge["mode"], ref) / attainable_hv)
    assert 0.85 < judge["ratio"]["mode"] <= 1 and judge["beta"] == 0.05
    assert source.limits(list(OBJS), GRID, GRID).keys().isdisjoint({"judge_ceiling", "rm_ceiling"})  # no beta: none
