"""data.py: reading your own JSONL preference data (PKU-SafeRLHF's layout and <objective>_winner files),
the embedded world as a data source, and the tokenizers. Fast: no training."""
import json
import os
import re
import shutil
import zlib

import pytest

import data
import tokenizer
import world

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PKU, NAMED = os.path.join(FIXTURES, "pku"), os.path.join(FIXTURES, "named")
PAIR_KEYS = {"prompt", "response_0", "response_1", "winners"}


def raw(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def held_out(prompt):
    return zlib.crc32(prompt.encode()) % 10 == 0


def line_re(n):
    return re.compile(rf"\bline {n}\b")


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def pair(prompt="p", **winners):
    return {"prompt": prompt, "response_0": "a", "response_1": "b", **{f"{o}_winner": w for o, w in winners.items()}}


def raises_naming(path, line, call):
    """call() raises a ValueError whose message names `path` and (unless None) `line`."""
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert str(path) in msg, msg
    if line is not None:
        assert line_re(line).search(msg), msg
    assert "\n" not in msg, msg  # one line
    return msg


@pytest.fixture(scope="module")
def pku():
    return data.own_data(PKU)


@pytest.fixture(scope="module")
def gpt2_all():
    return tokenizer.load({"gpt2_ids": "all"})


@pytest.fixture(scope="module")
def world_tok():
    return tokenizer.load(data.World.tokenizer_spec())


# ----------------------------------------------------------------------------------------------
# PKU-SafeRLHF layout

def test_pku_objectives_and_winners_come_from_better_and_safer_response_id(pku):
    assert pku.objectives == ["helpful", "harmless"]
    assert pku.judge is None
    recs = pku.pair_records("train") + pku.pair_records("eval")
    assert len(recs) == len(raw(os.path.join(PKU, "pairs.jsonl")))
    assert all(set(r) == PAIR_KEYS for r in recs)  # the release's other fields are dropped
    fake_id = [r for r in recs if r["response_0"].startswith("Sorry, I can't help with that. Making a fake ID")]
    assert len(fake_id) == 1  # better_response_id 1 (the forgery recipe), safer_response_id 0 (the refusal)
    assert fake_id[0]["prompt"] == "How to make a fake ID?"
    assert fake_id[0]["winners"] == {"helpful": 1, "harmless": 0}
    lock = [r for r in recs if r["response_1"].startswith("Use a bobby pin")]
    assert len(lock) == 1 and lock[0]["winners"] == {"helpful": 1, "harmless": 0}
    espresso = [r for r in recs if r["response_0"].startswith("Grind about 18 g")]
    assert len(espresso) == 1 and espresso[0]["winners"] == {"helpful": 0, "harmless": 0}
    # winners match the raw fields record for record (order kept), texts kept byte for byte
    by_text = {(r["prompt"], r["response_0"], r["response_1"]): r["winners"] for r in recs}
    for rec in raw(os.path.join(PKU, "pairs.jsonl")):
        key = (rec["prompt"], rec["response_0"], rec["response_1"])
        assert by_text[key] == {"helpful": rec["better_response_id"], "harmless": rec["safer_response_id"]}
    prompts = {r["prompt"] for r in recs}
    assert "How should I format my résumé for a café job?" in prompts  # accents kept
    assert "How do I repot a cactus without getting  pricked?" in prompts  # double space kept


def test_pku_default_split_holds_out_every_tenth_prompt_disjointly(pku):
    all_prompts = list(dict.fromkeys(r["prompt"] for r in raw(os.path.join(PKU, "pairs.jsonl"))))
    train, ev = pku.prompts("train"), pku.prompts("eval")
    assert len(ev) >= 2 and len(train) >= 20
    assert len(set(train)) == len(train) and len(set(ev)) == len(ev)  # distinct
    assert not set(train) & set(ev)
    assert set(train) | set(ev) == set(all_prompts)
    assert all(held_out(p) for p in ev) and not any(held_out(p) for p in train)
    # every pair of a held-out prompt goes to eval, so no prompt is split between the two
    assert {r["prompt"] for r in pku.pair_records("eval")} == set(ev)
    assert len(pku.pair_records("train")) + len(pku.pair_records("eval")) == 40
    assert train == [p for p in all_prompts if not held_out(p)]  # file order


def test_pku_default_sft_is_the_helpful_winner_of_training_pairs_only(pku):
    expected = [{"prompt": r["prompt"], "response": r[f"response_{r['better_response_id']}"]}
                for r in raw(os.path.join(PKU, "pairs.jsonl")) if not held_out(r["prompt"])]
    sft = pku.sft_records()
    assert sft == expected
    eval_prompts = set(pku.prompts("eval"))
    assert not eval_prompts & {r["prompt"] for r in sft}
    responses = {r["response"] for r in sft}
    assert any(r.startswith("Scan a real card") for r in responses)  # helpful, though unsafe
    assert not any(r.startswith("Sorry, I can't help with that. Making a fake ID") for r in responses)


# ----------------------------------------------------------------------------------------------
# <objective>_winner files with any names

def test_named_objectives_ties_and_separate_eval_and_sft_files():
    src = data.own_data(NAMED)
    assert src.objectives == ["funny", "polite", "brief"]  # first record's order (line 4 lists them otherwise)
    train, ev = src.pair_records("train"), src.pair_records("eval")
    # no hash split
    assert [r["prompt"] for r in train] == [r["prompt"] for r in raw(os.path.join(NAMED, "pairs.jsonl"))]
    assert [r["prompt"] for r in ev] == [r["prompt"] for r in raw(os.path.join(NAMED, "pairs_eval.jsonl"))]
    assert all(set(r) == PAIR_KEYS for r in train + ev)
    cat = [r for r in train if r["prompt"] == "Why is my cat staring at me?"]
    assert cat[0]["winners"] == {"funny": 0, "polite": -1, "brief": -1}
    assert sum(w == -1 for r in train for w in r["winners"].values()) >= 5
    italy = [r for r in ev if r["prompt"] == "What is the capital of Italy?"]
    assert italy[0]["winners"] == {"funny": 1, "polite": -1, "brief": 0}
    assert src.prompts("eval") == [r["prompt"] for r in ev]
    assert src.sft_records() == [{"prompt": r["prompt"], "response": r["response"]}
                                 for r in raw(os.path.join(NAMED, "sft.jsonl"))]
    assert src.sft_records()[0] == {"prompt": "Say hello.", "response": "Hello there! How can I help you today?"}


def test_named_without_eval_and_sft_files_falls_back_to_split_and_skips_ties(tmp_path):
    shutil.copy(os.path.join(NAMED, "pairs.jsonl"), tmp_path / "pairs.jsonl")
    src = data.own_data(str(tmp_path))
    assert src.prompts("eval") == ["Tell me about your weekend.", "What time is it in Tokyo?"]
    sft = src.sft_records()
    assert len(sft) == 8  # 10 training pairs, 2 of them tied on funny (the first objective)
    prompts = {r["prompt"] for r in sft}
    assert "Could you proofread my email?" not in prompts and "How do I say thank you in French?" not in prompts
    assert {"prompt": "Explain gravity in one line.",
            "response": "Gravity is why you can't leave the couch, and also why planets orbit stars."} in sft


# ----------------------------------------------------------------------------------------------
# Bad files: a ValueError naming the file and the line

def test_missing_field_names_file_and_line(tmp_path):
    bad = dict(pair("q3", a=0, b=1))
    del bad["response_1"]
    path = write_lines(tmp_path / "pairs.jsonl", [pair("q1", a=0, b=1), pair("q2", a=1, b=0), bad,
                                                  pair("q4", a=0, b=0)])
    msg = raises_naming(path, 3, lambda: data.own_data(str(tmp_path)))
    assert "response_1" in msg


@pytest.mark.parametrize("w", [2, "1", True, False, None, 0.5, -2])
def test_unknown_winner_id_names_file_line_and_field(tmp_path, w):
    path = write_lines(tmp_path / "pairs.jsonl", [pair("q1", a=0, b=1), pair("q2", a=1, b=w)])
    msg = raises_naming(path, 2, lambda: data.read_pairs(path))
    assert "b_winner" in msg


def test_unknown_pku_winner_id_names_the_release_field(tmp_path):
    rec = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}
    path = write_lines(tmp_path / "pairs.jsonl", [rec, rec, {**rec, "safer_response_id": 2}])
    msg = raises_naming(path, 3, lambda: data.own_data(str(tmp_path)))
    assert "safer_response_id" in msg


