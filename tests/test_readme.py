"""README.md and RESULTS.md say what the code is and where it is: these tests keep them true.

- every `file.py:name` they mention exists: the file, and `name` as a top-level def, class or
  assigned name in it (`file.py:Class.method`: the method inside the class), found with ast;
- every Markdown table has as many cells in each row as in its header, counted as GitHub counts
  them (a `|` separates cells even inside backticks, unless written `\\|`);
- every relative link or image points to a file of the repository, and a link's #anchor to a heading;
- no file of the repository cites a document that is not in it; the README stays a front page.
Fenced code blocks are left out of the first three.
"""
import ast
import os
import re

import pytest

from conftest import ROOT

DOCS = ["README.md", "RESULTS.md"]


def prose_lines(text):
    """(line number, line) of README outside ``` fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


@pytest.fixture(scope="module", params=DOCS)
def doc(request):
    with open(os.path.join(ROOT, request.param)) as f:
        return request.param, prose_lines(f.read())


# ---------------------------------------------------------------------------------------------- names

REF = re.compile(r"(?<![\w/.-])([\w/-]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)")


def defined_names(path):
    """{top-level name: node} of a Python file: defs, classes and assigned names."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names[n.id] = node
    return names


def missing(file, name):
    """Why `file:name` does not exist, or None when it does."""
    path = os.path.join(ROOT, file)
    if not os.path.isfile(path):
        return f"{file} does not exist"
    top, _, member = name.partition(".")
    names = defined_names(path)
    if top not in names:
        return f"{file} defines no top-level {top}"
    if member:
        node = names[top]
        if not isinstance(node, ast.ClassDef):
            return f"{file}: {top} is not a class"
        if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == member for n in node.body):
            return f"{file}: class {top} has no method {member}"
    return None


def test_every_file_and_name_the_docs_mention_exists(doc):
    name, lines = doc
    refs = sorted({(m.group(1), m.group(2), i) for i, line in lines for m in REF.finditer(line)})
    if name == "README.md":
        assert len({(f, n) for f, n, _ in refs}) >= 20, \
            "the paper-to-code table names the code: expected 20 file.py:name"
    errors = [f"{name}:{i}: {f}:{n}: {why}" for f, n, i in refs if (why := missing(f, n))]
    assert not errors, "\n".join(errors)


def test_reference_checker_catches_what_is_missing():
    assert missing("svd_lora.py", "SVDLoRALinear") is None
    assert missing("svd_lora.py", "SVDLoRALinear.forward") is None
    assert missing("svd_lora.py", "GPT_MATRICES") is None
    assert "no top-level" in missing("svd_lora.py", "not_a_function")
    assert "no method" in missing("svd_lora.py", "SVDLoRALinear.not_a_method")
    assert "not a class" in missing("svd_lora.py", "merge.inner")
    assert "does not exist" in missing("no_such_file.py", "f")
    assert [m.groups() for m in REF.finditer("see `rlhf.py:gae` and model.py:GPT.generate; train.py: flags")] == \
        [("rlhf.py", "gae"), ("model.py", "GPT.generate")]


# ---------------------------------------------------------------------------------------------- tables

DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def cells(row):
    """The cells of a table row as GitHub splits them: at every `|` not escaped as `\\|`, backticks or not."""
    parts = re.split(r"(?<!\\)\|", row.strip())
    if parts and parts[0].strip() == "":
        parts = parts[1:]
    if parts and parts[-1].strip() == "":
        parts = parts[:-1]
    return parts


def tables(lines):
    """[(first line number, [(line number, row)])]: runs of consecutive lines starting with | whose
    second line is a delimiter row."""
    out, run = [], []
    for i, line in lines + [(None, "")]:
        if line.lstrip().startswith("|"):
            run.append((i, line))
            continue
        if len(run) >= 2 and DELIMITER.match(run[1][1].strip()):
            out.append(run)
        run = []
    return out


