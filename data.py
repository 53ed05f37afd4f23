"""
Where the text comes from: the embedded world or your own JSONL files; and the tokenizer that reads it.

A source gives train.py, evaluate.py and sample.py everything that depends on the data:
    objectives               the objectives its pairs label, in file order (world: helpful, harmless, concise)
    default_objectives       those trained on without --objectives (world: helpful, harmless; your data: all)
    sft_records()            [{"prompt", "response"}]   (sft_tensors: tokenised, in the model's chat template)
    pair_records(split)      [{"prompt", "response_0", "response_1", "winners": {objective: 0, 1 or -1 (a tie)}}]
                             (pair_tensors: tokenised; samples longer than the model's block_size left out)
    prompts(split)           distinct prompt texts: "train" for PPO, "eval" (held out) for the front
    judge                    None, or judge(prompts, responses, objectives) -> (B, m) ground-truth scores
                             (the world's; a response None is unfinished and scores as malformed)
    well_formed              None, or well_formed(text) -> whether a response follows the world's grammar
    digest(stage)            a hash of the files a stage reads: a stage trained on other data is not reused

Your own data (--data_dir DIR), one JSON object per line:
    DIR/pairs.jsonl          prompt, response_0, response_1 and <objective>_winner (0 or 1, -1 a tie) for
                             each objective (any names, at least 2). PKU-SafeRLHF's release is read as it is:
                             better_response_id is helpful_winner, safer_response_id harmless_winner.
    DIR/pairs_eval.jsonl     held-out pairs (optional; default: the pairs of every 10th distinct prompt)
    DIR/sft.jsonl            prompt, response (optional; default: every training pair's winner on the
                             first objective)
A missing field, a winner other than 0, 1 or -1 or an empty file stops with one line naming file and line.

    tokenizer_spec()         the tokenizer a from-scratch GPT reads (tokenizer.py): the world's few hundred
                             GPT-2 tokens, or all of GPT-2's for your own text
    limits(objectives, ...)  the world's limits (attainable front, its LS points, the hypervolume reference
                             point) and the ceilings below them (the KL-regularised optimum with the judges
                             and with a run's reward models as rewards); None for your own data

Records become tensors in the layout every training stage reads (rlhf.py's docstring):
    tokens (N, T) = prompt (in the model's chat template) + response + <|endoftext|>, right-padded;
    prompt_len (N,), seq_len (N,). Pairs: rows < N hold response_0, rows >= N response_1.
"""
import functools
import hashlib
import json
import os
import zlib

import torch

import tokenizer
import world
from panacea import hypervolume

PKU_FIELDS = {"better_response_id": "helpful", "safer_response_id": "harmless"}
WINNER = "_winner"