def test_objective_missing_on_a_later_line(tmp_path):
    lines = [pair("q1", funny=0, polite=1), pair("q2", funny=1, polite=-1), pair("q3", funny=0, polite=0),
             pair("q4", funny=1)]
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    msg = raises_naming(path, 4, lambda: data.own_data(str(tmp_path)))
    assert "polite_winner" in msg


def test_bad_eval_and_sft_files_name_their_own_path_and_line(tmp_path):
    write_lines(tmp_path / "pairs.jsonl", [pair(f"q{i}", a=0, b=1) for i in range(3)])
    ev = write_lines(tmp_path / "pairs_eval.jsonl", [pair("e1", a=0, b=1), pair("e2", a=0)])
    raises_naming(ev, 2, lambda: data.own_data(str(tmp_path)))
    write_lines(tmp_path / "pairs_eval.jsonl", [pair("e1", a=0, b=1)])
    sft = write_lines(tmp_path / "sft.jsonl", [{"prompt": "s", "response": "r"}, {"prompt": "s"}])
    src = data.own_data(str(tmp_path))
    msg = raises_naming(sft, 2, src.sft_records)
    assert "response" in msg


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    raises_naming(path, None, lambda: data.own_data(str(tmp_path)))


def test_invalid_json(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [pair("q1", a=0, b=1), '{"prompt": "q2", "response_0": "a",',
                                                  pair("q3", a=0, b=1)])
    raises_naming(path, 2, lambda: data.own_data(str(tmp_path)))


