import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if "PYTEST_XDIST_WORKER" in os.environ:
    # pytest.ini runs one worker per core: a thread each, for the scripts the tests start too
    # (two workers of two threads on two cores spin-wait for each other)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from model import GPT, GPTConfig  # noqa: E402
from tokenizer import load as load_tokenizer  # noqa: E402


def world_tokenizer():
    """The tokenizer of the world's from-scratch GPT (its few hundred GPT-2 tokens)."""
    from data import World
    return load_tokenizer(World.tokenizer_spec())


def tiny_gpt(n_heads_out=0, seed=0, vocab_size=50, block_size=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=64,
                         n_heads_out=n_heads_out))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
