import pytest
import torch
import torch.nn.functional as F

import model as model_module
from conftest import tiny_gpt
from model import GPT, GPTConfig, KVCache, decode_step, token_logprobs
from svd_lora import inject_svd_lora, lora_layers, set_preference


def tiny(arch, seed=0, lora=False):
    """A tiny random model of either block type (llama: grouped-query attention, 2 key/value heads for 4)."""
    torch.manual_seed(seed)
    llama = dict(n_kv_head=2, n_hidden=96, bias=False, rope_theta=100.0) if arch == "llama" else {}
    model = GPT(GPTConfig(arch=arch, block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64, **llama)).eval()
    if lora:  # trained-looking adapters, so that each row's preference changes its tokens
        model = inject_svd_lora(model, rank=2, pref_dim=2, alpha=4.0)
        for l in lora_layers(model):
            torch.nn.init.normal_(l.lora_sigma, std=2.0), torch.nn.init.constant_(l.lora_s, 3.0)
    return model


def left_padded(lengths=(3, 7, 5, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in lengths]
    P = max(lengths)
    idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    real = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return prompts, idx, real


def generate_seeded(model, idx, n, seed=7, **kw):
    torch.manual_seed(seed)
    return model.generate(idx, n, **kw)


SAMPLINGS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=5)]


def test_forward_gives_logits_at_every_position_and_masked_loss():
    model = tiny_gpt()
    idx = torch.randint(50, (3, 10))
    targets = idx.roll(-1, 1).clone()
    targets[:, :4] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 50)
    manual = F.cross_entropy(logits[:, 4:].reshape(-1, 50), targets[:, 4:].reshape(-1))
    assert torch.allclose(loss, manual, atol=1e-6)


def test_from_pos_gives_the_full_forward_from_that_position_on():
    model = tiny_gpt().eval()
    idx = torch.randint(50, (3, 10))
    targets = idx.roll(-1, 1).clone()
    targets[:, :2] = -1
    full, full_loss = model(idx, targets)
    for from_pos in (0, 1, 4, 9):
        logits, loss = model(idx, targets, from_pos=from_pos)
        assert logits.shape == (3, 10 - from_pos, 50)
        assert torch.allclose(logits, full[:, from_pos:], atol=1e-5)
        # the loss covers the targets from from_pos on only
        manual = F.cross_entropy(full[:, max(from_pos, 2):].reshape(-1, 50), targets[:, max(from_pos, 2):].reshape(-1))
        assert torch.allclose(loss, manual, atol=1e-5)
    assert torch.allclose(model(idx, targets, from_pos=0)[1], full_loss)
    values = tiny_gpt(n_heads_out=2)
    assert torch.allclose(values(idx, from_pos=6)[0], values(idx)[0][:, 6:], atol=1e-5)


def test_token_logprobs_are_the_log_softmax_of_the_next_token():
    model = tiny_gpt()
    idx = torch.randint(50, (2, 7))
    logits, _ = model(idx)
    lp = token_logprobs(logits, idx)
    assert lp.shape == (2, 6)
    b, t = 1, 3
    assert torch.allclose(lp[b, t], torch.log_softmax(logits[b, t], -1)[idx[b, t + 1]], atol=1e-6)


