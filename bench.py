"""
Speed and memory of Panacea's pieces, reported as ratios measured in one run on one device (the
machine's load cancels out of a ratio far better than out of a time):

    adapter train step / full fine-tune step        SVD-LoRA trains a fraction of the weights
    adapter forward / base forward                  the cost of lambda in the singular values
    per-sequence lambda forward / one-lambda forward   one batch covering many preferences
    merged forward / base forward                   merge(): zero inference overhead (~1.0)
    generation without / with KV cache              the static KV cache's speed-up, sampling --batch_size prompts
                                                    of 12 tokens for 32 and 128 new tokens (vocabulary 256), and
                                                    the cache's tokens per second (compiled too with --compile)
    rollout in one left-padded call / by prompt length  batching prompts of different lengths
    log-probs from mid-sequence on / at every position   rlhf.sequence_logprobs on the response only
    trainable parameters / all parameters

    python bench.py                      # the world's model size, on cuda if available
    python bench.py --n_layer 8 --n_embd 512 --device cuda
    python bench.py --init_from smollm2-135m-instruct --batch_size 4 --repeats 3   # the pretrained model
    OMP_NUM_THREADS=1 python bench.py --compile   # with generate(compile=True) (minutes to compile on a CPU)
"""
import argparse
import time

import torch

from model import GPT, GPTConfig
from rlhf import sequence_logprobs
from svd_lora import inject_svd_lora, merge, set_preference

p = argparse.ArgumentParser(description="Panacea benchmark: ratios measured in one run.")
p.add_argument("--device", default="auto")
p.add_argument("--n_layer", type=int, default=4)
p.add_argument("--n_head", type=int, default=4)
p.add_argument("--n_embd", type=int, default=128)
p.add_argument("--vocab_size", type=int, default=280)
p.add_argument("--batch_size", type=int, default=64)
p.add_argument("--seq_len", type=int, default=64)
p.add_argument("--repeats", type=int, default=10)
p.add_argument("--compile", action="store_true", help="also time generation with the compiled decode step")
p.add_argument("--init_from", default=None, help="a pretrained model instead: smollm2-135m-instruct or a Llama-style .gguf path")
args = p.parse_args()
device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
torch.manual_seed(0)
cfg = GPTConfig(block_size=max(128, 2 * args.seq_len), vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)


def timeit(fn, repeats=None, warmups=2):
    """Median seconds of fn() over repeats (default --repeats) runs after the warm-ups."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats or args.repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def train_step(model, opt, x):
    def step():
        _, loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def new_model():
    return (GPT.from_pretrained(args.init_from) if args.init_from else GPT(cfg)).to(device)


def generation(base, results, speeds):
    """Sampling 12-token prompts (--batch_size of them) for 32 and 128 new tokens: the static KV cache's
    tokens per second (and compiled, with --compile), and the time of recomputing the whole context at
    every step over the cache's. At most 3 timed runs each, one without the cache (up to a minute on a CPU)."""
    model = base  # a pretrained model, else one of the benchmark's size with vocabulary 256, room for 12 + 128
    if not args.init_from:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=140, vocab_size=256, n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd)).to(device).eval()
    prompts = torch.randint(model.config.vocab_size, (args.batch_size, 12), device=device)
    repeats = min(args.repeats, 3)
    for n in (32, 128):
        name = f"generation {args.batch_size} x {n} new tokens"
        t_cache = timeit(lambda: model.generate(prompts, n), repeats)
        speeds[f"{name}, static KV cache"] = args.batch_size * n / t_cache
        if args.compile:
            t_compiled = timeit(lambda: model.generate(prompts, n, compile=True), repeats)
            speeds[f"{name}, static KV cache, compiled"] = args.batch_size * n / t_compiled
        t_none = timeit(lambda: model.generate(prompts, n, use_cache=False), repeats=1, warmups=0)
        results[f"{name}: without / with KV cache"] = t_none / t_cache


def main():
    base = new_model()
    x = torch.randint(base.config.vocab_size, (args.batch_size, args.seq_len), device=device)
    adapted = inject_svd_lora(new_model(), rank=8, pref_dim=2, alpha=16.0)
    for l in adapted.modules():  # trained-looking adapters (sigma, s != 0)
        if hasattr(l, "lora_s"):
            torch.nn.init.normal_(l.lora_sigma), torch.nn.init.constant_(l.lora_s, 1.0)
    results = {}
    full = train_step(base, base.configure_optimizers(0.1, 1e-4, device_type=device.split(":")[0]), x)
    lora = train_step(adapted, adapted.configure_optimizers(0.0, 1e-4, device_type=device.split(":")[0]), x)
    results["adapter train step / full fine-tune step"] = timeit(lora) / timeit(full)
    with torch.no_grad():
        t_base = timeit(lambda: base(x))
        set_preference(adapted, [0.3, 0.7])
        t_one = timeit(lambda: adapted(x))
        results["adapter forward / base forward"] = t_one / t_base
        set_preference(adapted, torch.rand(args.batch_size, 2).softmax(-1))
        results["per-sequence lambda forward / one-lambda forward"] = timeit(lambda: adapted(x)) / t_one
        set_preference(adapted, [0.3, 0.7])
        merge(adapted)
        results["merged forward / base forward"] = timeit(lambda: adapted(x)) / t_base
        results["log-probs from mid-sequence on / at every position"] = (timeit(lambda: sequence_logprobs(base, x, args.seq_len // 2)) /
                                                                         timeit(lambda: sequence_logprobs(base, x)))
    base.eval()
    speeds = {}
    generation(base, results, speeds)
    # prompts of 8 different lengths: one left-padded call against one call per length
    lengths = [4 + i % 8 for i in range(args.batch_size)]
    P = max(lengths)
    padded = torch.stack([torch.cat([torch.zeros(P - n, dtype=torch.long, device=device), x[i, :n]]) for i, n in enumerate(lengths)])
    real = torch.tensor([[0] * (P - n) + [1] * n for n in lengths], device=device)
    one_call = timeit(lambda: base.generate(padded, 32, attention_mask=real))
    by_length = timeit(lambda: [base.generate(x[[i for i, m in enumerate(lengths) if m == n], :n], 32) for n in sorted(set(lengths))])
    results["rollout in one left-padded call / by prompt length"] = one_call / by_length
    n_train = sum(q.numel() for q in adapted.parameters() if q.requires_grad)
    results["trainable parameters / all parameters"] = n_train / sum(q.numel() for q in adapted.parameters())
    print(f"device {device}, {base.num_params() / 1e6:.2f}M parameters, batch {args.batch_size} x {args.seq_len} tokens, "
          f"median of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for k, v in results.items():
        print(f"{k:58s} {v:8.3f}")
    for k, v in speeds.items():
        print(f"{k:58s} {v:8.0f} tokens/s")


if __name__ == "__main__":
    main()
