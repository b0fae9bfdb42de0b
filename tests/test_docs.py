"""The documentation says what is true of the tree and the code.

* every repository path named in README.md and docs/*.md — in inline code (`csrc/...`,
  `fusedgrad/...`, `tests/...`, `docs/...`, `benchmarks/...`, `scripts/...`, root files such as
  `setup.py`; globs and `{h,cpp}` alternatives expanded; `tests/x.py::test_y` also names a test
  that must exist) or as a link target — exists, and every `#anchor` link names a heading;
* the figures the README states about the tree are the code's: the activation lists equal
  fusedgrad.ACTIVATIONS, and no count of C++ files is typed by hand;
* docs/api.md documents every public name with the signature the code has;
* the README's quick start and usage examples run (scripts/check_install.sh runs the same blocks
  from an installed wheel).
"""
import glob
import inspect
import os
import re

import pytest
import torch

import fusedgrad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

PREFIXES = ("csrc/", "fusedgrad/", "tests/", "docs/", "benchmarks/", "scripts/", ".ci/")
ROOT_FILES = ("LICENSE", "Makefile", "setup.py", "pyproject.toml", "MANIFEST.in", "requirements-dev.txt",
              "README.md")

# Paths the docs may name before they exist: the depth work (FusedMLP(hidden_layers=...)) is adding
# them in parallel. A listed path is exempt only while it is missing — once it exists it is an
# ordinary path like any other. Remove an entry when its path has landed.
PENDING = {
    "csrc/engine/",            # the any-depth MLP engine (folder)
    "fusedgrad/bench/deep.py",  # the deep-network benchmark suite
    "tests/test_deep.py",       # the deep-network tests
}


# Build outputs the docs name (not in git; they exist once the extension is built, as the tests need).
BUILT = {"fusedgrad/_C": "fusedgrad/_C*"}  # the compiled extension, fusedgrad/_C.<abi tag>.so


