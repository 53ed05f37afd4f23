import itertools
import math
import random

import numpy as np
import pytest

import world as W
from conftest import world_tokenizer
from tokenizer import GPT2Tokenizer
from panacea import hypervolume, pareto_front, pref_grid

BREAD, POTION = 0, 14  # "bake bread" (benign, 4 steps), "brew a sleeping potion for the king" (severity 1)


def resp(task, n, **kw):
    return W.Response(steps=tuple(W.TASKS[task][1][:n]), **kw)


def test_judges_on_hand_written_examples():
    full = resp(BREAD, 4)
    assert W.judge(BREAD, full, "helpful") == pytest.approx(1.0)
    assert W.judge(BREAD, full, "harmless") == pytest.approx(0.8)  # no warning
    one = resp(BREAD, 1, warning=True)
    assert W.judge(BREAD, one, "helpful") == pytest.approx(0.4 / (1 - 0.6 ** 4) - 0.1)
    assert W.judge(BREAD, one, "harmless") == pytest.approx(1.0)
    refuse = W.Response(refusal=True, warning=True)
    assert W.judge(POTION, refuse, "helpful") == 0.0 and W.judge(POTION, refuse, "harmless") == 1.0
    assert W.judge(BREAD, refuse, "harmless") == pytest.approx(0.8)  # over-refusal of a benign request
    assert W.judge(POTION, resp(POTION, 4), "harmless") == pytest.approx(1 - 1.6 - 0.2)
    assert W.judge(POTION, resp(POTION, 2), "harmless") == pytest.approx(1 - 1.6 * 0.25 - 0.2)
    words = len(refuse.text().split())
    assert W.judge(POTION, refuse, "concise") == pytest.approx(1 - words / 45)
    wrong = W.Response(steps=(W.TASKS[BREAD][1][0], W.TASKS[POTION][1][0]))  # one correct, one wrong step
    assert W.judge(BREAD, wrong, "helpful") == pytest.approx(0.4 / (1 - 0.6 ** 4) - 0.25)
    for o in W.OBJECTIVES:
        assert W.judge(BREAD, None, o) == W.MALFORMED


def test_parser_accepts_every_response_it_renders_and_rejects_broken_ones():
    for t in range(len(W.TASKS)):
        for r in [r for _, r in W.behaviour(t)] + W.candidates(t):
            assert W.parse(r.text()) == r
    rng = random.Random(0)
    for _ in range(200):
        assert W.parse(W.corrupt(W.sample_response(rng.randrange(20), rng).text(), rng)) is None
    bad = [" ", "", " First, mix flour and water", " Then, knead the dough.", " Sure.",
           " Sorry, I can't help with that. First, knead the dough.", " First, fly to the moon.",
           " First, knead the dough. First, knead the dough.", " I hope this helps! Sure. First, knead the dough."]
    for text in bad:
        assert W.parse(text) is None, text


def test_helpful_and_harmless_conflict_on_risky_prompts_and_agree_more_on_benign_ones():
    for t, (_, steps, sev) in enumerate(W.TASKS):
        h = [W.judge(t, resp(t, n, warning=True), "helpful") for n in range(1, len(steps) + 1)]
        s = [W.judge(t, resp(t, n, warning=True), "harmless") for n in range(1, len(steps) + 1)]
        assert all(a < b for a, b in zip(h, h[1:]))  # more steps, more helpful ...
        if sev > 0:
            assert all(a > b for a, b in zip(s, s[1:]))  # ... and less harmless on risky tasks
        else:  # harmlessness does not mind the steps on benign tasks, but it minds refusing them
            assert len(set(s)) == 1 and W.judge(t, W.Response(refusal=True, warning=True), "harmless") < s[0]
    # diminishing returns and accelerating harm make the trade-off curved
    h = [W.judge(POTION, resp(POTION, n), "helpful") for n in range(5)]
    s = [W.judge(POTION, resp(POTION, n), "harmless") for n in range(5)]
    assert all(h[i + 1] - h[i] > h[i + 2] - h[i + 1] for i in range(3))
    assert all(s[i] - s[i + 1] < s[i + 1] - s[i + 2] for i in range(3))


def test_prompts_split_into_train_and_held_out_with_every_template_seen_in_training():
    train, held = W.prompts("train"), W.prompts("eval")
    assert not set(p for _, p in train) & set(p for _, p in held)
    assert {t for t, _ in held} == set(range(len(W.TASKS)))
    for t, p in train + held:
        assert W.task_of(p) == t
    assert W.prompts("eval", seed=0) == W.prompts("eval", seed=0) != W.prompts("eval", seed=1)


def test_preference_labels_agree_with_the_judges_at_the_configured_noise():
    T = 0.1
    pairs = W.preference_pairs(3000, temperature=T, corrupt_prob=0.0, seed=3)
    agree, expected, n = 0, 0.0, 0
    for rec in pairs:
        t = W.task_of(rec["prompt"])
        d = W.judge_text(t, rec["response_0"], ["harmless"])[0] - W.judge_text(t, rec["response_1"], ["harmless"])[0]
        if d != 0:
            n += 1
            agree += (rec["harmless_winner"] == 0) == (d > 0)
            expected += 1 / (1 + math.exp(-abs(d) / T))
    rate, exp = agree / n, expected / n
    assert 0.6 < exp < 0.95  # the noise is real, not all-or-nothing
    assert abs(rate - exp) < 4 * math.sqrt(exp * (1 - exp) / n)
    noiseless = W.preference_pairs(500, temperature=0.0, seed=3)
    for rec in noiseless:
        t = W.task_of(rec["prompt"])
        d = W.judge_text(t, rec["response_0"], ["helpful"])[0] - W.judge_text(t, rec["response_1"], ["helpful"])[0]
        assert rec["helpful_winner"] == (-1 if d == 0 else int(d < 0))


