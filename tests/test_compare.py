import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def front(prefs, judge, rm, ref=(0.0, 0.0), cost=None):
    return {"objectives": ["helpful", "harmless"], "prefs": prefs, "judge_scores": judge, "rm_scores": rm,
            "sft_judge_scores": [0.5, 0.5], "ls_judge_scores": [[1, 4], [4, 1]],
            "attainable_front": [[1, 4], [3, 3], [4, 1]], "reference_point": list(ref),
            "metrics": {"attainable_hypervolume": 10.0},
            "cost": cost or {"models": 1, "update_steps": 8, "seconds": 2.5}}


def write(d, fr):
    os.makedirs(d)
    with open(os.path.join(d, "front.json"), "w") as f:
        json.dump(fr, f)


def test_compare_gives_hand_checked_numbers(tmp_path):
    write(tmp_path / "two", front([[0, 1], [1, 0]], [[1, 3], [3, 1]], [[0, 0], [1, 1]]))
    write(tmp_path / "one", front([[0.5, 0.5]], [[2, 2]], [[-1, 3]],
                                  cost={"models": 5, "update_steps": 40, "seconds": 9.0}))
    out = tmp_path / "cmp" / "table"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), str(tmp_path / "two"), str(tmp_path / "one"),
                        "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = {r["run"]: r for r in json.load(open(str(out) + ".json"))["rows"]}
    two, one = rows["two"], rows["one"]
    # boxes [0,1]x[0,3] and [0,3]x[0,1] overlap in [0,1]x[0,1]: 3 + 3 - 1
    assert two["hv"] == pytest.approx(5.0) and two["hv_ratio"] == pytest.approx(0.5)
    assert two["inner_product"] == pytest.approx((3 + 3) / 2)
    assert two["sparsity"] == pytest.approx((2 ** 2 + 2 ** 2) / (2 * 1)) and two["spacing"] == pytest.approx(0.0)
    # reward-model scores against the reference -2: [1, 1] dominates [0, 0] -> 3 x 3
    assert two["rm_hv"] == pytest.approx(9.0)
    assert one["hv"] == pytest.approx(4.0) and one["hv_ratio"] == pytest.approx(0.4)
    assert one["inner_product"] == pytest.approx(2.0)
    assert one["rm_hv"] == pytest.approx(1 * 5) and one["models"] == 5 and one["update_steps"] == 40
    assert two["rm_ceiling"] is None and two["of_ceiling"] is None  # no ceiling recorded (a DPO run, say)
    md = open(str(out) + ".md").read()
    assert "| two | 1 | 5 | 0.5 |" in md and "| one | 1 | 4 | 0.4 |" in md
    assert os.path.getsize(str(out) + ".png") > 10000


def test_runs_under_one_label_give_mean_and_sd_each_against_its_own_reference_point(tmp_path):
    # seed 1: HV 5 against (0, 0); seed 2: the same points against (1, 0) -> boxes 0x3 and 2x1 = 2
    write(tmp_path / "s1" / "ls", front([[0, 1], [1, 0]], [[1, 3], [3, 1]], [[0, 0], [1, 1]]))
    write(tmp_path / "s2" / "ls", front([[0, 1], [1, 0]], [[1, 3], [3, 1]], [[0, 0], [1, 1]], ref=(1.0, 0.0)))
    out = tmp_path / "table"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), f"ls={tmp_path}/s*/ls", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (row,) = json.load(open(str(out) + ".json"))["rows"]
    assert row["n"] == 2 and row["hv"] == pytest.approx(3.5) and row["hv_sd"] == pytest.approx(2 ** 0.5 * 1.5)
    assert "| ls | 2 | 3.5 ± 2.1 |" in open(str(out) + ".md").read()


def test_compare_refuses_fronts_on_other_objectives_and_empty_patterns(tmp_path):
    write(tmp_path / "a", front([[0, 1]], [[1, 3]], [[0, 0]]))
    write(tmp_path / "b", dict(front([[0, 1]], [[1, 3]], [[0, 0]]), objectives=["helpful", "concise"]))
    for args in ([str(tmp_path / "a"), str(tmp_path / "b")], [f"x={tmp_path}/nothing*"]):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), *args, "--out", str(tmp_path / "x")],
                           capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1


def test_fronts_without_judges_compare_by_their_reward_model_scores_and_never_mix_with_judged_ones(tmp_path):
    own = {"objectives": ["helpful", "harmless"], "prefs": [[0, 1], [1, 0]], "rm_scores": [[0, 0], [1, 1]],
           "sft_rm_scores": [0.0, 0.0], "scored_by": "reward models (the data has no judges)", "metrics": {},
           "cost": {"models": 1, "update_steps": 8, "seconds": 2.5}}
    write(tmp_path / "own", own)
    out = tmp_path / "table"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), str(tmp_path / "own"), "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (row,) = json.load(open(str(out) + ".json"))["rows"]
    assert row["hv"] == pytest.approx(9.0) and row["rm_hv"] == pytest.approx(9.0)  # [1, 1] vs -2
    assert row["hv_ratio"] is None
    write(tmp_path / "judged", front([[0, 1]], [[1, 3]], [[0, 0]]))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), str(tmp_path / "own"),
                        str(tmp_path / "judged"), "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 1 and "compare them apart" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_a_run_with_a_reward_model_ceiling_reports_the_share_of_it_reached(tmp_path):
    write(tmp_path / "ppo", dict(front([[0, 1], [1, 0]], [[1, 3], [3, 1]], [[0, 0], [1, 1]]),
                                 rm_ceiling={"mode": [[1, 4], [4, 1]], "ratio": {"mode": 0.625, "expectation": 0.6}}))
    out = tmp_path / "table"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), str(tmp_path / "ppo"), "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (row,) = json.load(open(str(out) + ".json"))["rows"]
    assert row["hv_ratio"] == pytest.approx(0.5) and row["rm_ceiling"] == 0.625
    assert row["of_ceiling"] == pytest.approx(0.8)