def read_jsonl(path, keys=()):
    """Records of a JSONL file, each checked to hold `keys`; a ValueError names the file and line."""
    if not os.path.exists(path):
        raise ValueError(f"data file {path} does not exist")
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path} line {i} is not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {i} is not valid JSON") from None
            missing = [k for k in keys if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise ValueError(f"{path} line {i} lacks {', '.join(missing)}")
            out.append((i, rec))
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def winner_fields(rec):
    """{objective: field} of a record: <objective>_winner fields, and PKU-SafeRLHF's own names."""
    fields = {k[: -len(WINNER)]: k for k in rec if k.endswith(WINNER)}
    fields.update({o: k for k, o in PKU_FIELDS.items() if k in rec and o not in fields})
    return fields


def read_pairs(path, objectives=None):
    """Pair records with their winners per objective; the objectives are those of the first record
    (or the given ones), and every record must label each of them."""
    lines = read_jsonl(path)
    objectives = list(objectives or winner_fields(lines[0][1] if isinstance(lines[0][1], dict) else {}))
    out = []
    for i, rec in lines:  # the first bad line is the one named
        missing = [k for k in ("prompt", "response_0", "response_1") if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{path} line {i} lacks {', '.join(missing)}")
        fields = winner_fields(rec)
        missing = [o for o in objectives if o not in fields]
        if missing:
            raise ValueError(f"{path} line {i} lacks {', '.join(o + WINNER for o in missing)} "
                             f"(the objectives are {', '.join(objectives)})")
        winners = {}
        for o in objectives:
            w = rec[fields[o]]
            if type(w) is not int or w not in (0, 1, -1):
                raise ValueError(f"{path} line {i}: {fields[o]} is {w!r}; a winner is 0, 1 or -1 (a tie)")
            winners[o] = int(w)
        texts = [rec[k] for k in ("prompt", "response_0", "response_1")]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path} line {i}: prompt, response_0 and response_1 must be strings")
        out.append({"prompt": texts[0], "response_0": texts[1], "response_1": texts[2], "winners": winners})
    return objectives, out


class Source:
    """Data read from JSONL files: paths {"sft", "pairs", "pairs_eval"}, each None where absent."""
    judge = None  # no ground truth: the front is measured with the reward models
    well_formed = None  # no grammar to check responses against

    def __init__(self, paths, describe):
        self.paths, self.describe = paths, describe
        self.objectives = self.default_objectives = self._read("pairs")[0]
        if len(self.objectives) < 2:
            raise ValueError(f"{paths['pairs']} labels {len(self.objectives)} objective(s) "
                             f"({', '.join(self.objectives) or 'none'}); Panacea needs 2 or more "
                             "<objective>_winner fields")

    @functools.lru_cache(maxsize=None)
    def _read(self, name):
        """(objectives, records) of a pairs file, parsed once per source."""
        return read_pairs(self.paths[name], getattr(self, "objectives", None))

    def pair_records(self, split):
        if self.paths["pairs_eval"] is not None:
            return self._read("pairs" if split == "train" else "pairs_eval")[1]
        recs = self._read("pairs")[1]  # every 10th distinct prompt is held out
        return [r for r in recs if (zlib.crc32(r["prompt"].encode()) % 10 == 0) == (split == "eval")]

    def sft_records(self):
        if self.paths["sft"] is not None:
            recs = read_jsonl(self.paths["sft"], ["prompt", "response"])
            bad = next((i for i, r in recs if not all(isinstance(r[k], str) for k in ("prompt", "response"))), None)
            if bad is not None:
                raise ValueError(f"{self.paths['sft']} line {bad}: prompt and response must be strings")
            return [r for _, r in recs]
        first = self.objectives[0]
        return [{"prompt": r["prompt"], "response": r[f"response_{r['winners'][first]}"]}
                for r in self.pair_records("train") if r["winners"][first] >= 0]

    def prompts(self, split):
        return list(dict.fromkeys(r["prompt"] for r in self.pair_records(split)))

    def tokenizer_spec(self):
        return {"gpt2_ids": "all"}  # real text: GPT-2's whole BPE

    def limits(self, objectives, grid, standard, beta=None, reward=None, dpo_beta=None):
        return None  # no judges, so no limits known

    def digest(self, stage="rm"):
        """A hash of the files a stage reads ("sft": the SFT records, which are the pairs' winners when there
        is no sft file; "rm" and later: all of them), so that a stage trained on other data is not reused."""
        h = hashlib.sha256()
        for name in ("sft",) if stage == "sft" and self.paths["sft"] else ("sft", "pairs", "pairs_eval"):
            if self.paths[name] is not None:
                with open(self.paths[name], "rb") as f:
                    h.update(name.encode() + f.read())
        return h.hexdigest()[:16]


def own_data(data_dir):
    """Your own files in data_dir (see the module docstring)."""
    paths = {n: os.path.join(data_dir, n + ".jsonl") for n in ("sft", "pairs", "pairs_eval")}
    if not os.path.exists(paths["pairs"]):
        raise ValueError(f"{paths['pairs']} does not exist: --data_dir needs pairs.jsonl (see data.py)")
    present = {n: p if n == "pairs" or os.path.exists(p) else None for n, p in paths.items()}
    src = Source(present, f"your data in {data_dir}")
    for split in ("train", "eval"):
        if not src.pair_records(split):
            raise ValueError(f"{paths['pairs']}: no {split} pairs left after the held-out split; add pairs_eval.jsonl")
    return src


class World(Source):
    """The embedded world's data, generated once into data_dir and named by what generated it."""

    def __init__(self, data_dir, seed, n_sft, n_pairs, label_temperature, write=True):
        self.seed, self.label_temperature = seed, label_temperature
        n_eval = max(200, n_pairs // 10)
        paths = {"sft": f"sft-n{n_sft}-seed{seed}", "pairs": f"pairs-n{n_pairs}-T{label_temperature}-seed{seed}",
                 "pairs_eval": f"pairs_eval-n{n_eval}-seed{seed}"}
        paths = {k: os.path.join(data_dir, v + ".jsonl") for k, v in paths.items()}
        if write:  # (under DDP rank 0 writes, the others wait and read)
            for name, make in (
                    ("sft", lambda: world.sft_corpus(n_sft, seed)),
                    ("pairs", lambda: world.preference_pairs(n_pairs, "train", label_temperature, seed=seed)),
                    ("pairs_eval", lambda: world.preference_pairs(n_eval, "eval", 0.0, seed=seed))):
                if not os.path.exists(paths[name]):
                    world.write_jsonl(paths[name], make())
        self.paths, self.describe, self.objectives = paths, "the embedded world", list(world.OBJECTIVES)
        self.default_objectives = ["helpful", "harmless"]

    def prompts(self, split):
        return [p for _, p in world.prompts(split, self.seed)]

    @staticmethod
    def well_formed(text):
        return world.parse(text) is not None

    @staticmethod
    def judge(prompts, responses, objectives):
        return torch.tensor([world.judge_text(world.task_of(p), r, objectives) if r is not None
                             else [world.MALFORMED] * len(objectives) for p, r in zip(prompts, responses)])

    @staticmethod
    def tokenizer_spec():
        """The GPT-2 tokens of every text the world can produce, its prompts in the chat template."""
        prompts, responses = world.world_texts()
        return {"gpt2_ids": tokenizer.gpt2_ids([tokenizer.gpt2_chat(p) for p in prompts] + responses)}

    def limits(self, objectives, grid, standard, beta=None, reward=None, dpo_beta=None):
        """What no policy can exceed on the held-out prompts: the attainable front and its hypervolume
        against the world's fixed reference point (set by the `standard` lambda grid), the LS points of
        the attainable front on `grid` and on `standard`. With beta, the ceilings below them: for each
        lambda of grid the judge-scored optimum pi*_lambda of the KL-regularised objective at beta
        (world.kl_optimum) with the standardised judges as rewards (the best KL-regularised RLHF can
        do), and with reward(prompts, texts) -> (N, m), a run's standardised reward models (the best
        they allow). With dpo_beta, DPO's own optimum on these pairs: for one objective, DPO on pairs
        labelled by Bradley-Terry at temperature T is minimised by pi ∝ pi_ref exp(J_i / (T beta)); with
        LS its pairwise optimum sigma(beta (h_0 - h_1)) = sum_i lambda_i sigma((J_i(y_0) - J_i(y_1)) / T)
        has no reward form, and pi ∝ pi_ref exp(sum_i lambda_i J_i / (T beta)) is its first-order
        approximation (exact at the vertices)."""
        ref = world.reference_point(objectives, standard, seed=self.seed)
        attainable = world.attainable_front(objectives, seed=self.seed, cache_dir=os.path.dirname(self.paths["pairs"]))
        out = {"reference_point": ref, "attainable_front": attainable,
               "attainable_hypervolume": hypervolume(attainable, ref),
               "ls_points": world.ls_front(objectives, grid, seed=self.seed),
               "ls_hypervolume": hypervolume(world.ls_front(objectives, standard, seed=self.seed), ref)}
        if beta is not None:
            out["judge_ceiling"] = dict(world.kl_optimum(objectives, grid, beta, seed=self.seed), beta=beta)
        if reward is not None:
            out["rm_ceiling"] = dict(world.kl_optimum(objectives, grid, beta, reward, seed=self.seed), beta=beta)
        if dpo_beta is not None and self.label_temperature > 0:
            def label_reward(prompts, texts):  # J / T: the Bradley-Terry rewards the labels were drawn with
                return [[j / self.label_temperature for j in world.judge_text(world.task_of(p), y, objectives)]
                        for p, y in zip(prompts, texts)]
            out["dpo_ceiling"] = dict(world.kl_optimum(objectives, grid, dpo_beta, label_reward, seed=self.seed),
                                      beta=dpo_beta)
        return out


# ---------------------------------------------------------------------------------------------- records -> tensors
def pack(seqs, pad):
    """List of token lists -> (B, T) right-padded LongTensor and lengths (B,)."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, torch.tensor([len(s) for s in seqs])


def encode_samples(tok, prompts, responses):
    """Tokenise (rendered prompt, response) texts into the layout above: tokens, prompt_len, seq_len."""
    p_ids = [tok.encode(p) for p in prompts]
    seqs = [p + tok.encode(r) + [tok.eot] for p, r in zip(p_ids, responses)]
    tokens, seq_len = pack(seqs, tok.eot)
    return tokens, torch.tensor([len(p) for p in p_ids]), seq_len


def encode_pairs(tok, prompts, responses_0, responses_1, winners):
    """Preference pairs (rendered prompts, both responses, winners (N, m): 0, 1 or -1 for no
    preference) -> (tokens (2N, T), prompt_len, seq_len, winners); rows < N hold response_0, rows >= N response_1."""
    return (*encode_samples(tok, list(prompts) * 2, list(responses_0) + list(responses_1)), torch.as_tensor(winners))


def pair_batch(pairs, ix, device):
    """Pairs ix of encode_pairs' output, both responses, trimmed to the longest row, on device."""
    tokens, plen, slen, winners = pairs
    rows = torch.cat([ix, ix + winners.size(0)])
    T = int(slen[rows].max())
    return tokens[rows, :T].to(device), plen[rows].to(device), slen[rows].to(device), winners[ix].to(device)


def fitting(tokens, plen, slen, n_rows, block_size):
    """The rows (SFT samples, or pairs: both responses) no longer than block_size, and how many are not."""
    fits = (slen <= block_size).view(-1, n_rows).all(0)
    if not fits.any():
        raise ValueError(f"no sample fits in --block_size {block_size} tokens")
    rows = torch.arange(len(slen)).view(-1, n_rows)[:, fits].flatten()  # pairs: kept response_0 rows, then response_1's
    return (tokens[rows, : int(slen[rows].max())], plen[rows], slen[rows]), fits, int((~fits).sum())


def sft_tensors(source, tok, block_size):
    """(tokens, prompt_len, seq_len) of the SFT corpus, each prompt in tok's chat template; how many were too long."""
    recs = source.sft_records()
    seqs = encode_samples(tok, [tok.chat(r["prompt"]) for r in recs], [r["response"] for r in recs])
    out, _, dropped = fitting(*seqs, len(recs), block_size)
    return out, dropped


def pair_tensors(source, tok, split, objectives, block_size):
    """encode_pairs' tensors of the source's split ("train" or "eval"), the winners of `objectives`; how many
    were too long."""
    recs = source.pair_records(split)
    *seqs, winners = encode_pairs(tok, [tok.chat(r["prompt"]) for r in recs], [r["response_0"] for r in recs],
                                  [r["response_1"] for r in recs],
                                  [[r["winners"][o] for o in objectives] for r in recs])
    out, fits, dropped = fitting(*seqs, len(recs), block_size)
    return (*out, winners[fits]), dropped