def test_value_heads_output_one_value_per_objective_and_position():
    model = tiny_gpt(n_heads_out=3)
    values, loss = model(torch.randint(50, (2, 5)))
    assert values.shape == (2, 5, 3) and loss is None
    assert not hasattr(model, "lm_head")


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_cached_logits_match_the_full_forward(arch):
    """A prefill of 5 positions, then one position at a time attending over the whole buffer, the unwritten
    columns masked (what the compiled decode step computes)."""
    model = tiny(arch)
    idx = torch.randint(50, (2, 12))
    full, _ = model(idx)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]  # (1, 1, 12, 12)
    pos = torch.arange(12).expand(2, 12)
    cache = KVCache(model.config.n_layer, 12)
    cache.at = torch.arange(5)
    steps = [model(idx[:, :5], cache=cache, pos=pos[:, :5], mask=causal[:, :, :5, :5])[0]]
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    for t in range(5, 12):
        cache.at = torch.tensor([t])
        steps.append(model(idx[:, t: t + 1], cache=cache, pos=pos[:, t: t + 1], mask=causal[:, :, t: t + 1])[0])
    assert cache.k[0].shape == (2, model.config.n_kv_head or 4, 12, 16)  # llama: 2 key/value heads, not 4
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers  # written in place, never reallocated
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled", "top_k"])
def test_static_cache_generates_the_tokens_of_recomputation_left_padded(arch, sampling):
    model = tiny(arch)
    _, idx, real = left_padded()
    a = generate_seeded(model, idx, 20, attention_mask=real, **sampling)
    b = generate_seeded(model, idx, 20, attention_mask=real, use_cache=False, **sampling)
    assert a.shape == (4, 27) and torch.equal(a, b)
    unpadded = generate_seeded(model, idx, 20, **sampling)  # no attention mask: padding read as tokens
    assert torch.equal(unpadded, generate_seeded(model, idx, 20, use_cache=False, **sampling))


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("lora", [False, True], ids=["base", "svd_lora"])
def test_left_padded_rows_generate_what_each_row_generates_alone(arch, lora):
    model = tiny(arch, lora=lora)
    prefs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    if lora:
        set_preference(model, prefs)
    prompts, idx, real = left_padded()
    out = model.generate(idx, 15, temperature=0.0, attention_mask=real)
    for b, p in enumerate(prompts):
        if lora:
            set_preference(model, prefs[b:b + 1])
        assert out[b, 7:].tolist() == model.generate(torch.tensor([p]), 15, temperature=0.0)[0, len(p):].tolist()


def test_sampling_with_per_sequence_preferences_equals_recomputation():
    model = tiny("gpt", lora=True)
    set_preference(model, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]]))
    _, idx, real = left_padded()
    a = generate_seeded(model, idx, 20, temperature=1.0, attention_mask=real)
    assert torch.equal(a, generate_seeded(model, idx, 20, temperature=1.0, attention_mask=real, use_cache=False))


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_stopping_rows_at_different_steps_equals_recomputation(arch):
    model = tiny(arch)
    with torch.no_grad():
        model.lm_head.weight[3] *= 12.0  # the stop token is likely: rows finish at different steps
    _, idx, real = left_padded()
    a = generate_seeded(model, idx, 25, temperature=1.0, stop_token=3, attention_mask=real)
    b = generate_seeded(model, idx, 25, temperature=1.0, stop_token=3, attention_mask=real, use_cache=False)
    assert 7 < a.size(1) < 32 and (a[:, -1] == 3).all() and torch.equal(a, b)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_decoding_over_the_whole_buffer_equals_over_the_written_columns(arch, monkeypatch):
    """Compiled decoding on CUDA attends over the whole (masked) buffer; here on the CPU, uncompiled."""
    monkeypatch.setattr(model_module, "STATIC_DECODE_DEVICES", ("cpu",))
    monkeypatch.setattr(model_module, "compiled_decode_step", lambda device_type: decode_step)
    model = tiny(arch)
    _, idx, real = left_padded()
    for sampling in SAMPLINGS:
        a = generate_seeded(model, idx, 20, attention_mask=real, compile=True, **sampling)
        assert torch.equal(a, generate_seeded(model, idx, 20, attention_mask=real, **sampling))


