"""
What a user needs to know about speed, as ratios measured in one run on one device (the machine's
load cancels out of a ratio far better than out of a time). The defaults are TRL's anchor sizes: a
random-init GPT of 4 layers, 4 heads, 128 dims, vocabulary 256; 64 prompts of 12 tokens, 32 new
tokens; PPO with 2 epochs of 2 minibatches of 32, m = 2 objectives.

    PPO iteration / plain train step     one Panacea-PPO iteration (rlhf: collect -> advantages -> update)
                                         against one fwd + bwd + AdamW step of the same model on the same
                                         64 x 44 tokens; and the iteration's shares: rollout (generation),
                                         scoring (old and reference log-probs, reward model, values),
                                         advantages (KL rewards, GAE), update (the PPO epochs)
    DPO step / plain train step          one rlhf.dpo_update on 32 pairs (reference log-probs, one step)
    generation tokens/s                  64 x 32 and 64 x 128 new tokens, sampling, with the static KV cache
                                         (and compiled, --compile), and the time without the cache / with it
    adapter train step / full fine-tune step, adapter forward / base forward, merged / base forward
    on CUDA: SFT tokens/s and model FLOPs utilisation (6 N + 12 L T d FLOPs a token, bfloat16 autocast)

    python bench.py                                   # on cuda if available
    python bench.py --n_layer 12 --n_head 12 --n_embd 768 --device cuda           # an 85 M GPT
    python bench.py --init_from smollm2-135m-instruct --batch_size 16             # a pretrained model
    python bench.py --device cuda --compile           # also generate(compile=True): a CUDA graph
                                                      # (a CPU decodes eagerly)
"""
import time

import torch

from cli import Parser, device as device_flag, positive_int
from model import GPT, GPTConfig
from rlhf import DPOConfig, PPOConfig, advantages, collect, dpo_update, rollout, update
from svd_lora import inject_svd_lora, merge, set_preference

p = Parser("Panacea benchmark: ratios measured in one run.")
p.add_argument("--device", type=device_flag, default="auto")
p.add_argument("--n_layer", type=positive_int, default=4)
p.add_argument("--n_head", type=positive_int, default=4)
p.add_argument("--n_embd", type=positive_int, default=128)
p.add_argument("--vocab_size", type=positive_int, default=256)
p.add_argument("--batch_size", type=positive_int, default=64, help="prompts (DPO: pairs are half of it)")
p.add_argument("--prompt_len", type=positive_int, default=12)
p.add_argument("--new_tokens", type=positive_int, default=32)
p.add_argument("--repeats", type=positive_int, default=5)
p.add_argument("--compile", action="store_true", help="also time generation with the compiled decode step")
p.add_argument("--init_from", default=None, help="a pretrained model instead (a Hugging Face directory or GGUF file)")
args = p.parse_args()
device, B, P, N = args.device, args.batch_size, args.prompt_len, args.new_tokens
cuda = device.startswith("cuda")
autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda)


class Ids:
    """A tokenizer of space-separated ids, so that rollouts run on random prompts of any vocabulary."""
    eot = 0

    def encode(self, text):
        return [int(w) for w in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)

    def chat(self, prompt):
        return prompt


