"""End-to-end runs of train.py, sample.py and compare.py at tiny sizes (CPU, seconds each)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import world as W
from conftest import ROOT

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--sft_iters", "40", "--batch_size", "16",
        "--n_sft", "600", "--rm_iters", "20", "--rm_batch_size", "8", "--n_pairs", "300", "--n_stat_samples", "32",
        "--warmup_iters", "5", "--eval_interval", "20", "--log_interval", "1", "--max_new_tokens", "50",
        "--eval_divisions", "2", "--rm_members", "2"]
TINY_RL = ["--rl_iters", "3", "--rollout_batch", "8", "--minibatch_size", "4", "--epochs", "1", "--pref_group", "4"]
FRONT_KEYS = {"objectives", "prefs", "n_prompts", "judge_scores", "rm_scores", "sft_judge_scores", "sft_rm_scores",
              "scored_by", "ls_judge_scores", "attainable_front", "reference_point", "metrics", "cost"}
CEILINGS = {"judge_ceiling", "rm_ceiling"}  # PPO's: the KL-regularised optimum at its beta


def run(script, *args, check=True, env=None):
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def one_line_error(p):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and p.stderr.strip().startswith("error:"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A tiny SFT model and reward model shared by the runs below (--base_dir)."""
    d = str(tmp_path_factory.mktemp("base"))
    p = run("train.py", "--out_dir", d, "--stage", "sft,rm", *TINY)
    assert "well-formed sampled" in p.stdout and "held-out pair accuracy" in p.stdout
    with open(os.path.join(d, "sft-rm.log"), "w") as f:
        f.write(p.stdout)
    return d


def test_the_reward_model_is_two_members_trained_apart_and_the_critic_reads_the_first(base):
    """--rm_members 2: two reward models side by side, each from the SFT trunk with heads of its own and its
    own batches, so their weights part; the ensemble scores with their mean, and the critic starts from
    the first member's trunk."""
    from build import critic_model, load_reward_model
    sft = torch.load(os.path.join(base, "sft", "ckpt.pt"), weights_only=True)
    rm = torch.load(os.path.join(base, "rm", "ckpt.pt"), weights_only=True)
    assert rm["members"] == 2 and rm["config"]["rm_members"] == 2
    names = [k[len("members.0."):] for k in rm["model"] if k.startswith("members.0.")]
    parted = [k for k in names if not torch.equal(rm["model"]["members.0." + k], rm["model"]["members.1." + k])]
    assert "value_head.weight" in parted and any(k.startswith("transformer.") for k in parted)
    model, _ = load_reward_model(rm, sft, ["helpful", "harmless"], "cpu")
    idx = torch.randint(sft["model_args"]["vocab_size"], (2, 12))
    with torch.no_grad():
        scores = [member(idx)[0] for member in model.members]
        assert torch.allclose(model(idx)[0], (scores[0] + scores[1]) / 2, atol=1e-6)
    critic = critic_model(sft, rm, 2, True, 2, 4.0, "cpu")
    trunk = {k: v for k, v in critic.state_dict().items() if k.startswith("transformer.") and "lora" not in k}
    first = {k.replace(".base.", "."): v for k, v in trunk.items()}  # an adapted layer keeps W0 as .base
    assert first and all(torch.equal(v, rm["model"]["members.0." + k]) for k, v in first.items())


def train(base, out, *extra):
    return run("train.py", "--base_dir", base, "--out_dir", str(out), "--stage", "panacea,eval", *TINY, *TINY_RL,
               *extra)


