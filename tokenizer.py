"""
The tokenizer and chat template of a pretrained Llama-style model, read from its GGUF file
(the same file GPT.from_pretrained reads the weights from; SmolLM2-135M-Instruct by default).

Data flow of encode:
    text (str; may contain control tokens written out, e.g. "<|im_start|>")
    -> cut at control tokens: each is one id of its own
    -> pre-tokeniser regex: single digits, words with their leading space, punctuation runs, whitespace
    -> byte-level BPE on each piece: tiktoken merges adjacent byte strings lowest rank first,
       where a token's rank is its id in the GGUF vocabulary
    -> ids (list[int])
decode maps ids back to their bytes and the bytes to UTF-8 text.

The GGUF vocabulary stores each token as text in GPT-2's byte-to-unicode alphabet (every byte is
a printable character, e.g. a space is "Ġ"); byte_decoder() undoes that to get the token's bytes.
The interface mirrors world.Tokenizer (encode, decode, eot, vocab_size), so code written for the
toy world runs on the pretrained model as well.
"""
import tiktoken

from model import open_gguf

SMOLLM2 = "smollm2-135m-instruct"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# llama.cpp's "smollm" pre-tokeniser (GPT-2's, except that digits are split one by one)
PRETOKENIZERS = {"smollm": r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"}
NORMAL, CONTROL = 1, 3  # GGUF token types


def chat(prompt, system=DEFAULT_SYSTEM):
    """The ChatML prompt of one user turn, ending where the assistant's answer starts."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def byte_decoder():
    """GPT-2's byte-to-unicode table, inverted: {character: byte}. Printable bytes stand for
    themselves; the other 68 bytes are mapped in order to the characters 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class GGUFTokenizer:
    """encode(text) -> list[int], decode(ids) -> str, eot (the id that ends an assistant turn:
    generation stops there), vocab_size; chat(prompt) formats a prompt with the model's template."""

    def __init__(self, name_or_path=SMOLLM2):
        fields = open_gguf(name_or_path).fields
        pre = fields["tokenizer.ggml.pre"].contents()
        if fields["tokenizer.ggml.model"].contents() != "gpt2" or pre not in PRETOKENIZERS:
            raise ValueError(f"{name_or_path}: only byte-level BPE with a known pre-tokeniser {list(PRETOKENIZERS)} loads")
        tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
        to_byte = byte_decoder()
        ranks = {bytes(to_byte[c] for c in t): i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == NORMAL}
        specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL}
        # A byte without a token (SmolLM2: 21, e.g. the control character 0x04) gets a placeholder id past the
        # vocabulary, which encode drops, as transformers drops such bytes (transformers then merges the bytes
        # on either side where it can: "!\x04!" is one token there, two here).
        ranks.update({bytes([b]): len(tokens) + b for b in range(256) if bytes([b]) not in ranks})
        self.enc = tiktoken.Encoding(pre, pat_str=PRETOKENIZERS[pre], mergeable_ranks=ranks, special_tokens=specials)
        self.eot = fields["tokenizer.ggml.eos_token_id"].contents()  # <|im_end|> (2) for SmolLM2
        self.vocab_size = len(tokens)

    def encode(self, text):
        """Control tokens written in the text (as the chat template writes them) become their ids."""
        return [i for i in self.enc.encode(text, allowed_special="all") if i < self.vocab_size]

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def chat(self, prompt, system=DEFAULT_SYSTEM):
        return chat(prompt, system)