def ragged_rows(table):
    n = len(cells(table[0][1]))
    return [(i, len(cells(row)), n) for i, row in table if len(cells(row)) != n]


def test_every_table_has_the_same_number_of_cells_in_every_row(doc):
    name, lines = doc
    found = tables(lines)
    assert found, f"no Markdown table found in {name}"
    errors = [f"{name}:{i}: {got} cells, the header has {n}" for t in found for i, got, n in ragged_rows(t)]
    assert not errors, "\n".join(errors)


def test_table_checker_counts_cells_as_github_does():
    assert len(cells("| a | `b` | c |")) == 3
    assert len(cells("| `ls\\|tche` | b |")) == 2  # an escaped pipe stays in its cell
    assert len(cells("| `ls|tche` | b |")) == 3  # an unescaped one splits it, inside backticks too
    table = tables(list(enumerate(["text", "| a | b |", "|---|---|---|", "| 1 | 2 |", "more text"], 1)))
    assert len(table) == 1 and ragged_rows(table[0]) == [(3, 3, 2)]


# ---------------------------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img[^>]*\bsrc=\"([^\"]+)\"")


def relative_targets(lines, anchors=False):
    """(line number, path) of every link or image that is not a URL or an anchor within the page
    (with anchors: (line number, path or "" for the page itself, anchor) of every link with a #anchor)."""
    out = []
    for i, line in lines:
        for m in LINK.finditer(line):
            target = m.group(1) or m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue
            path, _, anchor = target.partition("#")
            if anchors and anchor:
                out.append((i, path, anchor))
            elif not anchors and path:
                out.append((i, path.split("?")[0]))
    return out


def heading_anchors(path):
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces as -."""
    with open(path) as f:
        heads = [line.lstrip("#").strip() for _, line in prose_lines(f.read()) if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_points_to_a_file_and_heading(doc):
    name, lines = doc
    targets = relative_targets(lines)
    assert targets or name != "README.md", "no relative link found in README.md"
    errors = [f"{name}:{i}: {t} does not exist" for i, t in targets if not os.path.exists(os.path.join(ROOT, t))]
    for i, path, anchor in relative_targets(lines, anchors=True):
        file = os.path.join(ROOT, path or name)
        if file.endswith(".md") and anchor not in heading_anchors(file):
            errors.append(f"{name}:{i}: {path or name} has no heading #{anchor}")
    assert not errors, "\n".join(errors)


def test_the_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 220, "the front page is about 200 lines: results go to RESULTS.md"


def test_no_file_cites_a_document_outside_the_repository():
    """Code, notebooks and docs may name only documents that exist in the repository."""
    cited = re.compile(r"\b(?:SPEC|STYLE)\b(?: ?§| section|\.md)|\.\./shared|\b[\w-]+\.md\b")
    errors = []
    for folder, _, files in os.walk(ROOT):
        if any(part.startswith(".") or part in ("out", "__pycache__")
               for part in os.path.relpath(folder, ROOT).split(os.sep)):
            continue
        for f in files:
            if f.endswith((".py", ".md", ".ipynb")):
                with open(os.path.join(folder, f), encoding="utf-8") as fh:
                    for m in cited.finditer(fh.read()):
                        doc = m.group(0)
                        if not (doc.endswith(".md") and os.path.exists(os.path.join(ROOT, doc))):
                            errors.append(f"{os.path.relpath(os.path.join(folder, f), ROOT)}: cites {doc}")
    assert not errors, "\n".join(sorted(set(errors)))


def test_link_checker_finds_links_and_images():
    lines = list(enumerate(["![front](assets/pareto.png) and [the world](notebooks/the_world.ipynb#judges)",
                            "[paper](https://arxiv.org/abs/2402.02030), [below](#speed)"], 1))
    assert relative_targets(lines) == [(1, "assets/pareto.png"), (1, "notebooks/the_world.ipynb")]
    assert relative_targets(lines, anchors=True) == [(1, "notebooks/the_world.ipynb", "judges"), (2, "", "speed")]
