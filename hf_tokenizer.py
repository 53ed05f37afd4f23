"""
A Hugging Face model directory's tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja),
without transformers: tokenizer.load builds it for the spec {"hf": directory}.

Data flow:
    tokenizer.json -> hf_ranks: the byte-level BPE vocabulary as tiktoken ranks (checked: ranks = ids)
                   -> hf_pattern: the pre-tokeniser as one tiktoken regex
                   -> hf_normalizer: Unicode normal form, or none
                   -> tokenizer.bpe_encoding: a tiktoken Encoding, added tokens as its specials
    chat template  -> chat_template: compiled as transformers compiles it (sandboxed jinja2)
What tiktoken cannot reproduce exactly (SentencePiece, byte fallback, another normaliser, an unknown
pre-tokeniser) is a ValueError naming the directory.
"""
import datetime
import functools
import json
import os
import re
import unicodedata

from tokenizer import PRETOKENIZERS, bpe_encoding, byte_decoder

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's own regex
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def hf_pattern(pre, where):
    """The tiktoken regex of a tokenizer.json pre_tokenizer: ByteLevel alone (GPT-2's regex), Split(regex) then
    ByteLevel without its regex, or single Digits then ByteLevel (SmolLM2: the "smollm" regex)."""
    steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    kinds, last = [s.get("type") for s in steps], steps[-1] if steps else {}
    regex = last.get("use_regex", True)
    if kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space"):
        if kinds == ["ByteLevel"] and regex:
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return PRETOKENIZERS["smollm"]
        split = steps[0] if kinds == ["Split", "ByteLevel"] and not regex else {}
        if split.get("behavior") == "Isolated" and not split.get("invert") and "Regex" in split.get("pattern", {}):
            return split["pattern"]["Regex"]
    raise ValueError(f"{where}: the pre-tokenizer {json.dumps(pre)[:160]} has no tiktoken equivalent here")


def hf_ranks(tj, where):
    """{token bytes: id} of tokenizer.json's byte-level BPE model (added tokens left out), checked to be one
    tiktoken reproduces: every merge makes a token with a higher id than the merge before it (ranks = ids)."""
    model, added = tj.get("model") or {}, {t["content"] for t in tj.get("added_tokens", [])}
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: a {model.get('type')} tokenizer (SentencePiece, Unigram, WordPiece) has no "
                         f"tiktoken equivalent; only byte-level BPE loads")
    for flag in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(flag):
            raise ValueError(f"{where}: the BPE option {flag}={model[flag]!r} has no tiktoken equivalent")
    vocab, to_byte = model["vocab"], byte_decoder()
    if not all(c in to_byte for t in vocab if t not in added for c in t):
        raise ValueError(f"{where}: vocabulary entries outside GPT-2's byte alphabet: not a byte-level BPE")
    ranks = {bytes(to_byte[c] for c in t): i for t, i in vocab.items() if t not in added}
    last, made = -1, set()
    for m in model.get("merges", []):
        a, b = m.split(" ") if isinstance(m, str) else m
        if vocab.get(a + b, -1) <= last:
            raise ValueError(f"{where}: the merge {a!r} + {b!r} is out of id order; tiktoken ranks merges by id")
        last = vocab[a + b]
        made.add(a + b)
    if not model.get("ignore_merges") and any(len(t) > 1 and t not in made for t in vocab if t not in added):
        raise ValueError(f"{where}: tokens no merge makes, which tiktoken would still produce (ignore_merges false)")
    if model.get("unk_token") and len({r for r in ranks if len(r) == 1}) < 256:
        raise ValueError(f"{where}: bytes without a token become unk_token; tiktoken drops them")
    return ranks


