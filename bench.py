"""
Speed and memory of Panacea's pieces, reported as ratios measured in one run on one device (the
machine's load cancels out of a ratio far better than out of a time):

    adapter train step / full fine-tune step        SVD-LoRA trains a fraction of the weights
    adapter forward / base forward                  the cost of lambda in the singular values
    per-sequence lambda forward / one-lambda forward   one batch covering many preferences
    merged forward / base forward                   merge(): zero inference overhead (~1.0)
    generation without / with KV cache              the cache's speed-up
    rollout in one left-padded call / by prompt length  batching prompts of different lengths
    log-probs from mid-sequence on / at every position   rlhf.sequence_logprobs on the response only
    trainable parameters / all parameters

    python bench.py                      # the world's model size, on cuda if available
    python bench.py --n_layer 8 --n_embd 512 --device cuda
    python bench.py --init_from smollm2-135m-instruct --batch_size 4 --repeats 3   # the pretrained model
"""
import time

import torch

from cli import Parser, device as device_flag, positive_int
from model import GPT, GPTConfig
from rlhf import sequence_logprobs
from svd_lora import inject_svd_lora, merge, set_preference

p = Parser("Panacea benchmark: ratios measured in one run.")
p.add_argument("--device", type=device_flag, default="auto")
p.add_argument("--n_layer", type=positive_int, default=4)
p.add_argument("--n_head", type=positive_int, default=4)
p.add_argument("--n_embd", type=positive_int, default=128)
p.add_argument("--vocab_size", type=positive_int, default=280)
p.add_argument("--batch_size", type=positive_int, default=64)
p.add_argument("--seq_len", type=positive_int, default=64)
p.add_argument("--repeats", type=positive_int, default=10)
p.add_argument("--init_from", default=None, help="a pretrained model instead: smollm2-135m-instruct or a Llama-style .gguf path")
args = p.parse_args()
device = args.device
torch.manual_seed(0)
cfg = GPTConfig(block_size=max(128, 2 * args.seq_len), vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)


def timeit(fn):
    """Median seconds of fn() over --repeats runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(args.repeats):
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
    prompt = x[:, :8]
    n_new = min(args.seq_len, base.config.block_size - 8)
    results["generation without / with KV cache"] = (timeit(lambda: base.generate(prompt, n_new, use_cache=False)) /
                                                     timeit(lambda: base.generate(prompt, n_new, use_cache=True)))
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
          f"median of {args.repeats}, torch {torch.__version__}")
    for k, v in results.items():
        print(f"{k:52s} {v:8.3f}")


if __name__ == "__main__":
    main()