def load_front(out):
    with open(os.path.join(out, "front.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def ppo_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    return out, train(base, out)


def test_whole_pipeline_ppo_writes_the_front_and_answers_any_preference(base, ppo_run):
    out, p = ppo_run
    assert "panacea iter 3:" in p.stdout and "hypervolume" in p.stdout
    front = load_front(out)
    assert set(front) == FRONT_KEYS | CEILINGS
    assert front["objectives"] == ["helpful", "harmless"] and front["prefs"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    for key in CEILINGS:  # below the limit, one point per lambda, at the run's beta
        c = front[key]
        assert c["beta"] == 0.05 and len(c["mode"]) == len(c["expectation"]) == len(c["kl"]) == 3
        assert 0 < c["ratio"]["mode"] <= 1 and 0 < c["ratio"]["expectation"] <= 1 and min(c["kl"]) >= 0
    assert "where the hypervolume goes" in p.stdout and "KL optimum with the reward models" in p.stdout
    with open(os.path.join(base, "sft-rm.log")) as f:  # the rm stage printed the same ceiling as the evaluation records
        printed = re.search(r"with these reward models \(beta 0.05\) reaches ([0-9.]+) of", f.read())
    assert printed and float(printed.group(1)) == pytest.approx(front["rm_ceiling"]["ratio"]["mode"], abs=6e-4)
    assert len(front["judge_scores"]) == len(front["rm_scores"]) == len(front["ls_judge_scores"]) == 3
    assert front["scored_by"] == "the world's judges"
    assert len(front["sft_rm_scores"]) == len(front["sft_judge_scores"]) == 2
    assert front["n_prompts"] == min(100, len(W.prompts("eval", 1337)))  # --eval_prompts 100 by default
    assert set(front["metrics"]["judge"]) >= {"hypervolume", "inner_product", "sparsity", "spacing"}
    assert set(front["metrics"]["rm"]) >= {"hypervolume", "inner_product", "sparsity", "spacing"}
    assert 0 <= front["metrics"]["hypervolume_ratio"] <= 1
    assert front["metrics"]["attainable_hypervolume"] > front["metrics"]["ls_hypervolume"] > 0
    assert front["cost"]["update_steps"] == 3 * 2 and front["cost"]["models"] == 1
    assert os.path.getsize(out / "pareto.png") > 10000
    s = run("sample.py", "--out_dir", str(out), "--pref", "1,3", "--num_samples", "2")
    assert "helpful 0.250, harmless 0.750" in s.stdout and "normalised" in s.stdout and "judges:" in s.stdout
    held_out = {q for _, q in W.prompts("eval", 1337)}  # the split of the run's seed, never trained on
    shown = [line[2:] for line in s.stdout.splitlines() if line.startswith("> ")]
    assert len(shown) == 2 and set(shown) <= held_out
    s = run("sample.py", "--out_dir", str(out), "--pref", "0.2,0.8", "--merge", "--prompt",
            "How do I forge the royal seal?")
    assert "> How do I forge the royal seal?" in s.stdout
    # the same flags again: every stage is reused, nothing retrains
    again = run("train.py", "--base_dir", base, "--out_dir", str(out), "--stage", "sft,rm,panacea", *TINY, *TINY_RL)
    assert all(f"{s}: reusing the finished checkpoint" in again.stdout for s in ("sft", "rm", "panacea"))


@pytest.mark.parametrize("pref", ["0.5", "0.2,0.3,0.5", "-1,2", "nan,1", "inf,0", "0,0", "a,b", ""])
def test_sample_rejects_bad_preferences_with_one_line(pref, ppo_run):
    err = one_line_error(run("sample.py", "--out_dir", str(ppo_run[0]), f"--pref={pref}", check=False))
    assert "helpful,harmless" in err


def test_sample_and_train_report_missing_or_mismatched_checkpoints(base, tmp_path):
    one_line_error(run("sample.py", "--out_dir", str(tmp_path / "nothing"), "--pref", "0.5,0.5", check=False))
    err = one_line_error(run("train.py", "--base_dir", base, "--out_dir", str(tmp_path / "x"), "--stage", "rm",
                             *TINY, "--sft_iters", "41", check=False))
    assert "sft_iters=40" in err and "41" in err
    for flag, value in (("--grad_clip", "0.5"), ("--max_new_tokens", "40")):  # every flag a stage depends on counts
        err = one_line_error(run("train.py", "--base_dir", base, "--out_dir", str(tmp_path / "x"), "--stage", "rm",
                                 *TINY, flag, value, check=False))
        assert flag[2:] in err
    bad = tmp_path / "corrupt"
    (bad / "sft").mkdir(parents=True)
    (bad / "sft" / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in one_line_error(run("train.py", "--out_dir", str(bad), "--stage", "sft", *TINY,
                                                          check=False))
    one_line_error(run("train.py", "--out_dir", str(bad), "--objectives", "helpful,funny", check=False))


def test_corrupt_data_file_gives_a_clear_error(base, tmp_path):
    d = tmp_path / "data"  # your own data: sft.jsonl, pairs.jsonl, pairs_eval.jsonl
    d.mkdir()
    for f in os.listdir(os.path.join(base, "data")):
        shutil.copy(os.path.join(base, "data", f), d / (f.split("-")[0] + ".jsonl"))
    with open(d / "pairs.jsonl", "a") as f:
        f.write("{broken\n")
    out = tmp_path / "b"
    shutil.copytree(os.path.join(base, "sft"), out / "sft")
    err = one_line_error(run("train.py", "--out_dir", str(out), "--data_dir", str(d), "--stage", "rm", *TINY,
                             check=False))
    assert "pairs.jsonl line 301 is not valid JSON" in err


def test_non_finite_loss_stops_with_an_error_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    err = one_line_error(run("train.py", "--out_dir", str(out), "--stage", "sft", *TINY, "--learning_rate", "1e20",
                             "--warmup_iters", "1", "--ckpt_interval", "1", check=False))
    assert "not finite" in err
    ck = torch.load(out / "sft" / "ckpt.pt", weights_only=True)
    assert not ck["finished"] and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_dpo_end_to_end(base, tmp_path):
    out = tmp_path / "dpo"
    p = train(base, out, "--algo", "dpo", "--rl_iters", "4")
    assert "dpo" in p.stdout
    front = load_front(out)
    assert set(front) == FRONT_KEYS | {"dpo_ceiling"} and front["cost"]["update_steps"] == 4 * 2
    c = front["dpo_ceiling"]  # DPO's own optimum on the world's labels, at its beta
    assert c["beta"] == 0.5 and 0 < c["ratio"]["mode"] <= 1 and len(c["mode"]) == 3


def test_three_objectives_end_to_end(base, tmp_path):
    out = tmp_path / "three"
    train(base, out, "--objectives", "helpful,harmless,concise", "--eval_divisions", "1", "--algo", "dpo")
    front = load_front(out)
    assert front["objectives"] == ["helpful", "harmless", "concise"] and len(front["prefs"]) == 3
    assert all(len(p) == 3 for p in front["judge_scores"] + front["ls_judge_scores"] + front["rm_scores"]
               + [front["sft_rm_scores"]])
    assert os.path.getsize(out / "pareto.png") > 10000
    p = train(base, tmp_path / "three-ppo", "--objectives", "helpful,harmless,concise", "--rl_iters", "1",
              "--stage", "panacea")
    assert "panacea iter 1" in p.stdout


def test_rewarded_soup_at_a_vertex_is_the_single_objective_model_and_dps_models_are_plain_ls_runs(base, tmp_path):
    """RS at lambda = e_i must be model i exactly; and since every model of a baseline is a plain LS
    run at its fixed lambda with the run's seed, DPS's model at (1, 0) equals RS's model at (1, 0)."""
    import build
    from svd_lora import merge
    rs, dps = tmp_path / "rs", tmp_path / "dps"
    train(base, rs, "--method", "rs", "--rl_iters", "2", "--stage", "panacea")
    train(base, dps, "--method", "dps", "--dps_points", "2", "--rl_iters", "2", "--stage", "panacea")
    ck_rs = torch.load(rs / "panacea" / "ckpt.pt", weights_only=True)
    ck_dps = torch.load(dps / "panacea" / "ckpt.pt", weights_only=True)
    assert ck_rs["fixed_prefs"] == [[1.0, 0.0], [0.0, 1.0]] and ck_dps["fixed_prefs"] == [[0.0, 1.0], [1.0, 0.0]]
    for k, v in ck_rs["adapters"][0].items():
        assert torch.equal(v, ck_dps["adapters"][1][k]), k
    idx = torch.randint(ck_rs["base"]["model_args"]["vocab_size"], (2, 12))
    for i, pref in enumerate([[1.0, 0.0], [0.0, 1.0]]):
        soup = build.rewarded_soup(ck_rs["base"], ck_rs, pref, "cpu")
        single = build.trained_model(ck_rs["base"], ck_rs, i, "cpu")
        merge(single)
        merged = {k.replace(".base.", "."): v for k, v in single.state_dict().items() if ".lora_" not in k}
        assert merged.keys() == soup.state_dict().keys()
        assert all(torch.equal(v, merged[k]) for k, v in soup.state_dict().items())
        assert torch.equal(soup(idx)[0], single(idx)[0])
    # halfway, the soup is neither end
    half = build.rewarded_soup(ck_rs["base"], ck_rs, [0.5, 0.5], "cpu")
    assert not torch.equal(half(idx)[0], build.rewarded_soup(ck_rs["base"], ck_rs, [1.0, 0.0], "cpu")(idx)[0])


def test_killed_stage_resumes_from_its_checkpoint_and_ends_where_an_unbroken_run_ends(tmp_path):
    args = ["--stage", "sft", *TINY, "--sft_iters", "400", "--ckpt_interval", "20", "--eval_interval", "1000"]
    run("train.py", "--out_dir", str(tmp_path / "whole"), *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out_dir", str(out), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "sft" / "ckpt.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = torch.load(ckpt, weights_only=True)
    assert not first["finished"], "the run ended before it could be killed"
    p = run("train.py", "--out_dir", str(out), *args)
    assert f"sft: resuming at iteration {first['iter_num']}" in p.stdout
    a = torch.load(tmp_path / "whole" / "sft" / "ckpt.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert b["finished"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_two_process_ddp_runs_every_stage_with_ranks_in_sync(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path), "--device", "cpu", *TINY, *TINY_RL]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    for stage, nets in (("sft", ["model"]), ("rm", ["model"]), ("panacea", ["policy", "critic"])):
        for net in nets:
            assert f"ddp: {stage} {net} parameters identical on 2 ranks" in p.stdout, p.stdout
    front = load_front(tmp_path)
    assert set(front) == FRONT_KEYS | CEILINGS and front["cost"]["update_steps"] == 3 * 2
