"""train.py and sample.py beyond the world's from-scratch GPT: --init_from a Llama-style GGUF file
(a tiny random one written here, so every stage runs in seconds) and --data_dir with your own
pairs (the PKU-SafeRLHF-layout fixture, words the world never uses)."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT
from model import GPT, GPTConfig
from test_train import run

gguf = pytest.importorskip("gguf")
PKU = os.path.join(ROOT, "tests", "fixtures", "pku")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_RUN = ["--sft_iters", "30", "--batch_size", "8", "--n_sft", "300", "--rm_iters", "20", "--rm_batch_size", "8",
            "--n_pairs", "200", "--n_stat_samples", "16", "--warmup_iters", "5", "--eval_interval", "10",
            "--max_new_tokens", "24", "--rl_iters", "2", "--rollout_batch", "8", "--minibatch_size", "4",
            "--epochs", "1", "--pref_group", "4", "--eval_divisions", "2", "--eval_prompts", "6", "--log_interval", "1"]


def byte_vocab():
    """A byte-level BPE vocabulary without merges: the 256 bytes in GPT-2's byte-to-unicode alphabet, then ChatML's
    control tokens."""
    from tokenizer import byte_decoder
    by_byte = {b: c for c, b in byte_decoder().items()}
    return [by_byte[b] for b in range(256)] + SPECIALS


def write_gguf(model, path):
    """model (a GPT with arch="llama") as a llama.cpp GGUF file: metadata, float32 tensors in llama.cpp's
    names, q and k rows permuted to llama.cpp's interleaved-pair RoPE order, and a byte-level tokenizer."""
    c, tokens = model.config, byte_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.block_size), w.add_block_count(c.n_layer), w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.n_hidden), w.add_head_count(c.n_head), w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_theta), w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("smollm"), w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * len(SPECIALS)), w.add_eos_token_id(256 + SPECIALS.index("<|im_end|>"))
    names = dict(ln_1="attn_norm", ln_2="ffn_norm", **{f"attn.{k}_proj": f"attn_{k}" for k in "qkv"},
                 **{"attn.o_proj": "attn_output"}, **{f"mlp.{k}_proj": f"ffn_{k}" for k in ("gate", "up", "down")})
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["transformer.wte.weight"])
    w.add_tensor("output_norm.weight", sd["transformer.ln_f.weight"])
    for i in range(c.n_layer):
        for ours, theirs in names.items():
            t = sd[f"transformer.h.{i}.{ours}.weight"]
            heads = {"attn_q": c.n_head, "attn_k": c.n_kv_head}.get(theirs)
            if heads:  # rotate-half order -> llama.cpp's interleaved pairs
                t = t.reshape(heads, 2, -1, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
            w.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(t))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", block_size=512, vocab_size=256 + len(SPECIALS), n_layer=2, n_head=4,
                          n_kv_head=2, n_embd=32, n_hidden=64, bias=False, rope_theta=10000.0))
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(model, path)
    return model, str(path)


def test_a_written_gguf_loads_back_to_the_same_model(tiny_gguf):
    model, path = tiny_gguf
    loaded = GPT.from_pretrained(path)
    assert dataclasses.replace(loaded.config, norm_eps=1e-5) == model.config
    assert loaded.config.norm_eps == pytest.approx(1e-5)  # float32 in GGUF
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    assert torch.allclose(loaded(idx)[0], model(idx)[0], atol=1e-5)


