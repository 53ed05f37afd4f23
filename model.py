"""
A small GPT in the style of nanoGPT, serving three roles in Panacea:
  - the policy (language model head tied to the token embedding),
  - the reward model and the critic (n_heads_out > 0: one scalar per objective at every position).

Data flow:
    idx (B, T) token ids
    -> token embedding (+ learned position embedding, arch "gpt")  (B, T, n_embd)
    -> n_layer pre-norm blocks: x + attn(norm(x)), x + mlp(norm(x))
    -> final norm
    -> logits (B, T, vocab_size)        if n_heads_out == 0   (or from position from_pos on)
       values (B, T, n_heads_out)       otherwise             (read at the last token or every token)

Two block types, chosen by GPTConfig.arch:
    "gpt"   (GPT-2): LayerNorm, learned positions, GELU MLP, one c_attn for q, k, v, biases.
    "llama" (Llama, SmolLM2, Qwen2, Mistral): RMSNorm, rotary positions (RoPE) on q and k, SwiGLU MLP,
            grouped-query attention (n_kv_head < n_head key/value heads), no biases (Qwen2: on q, k, v).
GPT.from_pretrained loads a Llama-style GGUF file (SmolLM2-135M-Instruct) or a Hugging Face directory (hf.py).

generate() decodes with a static KV cache (per layer one key and one value buffer, written in place), so each
new token costs one position's forward pass instead of the whole context's. Prompts of different lengths are
left-padded and batched: a mask hides the padding and each row's positions count from its first real token,
so every row computes what it would alone.
"""
import functools
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 96
    vocab_size: int = 320
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    n_heads_out: int = 0  # 0: language model; > 0: that many scalar outputs per position
    arch: str = "gpt"  # "gpt" or "llama" (see the module docstring)
    n_kv_head: int = 0  # llama: key/value heads, each shared by n_head // n_kv_head query heads; 0: n_head
    n_hidden: int = 0  # MLP hidden width; 0: 4 * n_embd
    rope_theta: float = 10000.0  # llama: RoPE base
    norm_eps: float = 1e-5  # llama: RMSNorm epsilon
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    qkv_bias: bool = False  # llama: biases on q, k and v (Qwen2)


class KVCache:
    """Keys and values of one generation: per layer a key and a value buffer (B, n_kv_head, size, hs), allocated
    at the first write in the keys' dtype (bfloat16 under autocast), then written in place at the columns at (T,)."""

    def __init__(self, n_layer, size, static=False):
        self.size, self.static, self.at, self.k, self.v = size, static, None, [None] * n_layer, [None] * n_layer

    def write(self, layer, k, v):
        """Store k, v (B, n_kv_head, T, hs) at the columns self.at; return the whole buffers."""
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = (t.new_zeros(t.size(0), t.size(1), self.size, t.size(3)) for t in (k, v))
            if self.static:  # compiled decoding: CUDA graphs keep these addresses and write them in place
                for t in (self.k[layer], self.v[layer]):
                    torch._dynamo.mark_static_address(t, guard=False)
        self.k[layer].index_copy_(2, self.at, k)
        self.v[layer].index_copy_(2, self.at, v)
        return self.k[layer], self.v[layer]


