import pytest
import torch

from conftest import tiny_gpt
from svd_lora import (SVDLoRALinear, disable_adapters, inject_svd_lora, lora_layers, merge, orthogonal_penalty,
                      set_preference, unmerge)


def adapted(seed=0, trained=True, rank=2, m=2):
    model = inject_svd_lora(tiny_gpt(seed=seed), rank=rank, pref_dim=m, alpha=4.0)
    if trained:  # move sigma and s away from their zero init, as training would
        g = torch.Generator().manual_seed(seed + 1)
        for l in lora_layers(model):
            with torch.no_grad():
                l.lora_sigma.copy_(torch.randn(l.lora_sigma.shape, generator=g))
                l.lora_s.fill_(2.0)
    return model.eval()


def test_injection_wraps_every_attention_and_mlp_linear_and_freezes_the_rest():
    model = adapted(trained=False)
    names = [n for n, mod in model.named_modules() if isinstance(mod, SVDLoRALinear)]
    assert len(names) == 2 * 4  # 2 layers x (qkv, attention out-proj, MLP up, MLP down)
    assert all(n.split(".")[-1] in ("c_attn", "c_proj", "c_fc") for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(".lora_" not in n for n, b in model.named_buffers())  # lambda is a buffer, not a parameter
    assert not any("pref" in k for k in model.state_dict())  # ... and not saved with the weights


def test_equals_the_base_model_at_init():
    base = tiny_gpt().eval()
    model = adapted(trained=False)
    set_preference(model, [0.3, 0.7])
    idx = torch.randint(50, (2, 9))
    assert torch.equal(model(idx)[0], base(idx)[0])


def test_preference_gets_no_gradient_while_sigma_and_s_do_at_init():
    model = adapted(trained=False)
    set_preference(model, [0.3, 0.7])
    logits, _ = model(torch.randint(50, (2, 9)))
    logits.square().mean().backward()
    for l in lora_layers(model):
        assert not l.pref.requires_grad and l.pref.grad is None
        assert l.lora_sigma.grad.abs().sum() > 0 and l.lora_s.grad.abs() > 0
        # with sigma = s = 0 the singular vectors get no gradient yet (AdaLoRA's E = 0 init)
        assert l.lora_U.grad.abs().sum() == 0


def test_different_preferences_give_different_outputs_once_s_is_nonzero():
    model = adapted()
    idx = torch.randint(50, (2, 9))
    set_preference(model, [1.0, 0.0])
    a = model(idx)[0]
    set_preference(model, [0.0, 1.0])
    assert (a - model(idx)[0]).abs().max() > 1e-3


def test_a_batch_with_per_sequence_preferences_equals_each_sequence_alone():
    model = adapted()
    idx = torch.randint(50, (3, 9))
    prefs = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]])
    set_preference(model, prefs)
    batched = model(idx)[0]
    for b in range(3):
        set_preference(model, prefs[b])
        assert torch.allclose(batched[b], model(idx[b: b + 1])[0][0], atol=1e-5)


def test_merged_equals_unmerged_and_unmerge_restores_the_weights():
    model = adapted()
    set_preference(model, [0.2, 0.8])
    idx = torch.randint(50, (2, 9))
    before = {n: p.clone() for n, p in model.named_parameters()}
    out = model(idx)[0]
    merge(model)
    assert all(l.merged for l in lora_layers(model))
    assert torch.allclose(model(idx)[0], out, atol=1e-5)
    with pytest.raises(ValueError):
        set_preference(model, [0.5, 0.5])  # a merged model keeps its preference
    unmerge(model)
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6), n
    assert torch.allclose(model(idx)[0], out, atol=1e-6)


def test_disable_adapters_computes_the_base_model():
    base = tiny_gpt().eval()
    model = adapted()
    set_preference(model, [0.2, 0.8])
    idx = torch.randint(50, (2, 9))
    assert (model(idx)[0] - base(idx)[0]).abs().max() > 1e-3
    with disable_adapters(model):
        assert torch.equal(model(idx)[0], base(idx)[0])
    assert (model(idx)[0] - base(idx)[0]).abs().max() > 1e-3  # adapters back on afterwards


@pytest.mark.parametrize("pref, why", [([0.5, 0.6], "sum"), ([1.2, -0.2], "negative"), ([float("nan"), 1.0], "NaN"),
                                       ([0.2, 0.3, 0.5], "shape"), ([[0.5, 0.5, 0.0]], "shape"),
                                       ([float("inf"), 0.0], "NaN")])
def test_bad_preferences_raise_value_error(pref, why):
    with pytest.raises(ValueError, match=why):
        set_preference(adapted(), pref)


def test_orthogonal_penalty_is_zero_for_orthonormal_factors_and_positive_otherwise():
    model = adapted()
    assert orthogonal_penalty(model) > 0
    for l in lora_layers(model):
        with torch.no_grad():
            l.lora_U.copy_(torch.linalg.qr(l.lora_U)[0]), l.lora_V.copy_(torch.linalg.qr(l.lora_V)[0])
    assert orthogonal_penalty(model) < 1e-4
