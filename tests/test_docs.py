"""docs/MODEL.md stays true to the repository: every anchor cited into it exists, every test and every function of
ours it names exists, and no file cites the private facts document the code was first written from."""

import ast
import re
from pathlib import Path

import pytest

from .conftest import ROOT

MODEL_MD = ROOT / "docs" / "MODEL.md"
SRC = ROOT / "src" / "qwenaudio"
# The repository's own code and prose; scripts/ holds files without a suffix.
SCANNED = ["src", "tests", "docs", "benchmarks", "tools", "examples", "scripts", "README.md", "BENCHMARKS.md",
           "weights/README.md"]
TEXT_SUFFIXES = {".py", ".md", ""}
PRIVATE_DOCUMENT = re.compile(r"\bS[P]EC\b")  # its name as a word, spelled so that this file does not match
# Files MODEL.md cites from the official code and from transformers, which are not in this repository.
OUTSIDE = {"audio.py", "modeling_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py",
           "configuration_qwen.py", "generation/utils.py"}


def text_files():
    for name in SCANNED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            parts = file.relative_to(ROOT).parts
            if file.is_file() and file.suffix in TEXT_SUFFIXES and not any(
                    p == "__pycache__" or p.endswith(".egg-info") or p.startswith(".") for p in parts):
                yield file


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lowercase, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"#{1,6} (.+)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def defined_names(file: Path) -> set[str]:
    """Module-level functions, classes and assigned names, and `Class.member` for what each class defines."""
    names = set()

    def assigned(node) -> list[str]:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t.id for t in targets if isinstance(t, ast.Name)]

    for node in ast.parse(file.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names.update(assigned(node))
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{member.name}")
                elif isinstance(member, (ast.Assign, ast.AnnAssign)):
                    names.update(f"{node.name}.{n}" for n in assigned(member))
    return names


def test_nothing_cites_the_private_facts_document():
    cited = [f"{file.relative_to(ROOT)}:{number}: {line.strip()}"
             for file in text_files()
             for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1)
             if PRIVATE_DOCUMENT.search(line)]
    assert not cited, "explain it in our words or cite docs/MODEL.md instead:\n" + "\n".join(cited)


def test_cited_anchors_exist():
    """Links into MODEL.md (its path, `#`, a heading's anchor) anywhere in the repository, and links inside it."""
    text = MODEL_MD.read_text(encoding="utf-8")
    known = anchors(text)
    cited = [(str(file.relative_to(ROOT)), a) for file in text_files()
             for a in re.findall(r"docs/MODEL\.md#([\w-]+)", file.read_text(encoding="utf-8"))]
    cited += [("docs/MODEL.md", a) for a in re.findall(r"\]\(#([\w-]+)\)", text)]
    assert len(cited) > 50  # the pattern finds the citations
    missing = [f"{where}: #{a}" for where, a in cited if a not in known]
    assert not missing, "no such heading in docs/MODEL.md:\n" + "\n".join(missing)


def test_tests_named_in_model_md_exist():
    named = re.findall(r"`tests/(test_\w+\.py)::(test_\w+)`", MODEL_MD.read_text(encoding="utf-8"))
    assert len(named) > 100
    missing = [f"tests/{file}::{name}" for file, name in sorted(set(named))
               if not (ROOT / "tests" / file).is_file() or name not in defined_names(ROOT / "tests" / file)]
    assert not missing, "docs/MODEL.md names tests that do not exist:\n" + "\n".join(missing)


def test_code_named_in_model_md_exists():
    """`core/decoder.py: Decoder.forward` names our code when the file is ours; otherwise it must be an official file."""
    named = re.findall(r"`([\w/]+\.py): ([\w.]+)`", MODEL_MD.read_text(encoding="utf-8"))
    where = {file: path for file, _ in named for path in (SRC / file, ROOT / file) if path.is_file()}
    ours = [(file, name) for file, name in named if file in where]
    assert len(ours) > 50
    unknown = sorted({file for file, _ in named if file not in where and file not in OUTSIDE
                      and not file.startswith("eval_audio/")})
    assert not unknown, f"docs/MODEL.md cites files that are neither ours nor official: {unknown}"
    missing = [f"{file}: {name}" for file, name in sorted(set(ours)) if name not in defined_names(where[file])]
    assert not missing, "docs/MODEL.md names code that does not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("heading, anchor", [
    ("## Front end", "front-end"),
    ("### LogN scaling", "logn-scaling"),
    ("# Qwen-Audio, formula by formula", "qwen-audio-formula-by-formula"),
    ("### `KV` cache (ours)", "kv-cache-ours"),
])
def test_anchors_follow_github(heading, anchor):
    assert anchors(f"{heading}\n```\n# not a heading\n```\n") == {anchor}
    assert anchors(f"{heading}\n{heading}\n") == {anchor, f"{anchor}-1"}