def graphs_of_compiled_decoding(model, monkeypatch, static):
    """Graphs traced (by dynamo alone, no graph break allowed) over two calls with changing preferences, then two
    with wider prompts; static: the fixed shapes of CUDA decoding, else the CPU's dynamic key width."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False if static else None)
    monkeypatch.setattr(model_module, "STATIC_DECODE_DEVICES", ("cpu",) if static else ())
    monkeypatch.setattr(model_module, "compiled_decode_step", lambda device_type: step)
    _, idx, real = left_padded()
    for prefs, wider in ((torch.eye(2)[[0, 1, 0, 1]], 0), (torch.eye(2)[[1, 1, 0, 0]], 0), (torch.full((4, 2), 0.5), 2),
                         (torch.full((4, 2), 0.5), 2)):
        set_preference(model, prefs)
        idx, real = F.pad(idx, (wider, 0)), F.pad(real, (wider, 0))  # more left padding
        a = generate_seeded(model, idx, 12, temperature=1.0, attention_mask=real, compile=True)
        assert torch.equal(a, generate_seeded(model, idx, 12, temperature=1.0, attention_mask=real))
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_compiled_decoding_is_traced_once_per_shape(arch, monkeypatch):
    model = tiny(arch, lora=True)
    assert graphs_of_compiled_decoding(model, monkeypatch, static=True) == 3  # one per buffer size, for every step
    assert graphs_of_compiled_decoding(model, monkeypatch, static=False) == 3  # fixed, dynamic width, dynamic size


def test_compiled_decoding_on_a_cpu_is_the_eager_step():
    """Inductor's CPU kernels of the decode step crashed the process (SIGSEGV) in about one test run in
    three: on a CPU, compile=True decodes with the eager step (tests/test_cuda.py compiles on CUDA)."""
    assert model_module.compiled_decode_step("cpu") is decode_step


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_bfloat16_generation_caches_bfloat16_keys_and_values(arch, monkeypatch):
    dtypes = []
    write = KVCache.write
    monkeypatch.setattr(KVCache, "write", lambda self, *a: dtypes.append(a[1].dtype) or write(self, *a))
    _, idx, real = left_padded()
    model = tiny(arch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = model.generate(idx, 10, temperature=0.0, attention_mask=real)
        assert torch.equal(a, model.generate(idx, 10, temperature=0.0, attention_mask=real, use_cache=False))
    model = model.to(torch.bfloat16)
    a = model.generate(idx, 10, temperature=0.0, attention_mask=real)
    assert torch.equal(a, model.generate(idx, 10, temperature=0.0, attention_mask=real, use_cache=False))
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_sampling_is_reproducible_under_a_seed_and_top_k_restricts_tokens():
    model = tiny_gpt().eval()
    idx = torch.randint(50, (2, 3))
    torch.manual_seed(5)
    a = model.generate(idx, 10, temperature=1.0, top_k=1)
    b = model.generate(idx, 10, temperature=0.0)
    assert torch.equal(a, b)  # top_k = 1 is greedy
    torch.manual_seed(7)
    c = model.generate(idx, 10)
    torch.manual_seed(7)
    assert torch.equal(c, model.generate(idx, 10))


def test_stop_token_pads_finished_rows_and_ends_early():
    model = tiny_gpt().eval()
    idx = torch.randint(1, 50, (3, 4))
    out = model.generate(idx, 25, temperature=1.5, stop_token=0)
    for row in out[:, 4:]:
        hits = (row == 0).nonzero()
        if len(hits):
            assert (row[hits[0, 0]:] == 0).all()
    with torch.no_grad():  # make the stop token win everywhere: generation ends after one step
        model.transformer.ln_f.bias[0] = 10.0
        model.lm_head.weight[0, 0] = 10.0
    assert model.generate(idx, 25, temperature=0.0, stop_token=0).shape == (3, 5)


def test_configure_optimizers_takes_only_trainable_parameters():
    model = inject_svd_lora(tiny_gpt(), rank=2, pref_dim=2, alpha=4.0)
    opt = model.configure_optimizers(0.1, 1e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable and len(trainable) > 0
    assert all(p.dim() < 2 for p in opt.param_groups[1]["params"])
