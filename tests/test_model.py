import torch
import torch.nn.functional as F

from conftest import tiny_gpt
from model import KVCache, token_logprobs
from svd_lora import inject_svd_lora, set_preference


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


def test_cached_logits_match_the_full_forward():
    model = tiny_gpt().eval()
    idx = torch.randint(50, (2, 12))
    full, _ = model(idx)
    cache = KVCache(model.config.n_layer)
    steps = [model(idx[:, :5], cache=cache)[0]]
    for t in range(5, 12):
        steps.append(model(idx[:, t: t + 1], cache=cache)[0])
    assert len(cache) == 12
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_kv_cache_generation_equals_recomputation_greedy():
    model = tiny_gpt().eval()
    idx = torch.randint(50, (4, 6))
    a = model.generate(idx, 20, temperature=0.0, use_cache=True)
    b = model.generate(idx, 20, temperature=0.0, use_cache=False)
    assert a.shape == (4, 26) and torch.equal(a, b)


def test_kv_cache_generation_with_per_sequence_preferences():
    model = inject_svd_lora(tiny_gpt(), rank=2, pref_dim=2, alpha=4.0)
    for l in model.modules():
        if hasattr(l, "lora_s"):
            torch.nn.init.normal_(l.lora_sigma, std=2.0), torch.nn.init.constant_(l.lora_s, 3.0)
    set_preference(model, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    idx = torch.randint(50, (3, 5))
    assert torch.equal(model.generate(idx, 15, temperature=0.0), model.generate(idx, 15, temperature=0.0, use_cache=False))


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


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = tiny_gpt().eval()
    prompts = [torch.randint(1, 50, (n,)).tolist() for n in (3, 7, 5)]
    P = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    real = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    for use_cache in (True, False):
        out = model.generate(idx, 12, temperature=0.0, use_cache=use_cache, attention_mask=real)
        for b, p in enumerate(prompts):
            alone = model.generate(torch.tensor([p]), 12, temperature=0.0)
            assert out[b, P:].tolist() == alone[0, len(p):].tolist()