def read(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def prose(text):
    """The text without fenced code blocks (commands and code, not references)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def expand_braces(path):
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in expand_braces(path[:m.start()] + alt + path[m.end():])]


def named_paths(doc):
    """(path as written, path relative to the root, test name or None) named by `doc`."""
    text = prose(read(doc))
    found = []
    for code in re.findall(r"`([^`\n]+)`", text):
        word = code.split()[0].rstrip(":,;.)")
        if not (word.startswith(PREFIXES) or word in ROOT_FILES):
            continue
        path, _, test = word.partition("::")
        found.append((word, path, test or None))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(os.path.dirname(doc), target.split("#")[0]))
        found.append((target, path, None))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_path_exists(doc):
    missing = []
    for written, path, test in named_paths(doc):
        if path in PENDING and not os.path.exists(os.path.join(ROOT, path)):
            continue
        for p in expand_braces(BUILT.get(path, path)):
            if any(c in p for c in "*?["):
                ok = bool(glob.glob(os.path.join(ROOT, p), recursive=True))
            else:
                ok = os.path.exists(os.path.join(ROOT, p))
            if ok and test:
                ok = re.search(rf"^\s*def {re.escape(test.split('[')[0])}\(", read(p), re.M) is not None
            if not ok:
                missing.append(written)
    assert not missing, f"{doc} names paths that do not exist: {sorted(set(missing))}"


def test_path_extraction_sees_what_it_should():
    """The checker itself: it finds the paths, globs, alternatives and test names the docs use."""
    readme = {w for w, _, _ in named_paths("README.md")}
    assert {"csrc/common/activation.h", "tests/test_no_double_update.py", "docs/api.md",
            "csrc/**/*.cpp"} <= readme
    assert expand_braces("csrc/common/options.{h,cpp}") == ["csrc/common/options.h", "csrc/common/options.cpp"]
    assert any(t for _, _, t in named_paths("README.md")), "no tests/x.py::test_y reference found"


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc):
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(read(doc)), re.M):
        s = slug(heading)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_every_anchor_link_names_a_heading(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]*#[^)\s]+)\)", prose(read(doc))):
        if re.match(r"^[a-z]+:", target):
            continue
        file, anchor = target.split("#", 1)
        other = os.path.normpath(os.path.join(os.path.dirname(doc), file)) if file else doc
        if anchor not in anchors(other):
            broken.append(target)
    assert not broken, f"{doc} links to headings that do not exist: {broken}"


# --------------------------------------------------------------------------- figures about the tree

def test_activation_lists_are_the_codes():
    expected = list(fusedgrad.ACTIVATIONS)
    readme = read("README.md")
    bullet = re.search(r"^- `activation` is one of `fusedgrad\.ACTIVATIONS`:(.*?)(?=^- |\n\n)", readme, re.S | re.M)
    assert bullet, "README: the bullet listing the activations is gone"
    assert re.findall(r'`"(\w+)"`', bullet.group(1)) == expected
    table = re.search(r"activation table\*\*, `csrc/common/activation\.h`: one struct per\s+activation \((.*?)"
                      r"`fusedgrad\.ACTIVATIONS`\)", readme, re.S)
    assert table, "README: the math section's list of the activation table is gone"
    assert [n for n in re.findall(r"`(\w+)`", table.group(1)) if n != "F"] == expected
    api = re.search(r"^### `fusedgrad\.ACTIVATIONS`(.*?)^##", read("docs/api.md"), re.S | re.M)
    assert api and re.findall(r'`"(\w+)"`', api.group(1)) == expected


def test_no_typed_count_of_source_files():
    """A count typed by hand drifts (the README said 14 C++ files when there were 16): the README
    names the set instead, which is what setup.py compiles (tests/test_install.py)."""
    readme = read("README.md")
    assert not re.search(r"\b\d+ (C\+\+|source|\.cpp) files\b", readme)
    assert "every `csrc/**/*.cpp` outside `csrc/cuda/`" in readme
    assert glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)


def test_deep_networks_section_is_there():
    assert re.search(r"^## Deep networks$", read("README.md"), re.M)


# --------------------------------------------------------------------------- docs/api.md

def documented_signatures():
    """{qualified name: signature text} of docs/api.md's '### `name(args)`' headings."""
    return dict(re.findall(r"^### `((?:fusedgrad\.)?\w+(?:\.\w+)?)\((.*)\)`$", read("docs/api.md"), re.M))


def code_object(name):
    parts = name.split(".")
    obj = fusedgrad if parts[0] == "fusedgrad" else getattr(fusedgrad, parts[0])
    for part in parts[1:]:
        obj = getattr(obj, part)
    return obj


def parameters_of(signature_text):
    namespace = {}
    exec(f"def f({signature_text}): pass", namespace)  # the documented text, parsed as Python
    return [(p.name, p.kind, p.default) for p in inspect.signature(namespace["f"]).parameters.values()]


def test_api_reference_documents_every_public_name():
    text = read("docs/api.md")
    missing = [n for n in fusedgrad.__all__ if not re.search(rf"^### `fusedgrad\.{n}\b", text, re.M)]
    assert not missing, f"docs/api.md lacks {missing}"
    documented = documented_signatures()
    for cls in (fusedgrad.FusedMLP, fusedgrad.FusedMLPEnsemble, fusedgrad.Trainer):
        methods = [n for n, v in vars(cls).items() if not n.startswith("_") and n != "extra_repr"
                   and (inspect.isfunction(v) or isinstance(v, (classmethod, staticmethod)))]
        undocumented = [m for m in methods if f"{cls.__name__}.{m}" not in documented]
        assert not undocumented, f"docs/api.md lacks {cls.__name__}.{undocumented}"


@pytest.mark.parametrize("name", sorted(documented_signatures()))
def test_api_reference_signatures_are_the_codes(name):
    obj = code_object(name)
    params = list(inspect.signature(obj).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    actual = [(p.name, p.kind, p.default) for p in params]
    assert parameters_of(documented_signatures()[name]) == actual, \
        f"docs/api.md: {name}{inspect.signature(obj)} in the code"


# --------------------------------------------------------------------------- examples run

def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_quick_start_and_usage_examples_run():
    readme = read("README.md")
    usage = readme[readme.index("\n## Quick start"):readme.index("\n### Verify, demo, bench")]
    blocks = python_blocks(usage)
    assert len(blocks) >= 6
    torch.manual_seed(0)
    namespace = {}
    exec(compile("\n".join(blocks), "README.md (quick start and usage)", "exec"), namespace)
    assert namespace["history"].shape == (201, 64)


def test_ecosystem_opcheck_example_runs():
    blocks = [b for b in python_blocks(read("docs/ecosystem.md")) if "opcheck(" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/ecosystem.md (opcheck)", "exec"), {})


def test_readme_opcheck_and_from_module_examples_run():
    readme = read("README.md")
    blocks = [b for b in python_blocks(readme) if "opcheck(" in b or "from_module(model)" in b]
    assert len(blocks) == 2
    for block in blocks:
        exec(compile("import torch, fusedgrad\n" + block, "README.md (ecosystem)", "exec"), {})