def rope_cos_sin(pos, config):
    """RoPE tables for positions pos (T,) or (B, T): cos, sin of (T, hs) or (B, 1, T, hs), the angles
    pos * theta^(-2i/hs) for i < hs/2 repeated twice (rotate-half layout: pairs are (i, i + hs/2))."""
    hs = config.n_embd // config.n_head
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hs, 2, device=pos.device).float() / hs)  # (hs/2,)
    ang = pos.float()[..., None] * inv_freq  # (..., T, hs/2)
    ang = torch.cat((ang, ang), dim=-1)  # (..., T, hs)
    ang = ang[:, None] if ang.dim() == 3 else ang  # (B, 1, T, hs): broadcast over heads
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+hs/2}) of x (B, nh, T, hs) by its position's angle (bfloat16 stays bfloat16)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head or config.n_head
        self.head_size = C // config.n_head
        assert C % self.n_head == 0 and self.n_head % self.n_kv_head == 0
        self.llama = config.arch == "llama"
        if self.llama:
            kv = self.n_kv_head * self.head_size  # k and v are narrower than q: grouped-query attention
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(C, n, bias=config.qkv_bias) for n in (C, kv, kv))
            self.o_proj = nn.Linear(C, C, bias=False)
        else:
            self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)  # q, k, v at once
            self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout, self.dropout = nn.Dropout(config.dropout), config.dropout

    def forward(self, x, cache=None, layer=0, mask=None, rope=None):
        B, T, C = x.size()
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if self.llama else self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in (q, k, v))  # (B, nh or n_kv_head, T, hs)
        if rope is not None:  # rotate before caching: cached keys keep their own positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # the keys: the buffer's first mask.size(-1) columns (the mask hides padding)
            k, v = cache.write(layer, k, v)  # (B, n_kv_head, cache.size, hs)
            k, v = k[:, :, :mask.size(-1)], v[:, :, :mask.size(-1)]  # a view: no copy
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=mask is None, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.o_proj(y) if self.llama else self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, H = config.n_embd, config.n_hidden or 4 * config.n_embd
        self.llama = config.arch == "llama"
        if self.llama:
            shapes = ((C, H), (C, H), (H, C))
            self.gate_proj, self.up_proj, self.down_proj = (nn.Linear(a, b, bias=False) for a, b in shapes)
        else:
            self.c_fc = nn.Linear(C, H, bias=config.bias)
            self.c_proj = nn.Linear(H, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.llama:  # SwiGLU: down(silu(gate(x)) * up(x))
            return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


def norm(config):
    if config.arch == "llama":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, mask=None, rope=None):
        x = x + self.attn(self.ln_1(x), cache, layer, mask, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.arch in ("gpt", "llama"), f"unknown arch {config.arch!r}"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({} if config.arch == "llama" else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        if config.n_heads_out:
            self.value_head = nn.Linear(config.n_embd, config.n_heads_out)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        wpe = self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
        return sum(p.numel() for p in self.parameters()) - wpe

    def forward(self, idx, targets=None, cache=None, pos=None, mask=None, from_pos=0):
        """Logits (or values) at every position from from_pos on; with targets (-1 = ignored), also the
        mean cross-entropy. pos (B, T) and a boolean attention mask (B, 1, T, T_keys) serve left-padded
        batches; with a cache (KVCache) both are given and the keys are the cache's columns (see generate)."""
        B, T = idx.size()
        if pos is None:  # (with pos given, the caller keeps positions below block_size)
            assert T <= self.config.block_size, f"sequence of {T} exceeds block_size {self.config.block_size}"
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x, rope = self.transformer.wte(idx), None  # (B, T, n_embd)
        if self.config.arch == "llama":  # positions rotate q, k; the float32 tables are cast to the weights' dtype
            rope = tuple(t.to(x.dtype) for t in rope_cos_sin(pos, self.config))
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, mask, rope)
        x = self.transformer.ln_f(x[:, from_pos:])
        if self.config.n_heads_out:
            return self.value_head(x), None  # (B, T, n_heads_out)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets[:, from_pos:].reshape(-1), ignore_index=-1)
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_path="smollm2-135m-instruct", dtype=None, **overrides):
        """A Llama-style model from a GGUF file (hf.gguf_pretrained; its tokenizer: tokenizer.GGUFTokenizer) or from a
        Hugging Face model directory (hf.read_pretrained; hf_tokenizer.HFTokenizer), with weights in dtype (a torch
        dtype; None: float32). overrides set GPTConfig fields, e.g. n_heads_out=2 for a critic on the pretrained
        body (fresh value head)."""
        from hf import gguf_pretrained, read_pretrained
        config, sd = (read_pretrained if os.path.isdir(str(name_or_path)) else gguf_pretrained)(name_or_path, overrides)
        dtype = dtype or torch.float32
        if config.n_heads_out or config.tie_embeddings:  # no LM head, or the embedding serves as one
            sd.pop("lm_head.weight", None)
        with torch.device("meta"):  # skip the random init of weights the file overwrites
            model = cls(config)
        _, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
        if config.n_heads_out:
            model._init_weights(model.value_head.to_empty(device="cpu"))
            model.value_head.to(dtype)
        elif config.tie_embeddings:  # assign=True replaced the shared parameter: tie again
            model.lm_head.weight = model.transformer.wte.weight
        assert not unexpected and not any(p.is_meta for p in model.parameters()), f"weights missing from {name_or_path}"
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu"):
        """AdamW over the trainable parameters only (frozen base weights are left out): matrices
        decay, biases and LayerNorm gains do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, stop_token=None,
                 attention_mask=None, compile=False, logprobs=False):
        """Continue every row of idx (B, T) by up to max_new_tokens tokens; temperature 0 is greedy. With a stop_token,
        decoding ends once every row has produced it, and a row's tokens after its first stop_token are stop_token
        too. attention_mask (B, T), 0 on left padding, batches prompts of different lengths; rows stop at block_size
        real tokens (padding not counted). use_cache=False recomputes the whole context at every step (same tokens,
        slower); compile=True runs the decode step through torch.compile (on CUDA as a CUDA graph). logprobs=True
        also returns (B, new tokens) log p(token) of every new token at temperature 1 (PPO's old log-probs)."""
        B, P = idx.size()
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(idx, dtype=torch.bool)
        steps = max(0, min(max_new_tokens, self.config.block_size - int(real.sum(1).max())))  # the longest row's room
        L, dev = P + steps, idx.device  # L columns: the prompts, then the new tokens
        out, real = F.pad(idx, (0, steps)), F.pad(real, (0, steps), value=True)  # (B, L): new tokens are real
        pos = (real.long().cumsum(1) - 1).clamp(min=0)  # (B, L): counted from each row's first real token
        # query i sees the real keys j <= i, and itself so that padded queries stay finite: (B, 1, L, L)
        eye = torch.eye(L, dtype=torch.bool, device=dev)
        visible = (torch.ones_like(eye).tril() & (real[:, None, :] | eye))[:, None]
        cols, done = torch.arange(L, device=dev), torch.zeros(B, dtype=torch.bool, device=dev)
        whole = compile and dev.type in STATIC_DECODE_DEVICES  # decode against the whole buffer (fixed shapes)
        cache = KVCache(self.config.n_layer, L, static=whole) if use_cache else None
        decode = compiled_decode_step(dev.type) if compile else decode_step
        logp = []
        for t in range(P, L):  # t: the column this step fills, from the columns before it
            if cache is None:  # the reference: the whole context again
                logits = self(out[:, :t], pos=pos[:, :t], mask=visible[:, :, :t, :t])[0][:, -1]
            elif t == P:  # prefill: the prompts at once
                cache.at = cols[:P]
                logits = self(out[:, :P], cache=cache, pos=pos[:, :P], mask=visible[:, :, :P, :P], from_pos=P - 1)
                logits = logits[0][:, -1]
            else:  # decode column t - 1 against the keys of the columns < t (on average half the bytes of the
                cache.at, width = cols[t - 1:t], L if whole else t  # whole buffer), or the whole buffer, masked
                logits = decode(self, cache, out[:, t - 1:t], pos[:, t - 1:t], visible[:, :, t - 1:t, :width])
            nxt = sample(logits, temperature, top_k)  # (B,)
            if stop_token is not None:
                nxt[done] = stop_token
                done |= nxt == stop_token
            out[:, t] = nxt
            if logprobs:
                logp.append(F.log_softmax(logits.float(), dim=-1).gather(1, nxt[:, None])[:, 0])
            if stop_token is not None and done.all():
                out = out[:, :t + 1]
                break
        return (out, torch.stack(logp, 1) if logp else out.new_zeros(B, 0, dtype=torch.float)) if logprobs else out


def sample(logits, temperature, top_k):
    """Next tokens (B,) from logits (B, vocab_size): argmax at temperature 0, else sampled from the top_k."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)[:, 0]


def decode_step(model, cache, tok, pos, mask):
    """Logits (B, vocab_size) after one column tok (B, 1) at positions pos (B, 1), keys visible by mask (B, 1, 1, L)."""
    return model(tok, cache=cache, pos=pos, mask=mask)[0][:, -1]


STATIC_DECODE_DEVICES = ("cuda",)  # compiled, one graph of fixed shapes replayed every step: a CUDA graph


@functools.cache
def compiled_decode_step(device_type):
    """decode_step compiled once per device type and traced per model and shape: with fixed shapes (the whole
    buffer, STATIC_DECODE_DEVICES), else with a dynamic key width (the columns written so far: fewer bytes)."""
    if device_type == "cpu":  # the eager step: inductor's CPU kernels of this step crashed the process (SIGSEGV)
        return decode_step
    static = device_type in STATIC_DECODE_DEVICES
    return torch.compile(decode_step, mode="reduce-overhead" if static else None, dynamic=False if static else None)


def token_logprobs(logits, idx):
    """log p(idx[:, t+1] | idx[:, :t+1]) for t = 0..T-2: (B, T, V), (B, T) -> (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1)