def timeit(fn, repeats=None, warmups=2):
    """Median seconds of fn() over repeats (default --repeats) runs after the warm-ups."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats or args.repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def new_model(n_heads_out=0):
    torch.manual_seed(0)
    if args.init_from:
        return GPT.from_pretrained(args.init_from, n_heads_out=n_heads_out).to(device)
    config = GPTConfig(block_size=P + 128, vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, n_heads_out=n_heads_out)
    return GPT(config).to(device)


def plain_step(model, opt, x):
    """One fwd + bwd + AdamW step of the whole model: the unit every ratio below is measured in."""
    def step():
        with autocast:
            loss = model(x, x)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def ppo(results, t_plain):
    """The PPO iteration against the plain step, and where its time goes."""
    policy = inject_svd_lora(new_model(), 8, 2, 16.0)
    critic = inject_svd_lora(new_model(2), 8, 2, 16.0)
    critic.value_head.requires_grad_(True)
    reward_model = new_model(2).eval()
    opt = torch.optim.AdamW([q for net in (policy, critic) for q in net.parameters() if q.requires_grad], lr=1e-5)
    tok, cfg = Ids(), PPOConfig(max_new_tokens=N, epochs=2, minibatch_size=B // 2)
    vocab = policy.config.vocab_size
    prompts = [" ".join(str(int(i)) for i in torch.randint(1, vocab, (P,))) for _ in range(B)]
    prefs = torch.rand(B, 2, device=device).softmax(-1)
    stats = {"mean": torch.zeros(2, device=device), "std": torch.ones(2, device=device),
             "min": -torch.ones(2, device=device)}
    with autocast:
        batch = collect(policy, critic, reward_model, tok, prompts, prefs, cfg, stats)
        parts = {"rollout": timeit(lambda: rollout(policy, tok, prompts, prefs, N, 1.0)),
                 "collect": timeit(lambda: collect(policy, critic, reward_model, tok, prompts, prefs, cfg, stats)),
                 "advantages": timeit(lambda: advantages(dict(batch), cfg)),
                 "update": timeit(lambda: update(policy, critic, opt, advantages(dict(batch), cfg), cfg))}
    parts["scoring"], parts["update"] = parts.pop("collect") - parts["rollout"], parts["update"] - parts["advantages"]
    total = sum(parts.values())
    results["PPO iteration / plain train step"] = total / t_plain
    for k in ("rollout", "scoring", "advantages", "update"):
        results[f"  share of the PPO iteration: {k}"] = parts[k] / total


def dpo(results, t_plain):
    """One DPO step on B / 2 pairs (2 responses each, B sequences in all) against the plain step on B sequences."""
    policy = inject_svd_lora(new_model(), 8, 2, 16.0)
    opt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=1e-5)
    n = B // 2
    tokens = torch.randint(1, policy.config.vocab_size, (2 * n, P + N), device=device)
    plen, slen = torch.full((2 * n,), P, device=device), torch.full((2 * n,), P + N, device=device)
    winners = torch.randint(2, (n, 2), device=device)
    prefs = torch.rand(n, 2, device=device).softmax(-1)
    with autocast:
        t = timeit(lambda: dpo_update(policy, opt, (tokens, plen, slen, winners), prefs, DPOConfig(epochs=1,
                                                                                                    minibatch_size=n)))
    results["DPO step / plain train step"] = t / t_plain


def generation(results, speeds):
    """Sampling --batch_size prompts for --new_tokens and 128 new tokens: tokens per second with the static
    KV cache (and compiled), and recomputing the whole context at every step over the cache (timed once)."""
    model = new_model().eval()
    prompts = torch.randint(model.config.vocab_size, (B, P), device=device)
    for n in sorted({N, 128}):
        name = f"generation {B} x {n} new tokens"
        with autocast:
            t_cache = timeit(lambda: model.generate(prompts, n), min(args.repeats, 3))
            speeds[f"{name}, static KV cache"] = B * n / t_cache
            if args.compile:
                t_compiled = timeit(lambda: model.generate(prompts, n, compile=True), min(args.repeats, 3))
                speeds[f"{name}, static KV cache, compiled"] = B * n / t_compiled
            t_none = timeit(lambda: model.generate(prompts, n, use_cache=False), repeats=1, warmups=0)
        results[f"{name}: without / with the KV cache"] = t_none / t_cache


def adapters(results, x, t_plain):
    """What SVD-LoRA costs and saves against the base model."""
    base, adapted = new_model(), inject_svd_lora(new_model(), rank=8, pref_dim=2, alpha=16.0)
    for layer in adapted.modules():  # trained-looking adapters (sigma, s != 0)
        if hasattr(layer, "lora_s"):
            torch.nn.init.normal_(layer.lora_sigma)
            torch.nn.init.constant_(layer.lora_s, 1.0)
    set_preference(adapted, torch.rand(x.size(0), 2, device=device).softmax(-1))
    opt = adapted.configure_optimizers(0.0, 1e-5, device_type="cuda" if cuda else "cpu")
    results["adapter train step / full fine-tune step"] = timeit(plain_step(adapted, opt, x)) / t_plain
    with torch.no_grad(), autocast:
        t_base = timeit(lambda: base(x))
        results["adapter forward (one lambda per sequence) / base forward"] = timeit(lambda: adapted(x)) / t_base
        set_preference(adapted, [0.3, 0.7])
        merge(adapted)
        results["merged forward / base forward"] = timeit(lambda: adapted(x)) / t_base


def sft_speed(speeds, model, t_plain, tokens):
    """Training tokens per second of a plain step, and the share of the GPU's peak it uses."""
    c = model.config
    flops = 6 * model.num_params() + 12 * c.n_layer * tokens.size(1) * c.n_embd  # per token, fwd + bwd
    speeds["SFT train tokens/s"] = tokens.numel() / t_plain
    peak = 989e12 if any(k in torch.cuda.get_device_name() for k in ("H100", "H200")) else None  # bf16 dense
    if peak:
        speeds["SFT model FLOPs utilisation (%)"] = 100 * flops * tokens.numel() / t_plain / peak


def main():
    model = new_model()
    x = torch.randint(model.config.vocab_size, (B, P + N), device=device)  # the plain step's batch: 64 x 44
    opt = model.configure_optimizers(0.0, 1e-5, device_type="cuda" if cuda else "cpu")
    t_plain = timeit(plain_step(model, opt, x))
    results, speeds = {}, {}
    ppo(results, t_plain)
    dpo(results, t_plain)
    adapters(results, x, t_plain)
    generation(results, speeds)
    if cuda:
        sft_speed(speeds, model, t_plain, x)
    print(f"device {device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} threads'}), "
          f"{model.num_params() / 1e6:.2f}M parameters, {B} prompts of {P} tokens, {N} new tokens, "
          f"median of {args.repeats}, torch {torch.__version__}; plain train step {t_plain * 1000:.1f} ms")
    for k, v in results.items():
        print(f"{k:60s} {v:8.3f}")
    for k, v in speeds.items():
        print(f"{k:60s} {v:8.0f}")


if __name__ == "__main__":
    main()