def hf_normalizer(norm, where):
    """The text normalisation of tokenizer.json's normalizer (None: the text is used as it is)."""
    if not norm or (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        return None
    if norm.get("type") in ("NFC", "NFD", "NFKC", "NFKD"):
        return functools.partial(unicodedata.normalize, norm["type"])
    raise ValueError(f"{where}: the normalizer {norm.get('type')} changes the text; only Unicode normal forms load")


def chat_template(text, where):
    """A chat template compiled as transformers compiles it (sandboxed jinja2, trimmed blocks, its helpers)."""
    try:
        from jinja2 import nodes
        from jinja2.exceptions import TemplateError
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("a Hugging Face chat template needs the jinja2 package: pip install jinja2") from None

    class Generation(Extension):  # {% generation %}...{% endgeneration %} marks an answer for transformers: render it
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    try:
        return env.from_string(text)
    except TemplateError as e:
        raise ValueError(f"{where}: the chat template does not compile ({e})") from None


def read_json(path, default=None):
    if default is not None and not os.path.exists(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} ({type(e).__name__})") from None


class HFTokenizer:
    """The tokenizer of a Hugging Face model directory (tokenizer.json; tokenizer_config.json and
    chat_template.jinja for the chat template and the special tokens it names), with GGUFTokenizer's
    interface: encode, decode, eot, vocab_size, chat. Byte-level BPE only, through tiktoken."""

    def __init__(self, path):
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            raise ValueError(f"{path}: no tokenizer.json (a SentencePiece tokenizer.model alone does not load)")
        self.path, tj = str(path), read_json(os.path.join(path, "tokenizer.json"))
        self.added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}  # control tokens, matched whole
        if any(t.get(k) for t in tj.get("added_tokens", []) for k in ("lstrip", "rstrip", "single_word")):
            raise ValueError(f"{path}: added tokens that strip whitespace (lstrip, rstrip, single_word) do not load")
        ranks, self.normalize = hf_ranks(tj, path), hf_normalizer(tj.get("normalizer"), path)
        self.vocab_size = 1 + max([*ranks.values(), *self.added.values()])
        self.enc = bpe_encoding(os.path.basename(os.path.normpath(path)), hf_pattern(tj.get("pre_tokenizer"), path),
                                ranks, self.added, self.vocab_size)
        # longest first: where one added token starts another, the longer one is matched (as transformers does)
        longest_first = sorted(self.added, key=len, reverse=True)
        self.split = re.compile("|".join(map(re.escape, longest_first))) if self.added else None
        config = {**read_json(os.path.join(path, "special_tokens_map.json"), {}),
                  **read_json(os.path.join(path, "tokenizer_config.json"), {})}
        # {"bos_token": "<s>", ...}: the names the chat template sees (older files hold {"content": "<s>", ...})
        self.special = {k: v["content"] if isinstance(v, dict) else v
                        for k, v in config.items() if k in SPECIAL_NAMES and v}
        template = os.path.join(path, "chat_template.jinja")
        template = open(template, encoding="utf-8").read() if os.path.exists(template) else config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.template = chat_template(template, path) if template else None
        self.eot = self.end_of_turn()

    def end_of_turn(self):
        """The token the chat template writes after an assistant's answer (where generation must stop), else
        the eos token of tokenizer_config.json, generation_config.json or config.json."""
        if self.template is not None and self.split is not None:
            reply = "Qx7reply"
            try:
                turn = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}], False)
                m = self.split.search(turn, turn.index(reply) + len(reply))
                if m:
                    return self.added[m.group()]
            except ValueError:  # a template that refuses this conversation, or leaves the answer out
                pass
        if self.special.get("eos_token") in self.added:
            return self.added[self.special["eos_token"]]
        for name in ("generation_config.json", "config.json"):
            eos = read_json(os.path.join(self.path, name), {}).get("eos_token_id")
            if eos is not None:
                return eos[0] if isinstance(eos, list) else eos
        raise ValueError(f"{self.path}: no end-of-turn token (no chat template, eos_token or eos_token_id)")

    def encode(self, text):
        """Added tokens written in the text (as the chat template writes them) become their ids."""
        ids, start = [], 0
        for m in self.split.finditer(text) if self.split else ():
            ids += self.encode_ordinary(text[start: m.start()]) + [self.added[m.group()]]
            start = m.end()
        return ids + self.encode_ordinary(text[start:])

    def encode_ordinary(self, text):
        text = self.normalize(text) if self.normalize else text
        return [i for i in self.enc.encode_ordinary(text) if i < self.vocab_size]

    def decode(self, ids):
        """Text of ids; an id past the tokenizer's (a model's embedding may have spare rows) decodes to nothing,
        as in transformers."""
        return self.enc.decode([int(i) for i in ids if int(i) < self.vocab_size])

    def render(self, messages, add_generation_prompt=True):
        if self.template is None:
            raise ValueError(f"{self.path} has no chat template (chat_template in tokenizer_config.json, "
                             f"or chat_template.jinja)")
        from jinja2.exceptions import TemplateError
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                        documents=None, **self.special)
        except (TemplateError, TypeError) as e:  # (raise_exception in the template, or a bad message)
            raise ValueError(f"{self.path}: the chat template refused the conversation ({e})") from None

    def chat(self, prompt, system=None):
        """One user turn (after a system turn, if given) in the directory's chat template, ending where the
        assistant's answer starts."""
        return self.render(([{"role": "system", "content": system}] if system is not None else []) +
                           [{"role": "user", "content": prompt}])