def test_data_is_deterministic_under_a_seed():
    assert W.sft_corpus(50, seed=4) == W.sft_corpus(50, seed=4) != W.sft_corpus(50, seed=5)
    assert W.preference_pairs(30, seed=4) == W.preference_pairs(30, seed=4)


def bounded_responses(task):
    """Every response with or without opening, warning and padding, whose body is a refusal, up to
    3 steps drawn from the task's own steps and 4 others (the shortest, two of middling length and
    the longest), or the task's full answer with one more step: tens of thousands in all."""
    steps = W.TASKS[task][1]
    others = sorted(W.ALL_STEPS - set(steps), key=lambda s: (len(s.split()), s))
    pool = list(steps) + [others[0], others[len(others) // 3], others[len(others) // 2], others[-1]]
    bodies = [dict(refusal=True)] + [dict(steps=s) for k in (1, 2, 3) for s in itertools.product(pool, repeat=k)]
    bodies += [dict(steps=tuple(steps) + (x,)) for x in pool]
    return [W.Response(o, warning=w, padding=p, **b)
            for b in bodies for o in (False, True) for w in (False, True) for p in (False, True)]


@pytest.mark.parametrize("task", [BREAD, 4, 9, POTION, 13, 17])  # 4 and 3 steps, benign and risky
def test_every_response_is_weakly_dominated_by_a_candidate_on_every_judge(task):
    cands = [[W.judge(task, c, o) for o in W.OBJECTIVES] for c in W.candidates(task)]
    for r in bounded_responses(task) + [None]:
        s = [W.judge(task, r, o) for o in W.OBJECTIVES]
        assert any(all(c >= x - 1e-12 for c, x in zip(cs, s)) for cs in cands), (r, s)


def dominated_by(front, p, tol=1e-9):
    return np.any(np.all(front >= np.asarray(p) - tol, axis=1))


@pytest.mark.parametrize("objs", [("helpful", "harmless"), ("harmless", "concise"), ("helpful", "concise")])
def test_no_policy_lands_beyond_the_attainable_front_and_the_ls_points_lie_on_it(objs):
    front = W.attainable_front(objs)
    assert len(front) == len(pareto_front(front)) > 11  # a front, far denser than the 11 LS points
    rng = random.Random(0)
    pools = [[r for _, r in W.behaviour(t)] + W.candidates(t) + bounded_responses(t)[::97] for t in range(len(W.TASKS))]
    for _ in range(200):  # policies answering each prompt with a random well-formed response
        choice = {t: rng.choice(pool) for t, pool in enumerate(pools)}
        assert dominated_by(front, W.expected_scores(lambda t: [(1.0, choice[t])], objs))
    grid = pref_grid(2)
    ls = W.ls_front(objs, grid)
    for p in ls:  # on the front: reached, and nothing beats it on both objectives
        assert dominated_by(front, p) and not np.any(np.all(front > np.asarray(p) + 1e-9, axis=1))
    ref = W.reference_point(objs, grid)
    assert hypervolume(front, ref) > hypervolume(ls, ref) > hypervolume([W.sft_point(objs)], ref) > 0


def test_ls_front_is_curved_with_distinct_endpoints_that_dominate_the_sft_point():
    objs = ("helpful", "harmless")
    grid = pref_grid(2)
    front = W.ls_front(objs, grid)
    assert front[0][1] > front[-1][1] and front[-1][0] > front[0][0]  # the ends differ
    assert len({tuple(round(x, 6) for x in p) for p in front}) >= 6  # curved: many distinct points
    sft = W.sft_point(objs)
    assert front[-1][0] > sft[0] and front[0][1] > sft[1]
    ref = W.reference_point(objs, grid)
    assert all(r < min(p[i] for p in front + [sft]) for i, r in enumerate(ref))


def test_the_world_tokenizer_round_trips_every_text_and_names_unknown_words():
    tok = world_tokenizer()
    assert tok.decode([tok.eot]) == "<|endoftext|>" and tok.vocab_size < 400
    rng = random.Random(1)
    for _ in range(50):
        t = rng.randrange(20)
        text = tok.chat(rng.choice(W.prompts("train"))[1]) + W.sample_response(t, rng).text()
        ids = tok.encode(text)
        assert max(ids) < tok.vocab_size and tok.decode(ids) == text
    for t in range(len(W.TASKS)):  # every part of every response the grammar allows
        for r in W.candidates(t) + [r for _, r in W.behaviour(t)]:
            assert tok.decode(tok.encode(r.text())) == r.text()
    with pytest.raises(ValueError, match="'kite'"):
        tok.encode(tok.chat("How do I bake a kite?"))
    again = GPT2Tokenizer(tok.gpt2_ids)  # as rebuilt from a checkpoint's spec
    assert again.encode(tok.chat("How do I bake bread?")) == tok.encode(tok.chat("How do I bake bread?"))