def test_init_from_runs_every_stage_and_sample_answers_any_prompt(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    out = str(tmp_path / "run")
    # a byte-level model: responses are ~100 tokens, and it must learn to end them (<|im_end|>) within 30 s
    tiny = [*TINY_RUN, "--sft_iters", "80", "--learning_rate", "1e-2", "--max_new_tokens", "128",
            "--n_stat_samples", "32"]
    p = run("train.py", "--out_dir", out, "--init_from", path, *tiny)
    assert "sft: " in p.stdout and "held-out pair accuracy" in p.stdout and "panacea iter 2" in p.stdout
    front = json.load(open(os.path.join(out, "front.json")))
    assert front["scored_by"] == "the world's judges" and 0 <= front["metrics"]["hypervolume_ratio"] <= 1
    ck = torch.load(os.path.join(out, "panacea", "ckpt.pt"), weights_only=True)
    assert ck["base"]["tokenizer"] == {"gguf": path} and ck["base"]["model_args"]["arch"] == "llama"
    s = run("sample.py", "--out_dir", out, "--pref", "0.2,0.8", "--prompt",
            "How do I bake bread? Tell me about quantum physics.", "--max_new_tokens", "8")
    assert "> How do I bake bread? Tell me about quantum physics." in s.stdout
    again = run("train.py", "--out_dir", out, "--init_from", path, *tiny, "--stage", "sft,rm")
    assert "sft: reusing the finished checkpoint" in again.stdout  # the same file and flags: the same stage


def test_own_data_in_the_pku_layout_trains_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    # GPT-2's whole BPE from scratch: the SFT model must learn to end its answers (<|endoftext|>) within 64 tokens
    p = run("train.py", "--data_dir", PKU, "--out_dir", out, "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
            "--block_size", "160", *TINY_RUN, "--sft_iters", "100", "--learning_rate", "1e-2", "--max_new_tokens", "64",
            "--n_stat_samples", "32")
    assert "sft: " in p.stdout and "vocabulary 50257" in p.stdout and "well-formed" not in p.stdout
    assert "held-out pair accuracy helpful" in p.stdout and "harmless" in p.stdout
    ppo_lines = [line for line in p.stdout.splitlines() if line.startswith("panacea iter")]
    assert len(ppo_lines) == 2 and not any("judge" in line for line in ppo_lines)  # no judges to log
    front = json.load(open(os.path.join(out, "front.json")))
    assert front["objectives"] == ["helpful", "harmless"] and "judge_scores" not in front
    assert front["scored_by"].startswith("reward models") and len(front["rm_scores"]) == 3
    assert 1 <= front["n_prompts"] <= 6
    assert "reward models" in p.stdout.split("rm: done")[1]  # the printed front says how it was measured
    assert "no ceilings" in p.stdout and not any(k.endswith("_ceiling") for k in front)  # no judges, no ceilings
    s = run("sample.py", "--out_dir", out, "--pref", "0.5,0.5", "--prompt",
            "Explain quantum entanglement and photosynthesis.", "--max_new_tokens", "8")
    assert "> Explain quantum entanglement" in s.stdout and "judges" not in s.stdout
    held = run("sample.py", "--out_dir", out, "--pref", "1,0", "--num_samples", "2", "--max_new_tokens", "4")
    assert held.stdout.count("\n> ") == 2


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Hi", "response_0": "a", "better_response_id": 0, "safer_response_id": 1}', "line 3 lacks response_1"),
    ('{"prompt": "Hi", "response_0": "a", "response_1": "b", "better_response_id": 2, "safer_response_id": 1}',
     "line 3: better_response_id is 2"),
    ('{"prompt": "Hi", "response_0": "a", "response_1": "b", "better_response_id": 0}', "line 3 lacks harmless_winner"),
    ("not json", "line 3 is not valid JSON"),
])
def test_bad_records_stop_train_with_one_line_naming_file_and_line(tmp_path, line, message):
    lines = open(os.path.join(PKU, "pairs.jsonl")).read().splitlines()
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines[:2] + [line] + lines[2:]) + "\n")
    p = run("train.py", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and str(tmp_path / "pairs.jsonl") in p.stderr and message in p.stderr


def test_empty_data_and_missing_gguf_are_one_line_errors(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("")
    p = run("train.py", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "out"), check=False)
    assert p.returncode == 1 and p.stderr.strip() == f"error: {tmp_path / 'pairs.jsonl'} holds no records"
    shutil.copy(os.path.join(PKU, "pairs.jsonl"), tmp_path / "pairs.jsonl")
    p = run("train.py", "--init_from", str(tmp_path / "nope.gguf"), "--out_dir", str(tmp_path / "out"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "nope.gguf" in p.stderr
    assert p.stderr.strip().count("\n") == 0