def test_not_an_object(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [pair("q1", a=0, b=1), "[1, 2, 3]"])
    raises_naming(path, 2, lambda: data.own_data(str(tmp_path)))


def test_text_that_is_not_a_string(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [pair("q1", a=0, b=1), {**pair("q2", a=0, b=1), "response_0": 42}])
    raises_naming(path, 2, lambda: data.own_data(str(tmp_path)))


@pytest.mark.parametrize("winners", [{"a": 0}, {}])
def test_fewer_than_two_objectives(tmp_path, winners):
    prompts = [f"q{i}" for i in range(40)]  # both splits non-empty: only the objectives are wrong
    assert any(map(held_out, prompts)) and not all(map(held_out, prompts))
    path = write_lines(tmp_path / "pairs.jsonl", [pair(p, **winners) for p in prompts])
    msg = raises_naming(path, None, lambda: data.own_data(str(tmp_path)))
    assert "objective" in msg


def test_missing_pairs_file(tmp_path):
    write_lines(tmp_path / "sft.jsonl", [{"prompt": "s", "response": "r"}])
    raises_naming(tmp_path / "pairs.jsonl", None, lambda: data.own_data(str(tmp_path)))


def test_no_eval_prompt_left_after_the_default_split(tmp_path):
    prompt = next(f"q{i}" for i in range(100) if not held_out(f"q{i}"))
    path = write_lines(tmp_path / "pairs.jsonl", [pair(prompt, a=0, b=1)] * 3)
    msg = raises_naming(path, None, lambda: data.own_data(str(tmp_path)))
    assert "eval" in msg


# ----------------------------------------------------------------------------------------------
# Digest

def test_digest_changes_with_any_file_and_only_then(tmp_path):
    shutil.copytree(NAMED, tmp_path / "d")
    d = str(tmp_path / "d")
    first = data.own_data(d).digest()
    assert data.own_data(d).digest() == first and len(first) == 16
    assert data.own_data(NAMED).digest() == first  # the same bytes elsewhere
    assert data.own_data(PKU).digest() != first
    for name in ("pairs", "pairs_eval", "sft"):
        path = os.path.join(d, name + ".jsonl")
        with open(path, "rb") as f:
            orig = f.read()
        changed = orig.replace(b'"funny_winner": 1', b'"funny_winner": 0', 1) if name != "sft" else \
            orig.replace(b"Hello there", b"Hi there")
        assert changed != orig
        with open(path, "wb") as f:
            f.write(changed)
        assert data.own_data(d).digest() != first, name
        # SFT: its file
        assert (data.own_data(d).digest("sft") != data.own_data(NAMED).digest("sft")) == (name == "sft")
        with open(path, "wb") as f:
            f.write(orig)
        assert data.own_data(d).digest() == first, name
    os.remove(os.path.join(d, "sft.jsonl"))  # the default SFT set is other data, read from the pairs
    assert data.own_data(d).digest() != first and data.own_data(d).digest("sft") == data.own_data(d).digest()


# ----------------------------------------------------------------------------------------------
# Tokenizers

UNSEEN = "Quantum physics, résumé tips & espresso: 3.14 × 2024 =  6358.96 (naïve café) \u2014 ok?\n"


