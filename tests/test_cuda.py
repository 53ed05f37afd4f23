"""The CUDA code paths: skipped where no GPU is present."""
import os

import pytest
import torch

from conftest import ROOT, tiny_gpt
from svd_lora import inject_svd_lora, lora_layers, merge, set_preference, unmerge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def trained_adapted():
    model = inject_svd_lora(tiny_gpt(), rank=2, pref_dim=2, alpha=4.0).cuda().eval()
    for l in lora_layers(model):
        torch.nn.init.normal_(l.lora_sigma), torch.nn.init.constant_(l.lora_s, 2.0)
    return model


def test_cuda_generation_with_cache_equals_recomputation_and_matches_the_cpu():
    model = trained_adapted()
    prefs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    set_preference(model, prefs)
    idx = torch.randint(1, 50, (3, 6), device="cuda")
    real = torch.ones_like(idx)
    real[0, :2] = 0  # one left-padded row
    a = model.generate(idx, 16, temperature=0.0, attention_mask=real)
    b = model.generate(idx, 16, temperature=0.0, use_cache=False, attention_mask=real)
    assert torch.equal(a, b)
    with torch.no_grad():
        gpu = model(idx)[0].cpu()
        cpu = model.cpu()(idx.cpu())[0]
    assert torch.allclose(gpu, cpu, atol=1e-4)


def test_cuda_compiled_generation_replays_a_cuda_graph_with_the_eager_tokens():
    model = trained_adapted()
    set_preference(model, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    idx = torch.randint(1, 50, (3, 6), device="cuda")
    real = torch.ones_like(idx)
    real[0, :2] = 0  # one left-padded row
    for _ in range(3):  # warm-up, recording, replays
        a = model.generate(idx, 16, temperature=0.0, attention_mask=real, compile=True)
        assert torch.equal(a, model.generate(idx, 16, temperature=0.0, attention_mask=real))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        b = model.generate(idx, 16, temperature=0.0, attention_mask=real, compile=True)
    assert b.shape == a.shape and (b[:, :6] == idx).all()


def test_cuda_merge_unmerge_and_bf16_autocast_training_step():
    model = trained_adapted()
    set_preference(model, [0.3, 0.7])
    idx = torch.randint(50, (4, 12), device="cuda")
    with torch.no_grad():
        out = model(idx)[0]
        merge(model)
        assert torch.allclose(model(idx)[0], out, atol=1e-4)
        unmerge(model)
    model.train()
    opt = model.configure_optimizers(0.0, 1e-3, device_type="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


def test_train_runs_on_cuda(tmp_path):
    import subprocess
    import sys
    args = ["--out_dir", str(tmp_path), "--device", "cuda", "--n_layer", "2", "--n_head", "2", "--n_embd", "64",
            "--sft_iters", "30", "--n_sft", "500", "--rm_iters", "10", "--n_pairs", "300", "--n_stat_samples", "32",
            "--rl_iters", "2", "--rollout_batch", "8", "--minibatch_size", "4", "--eval_divisions", "2",
            "--warmup_iters", "5"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert os.path.exists(tmp_path / "front.json")
