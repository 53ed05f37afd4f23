"""
A small GPT in the style of nanoGPT, serving three roles in Panacea:
  - the policy (language model head tied to the token embedding),
  - the reward model and the critic (n_heads_out > 0: one scalar per objective at every position).

Data flow:
    idx (B, T) token ids
    -> token embedding + position embedding                      (B, T, n_embd)
    -> n_layer pre-LayerNorm blocks: x + attn(ln(x)), x + mlp(ln(x))
    -> final LayerNorm
    -> logits (B, T, vocab_size)        if n_heads_out == 0   (every position: RL needs them all)
       values (B, T, n_heads_out)       otherwise             (read at the last token or every token)

generate() decodes with a KV cache: the keys and values of past positions are kept per layer, so
each new token costs one position's forward pass instead of the whole context's. Prompts of
different lengths are left-padded and batched: an attention mask hides the padding and each row's
positions count from its first real token, so every row computes what it would alone.
"""
import inspect
import math
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


class KVCache:
    """Keys and values of the positions seen so far: per layer a pair of (B, n_head, T_past, head_size)."""

    def __init__(self, n_layer):
        self.layers = [None] * n_layer

    def __len__(self):
        return 0 if self.layers[0] is None else self.layers[0][0].size(2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, cache=None, layer=0, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            if cache.layers[layer] is not None:  # decoding: append to the cached keys and values
                k = torch.cat([cache.layers[layer][0], k], dim=2)
                v = torch.cat([cache.layers[layer][1], v], dim=2)
            cache.layers[layer] = (k, v)
        # without an explicit mask: causal, or (one new position after the cache) attend to everything
        causal = mask is None and k.size(2) == T
        assert mask is not None or causal or T == 1, "with a cache and no mask, decode one position at a time"
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.n_heads_out:
            self.value_head = nn.Linear(config.n_embd, config.n_heads_out)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, targets=None, cache=None, pos=None, mask=None):
        """Logits (or values) at every position; with targets (-1 = ignored), also the mean
        cross-entropy. With a cache, positions continue from the cached length. pos (B, T) and a
        boolean attention mask (B, 1, T, T_keys) serve left-padded batches (see generate)."""
        B, T = idx.size()
        t0 = len(cache) if cache is not None else 0
        assert t0 + T <= self.config.block_size, f"sequence of {t0 + T} exceeds block_size {self.config.block_size}"
        if pos is None:
            pos = torch.arange(t0, t0 + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, mask)
        x = self.transformer.ln_f(x)
        if self.config.n_heads_out:
            return self.value_head(x), None  # (B, T, n_heads_out)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu"):
        """AdamW over the trainable parameters only (frozen base weights are left out): matrices
        decay, biases and LayerNorm gains do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, stop_token=None, attention_mask=None):
        """Continue every row of idx (B, T) by up to max_new_tokens tokens. temperature 0 is greedy.
        With a stop_token, decoding ends once every row has produced it, and a row's tokens after
        its first stop_token are stop_token too. use_cache=False recomputes the whole context at
        every step (same tokens, slower). attention_mask (B, T), 0 on left padding, batches
        prompts of different lengths."""
        cache = KVCache(self.config.n_layer) if use_cache else None
        B = idx.size(0)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        real = attention_mask.bool() if attention_mask is not None else None
        for _ in range(max_new_tokens):
            if idx.size(1) >= self.config.block_size:
                break
            start = len(cache) if use_cache else 0  # the positions this step feeds in
            pos = mask = None
            if real is not None:
                T = idx.size(1)
                pos = (real.long().cumsum(1) - 1).clamp(min=0)[:, start:]  # (B, T_new): counted from the first real token
                eye = torch.eye(T, dtype=torch.bool, device=idx.device)
                # query i sees keys j <= i that are real (and itself, so padded queries stay finite)
                mask = (torch.tril(torch.ones(T, T, dtype=torch.bool, device=idx.device)) & (real[:, None, :] | eye))[:, None, start:]
            logits, _ = self(idx[:, start:], cache=cache, pos=pos, mask=mask)
            logits = logits[:, -1, :]  # (B, vocab_size)
            if temperature == 0.0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            if stop_token is not None:
                nxt[done] = stop_token
                done |= nxt[:, 0] == stop_token
            idx = torch.cat((idx, nxt), dim=1)
            if real is not None:
                real = torch.cat((real, torch.ones_like(nxt, dtype=torch.bool)), dim=1)
            if stop_token is not None and done.all():
                break
        return idx


def token_logprobs(logits, idx):
    """log p(idx[:, t+1] | idx[:, :t+1]) for t = 0..T-2: (B, T, V), (B, T) -> (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1)