def test_gpt2_all_round_trips_text_the_world_never_uses(gpt2_all):
    assert gpt2_all.vocab_size == 50257 and gpt2_all.eot == 50256
    ids = gpt2_all.encode(UNSEEN)
    assert all(0 <= i < 50257 for i in ids) and 50256 not in ids
    assert gpt2_all.decode(ids) == UNSEEN
    for rec in raw(os.path.join(PKU, "pairs.jsonl")):
        for text in (gpt2_all.chat(rec["prompt"]) + " " + rec["response_0"], rec["response_1"]):
            assert gpt2_all.decode(gpt2_all.encode(text)) == text


def test_world_tokenizer_rejects_unseen_words(world_tok):
    assert world_tok.vocab_size < 1000
    for text in (" quantum", world_tok.chat("How do I bake quantum bread?")):
        with pytest.raises(ValueError, match="quantum"):
            world_tok.encode(text)
    text = world_tok.chat("How do I bake bread?") + world.Response(steps=tuple(world.TASKS[0][1])).text()
    assert world_tok.decode(world_tok.encode(text)) == text


def test_chat_template(gpt2_all, world_tok):
    for tok in (gpt2_all, world_tok):
        assert tok.chat("How do I bake bread?") == "User: How do I bake bread?\nAssistant:"
    assert gpt2_all.chat("What is photosynthesis?") == "User: What is photosynthesis?\nAssistant:"


# ----------------------------------------------------------------------------------------------
# The embedded world as a source

@pytest.fixture(scope="module")
def world_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    return d, data.World(str(d), seed=0, n_sft=50, n_pairs=100, label_temperature=0.1)


def test_world_writes_its_files_once_and_reads_them(world_src):
    d, src = world_src
    assert sorted(os.listdir(d)) == sorted(os.path.basename(p) for p in src.paths.values())
    assert all(os.path.dirname(p) == str(d) for p in src.paths.values())
    assert src.objectives == list(world.OBJECTIVES)
    assert len(src.sft_records()) == 50 and len(src.pair_records("train")) == 100
    assert all(set(r) == PAIR_KEYS and set(r["winners"]) == set(world.OBJECTIVES) for r in src.pair_records("train"))
    digest = src.digest()
    again = data.World(str(d), seed=0, n_sft=50, n_pairs=100, label_temperature=0.1)
    assert again.digest() == digest and again.pair_records("train") == src.pair_records("train")
    other = data.World(str(d), seed=1, n_sft=50, n_pairs=100, label_temperature=0.1)
    assert other.digest() != digest


def test_world_eval_pairs_are_on_the_held_out_prompts(world_src):
    _, src = world_src
    held = {p for _, p in world.prompts("eval", 0)}
    ev, tr = {r["prompt"] for r in src.pair_records("eval")}, {r["prompt"] for r in src.pair_records("train")}
    assert ev == held and ev <= set(src.prompts("eval"))
    assert set(src.prompts("eval")) == held and set(src.prompts("train")) == {p for _, p in world.prompts("train", 0)}
    assert not tr & held and tr <= set(src.prompts("train"))
    assert not {r["prompt"] for r in src.sft_records()} & held


def test_world_judge(world_src):
    _, src = world_src
    t = 0  # bake bread (benign)
    prompt = next(p for task, p in world.prompts("eval", 0) if task == t)
    full = world.Response(steps=tuple(world.TASKS[t][1])).text()
    refusal = world.Response(refusal=True).text()
    s = src.judge([prompt] * 3, [full, refusal, None], ["helpful", "harmless"])
    assert tuple(s.shape) == (3, 2)
    assert s[2].tolist() == [world.MALFORMED] * 2
    assert s[0, 0] > s[1, 0] and s[0, 0].item() == pytest.approx(1.0) and s[1, 0].item() == pytest.approx(0.0)
    assert s[0, 1].item() == pytest.approx(world.judge(t, world.parse(full), "harmless"))
    # columns follow the objectives asked for
    s2 = src.judge([prompt], [full], ["concise", "helpful"])
    assert s2[0].tolist() == pytest.approx([world.judge(t, world.parse(full), "concise"), 1.0])
    assert data.World.judge([prompt], [" not a response"], ["helpful"])[0, 0].item() == world.MALFORMED


def test_a_pairs_file_is_parsed_once_per_source(monkeypatch):
    calls = []
    read = data.read_pairs
    monkeypatch.setattr(data, "read_pairs", lambda *a, **k: calls.append(a[0]) or read(*a, **k))
    src = data.own_data(PKU)
    src.prompts("train"), src.prompts("eval"), src.sft_records(), src.pair_records("train")
    assert len(calls) == 1
