"""The documentation cannot go stale: docs/api.md and the generated blocks (folder map, codec table)
equal what scripts/gen_api_docs.py makes from the code now; every public name, argument and stats()
key is documented; README's test command is what CI runs; links between the pages resolve."""
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_api_docs", os.path.join(ROOT, "scripts", "gen_api_docs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()

# Gaps in the library's docstrings when this test was written, as undocumented() names them
# ("Name" without a docstring, "Name:argument", "Name.method:argument", "Name.stats:key").
# Fixing a docstring makes its entry fail test_known_gaps_are_still_gaps: delete the entry then.
# Do not add entries: document the new name, argument or key instead.
KNOWN_GAPS: set = set()


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_api_md_is_current():
    assert _read("docs", "api.md") == gen.api_markdown(), \
        "docs/api.md is stale: run python scripts/gen_api_docs.py"


def test_generated_blocks_are_current():
    pages = gen.pages_with_blocks()
    names = {m.group(2) for p in pages for m in gen.BLOCK.finditer(_read(p))}
    assert {"folder-map", "codec-table"} <= names, f"generated blocks found: {names}"
    for p in pages:
        assert _read(p) == gen.render_blocks(_read(p)), \
            f"{os.path.relpath(p, ROOT)} has a stale generated block: run python scripts/gen_api_docs.py"


def test_folder_map_lists_every_module():
    fmap = gen.folder_map()
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "ddp_qhooks")):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for f in filenames:
            if f.endswith(".py") and f != "__init__.py":
                assert re.search(rf"^\s+{re.escape(f)}\s", fmap, re.M), f"{f} missing from the folder map"


def test_every_public_name_argument_and_stats_key_is_documented():
    new = [g for g in gen.undocumented() if g not in KNOWN_GAPS]
    assert not new, ("undocumented (write it into the docstring; entries are Name, Name:argument, "
                     f"Name.method:argument or Name.stats:key): {new}")


def test_known_gaps_are_still_gaps():
    fixed = KNOWN_GAPS - set(gen.undocumented())
    assert not fixed, f"documented now, remove from KNOWN_GAPS in tests/test_docs.py: {sorted(fixed)}"


def test_the_checker_catches_what_it_claims(monkeypatch):
    """An argument missing from a docstring, a missing docstring and an undocumented stats() key are
    all reported (so the test above is not vacuous)."""
    import ddp_qhooks

    def documented(alpha, beta=1):
        """Uses ``alpha`` only."""

    def bare(x):
        pass

    monkeypatch.setattr(ddp_qhooks, "documented", documented, raising=False)
    monkeypatch.setattr(ddp_qhooks, "bare", bare, raising=False)
    monkeypatch.setattr(ddp_qhooks, "__all__", list(ddp_qhooks.__all__) + ["documented", "bare"])
    real_stats = ddp_qhooks.QuantizedHookState.stats
    monkeypatch.setattr(ddp_qhooks.QuantizedHookState, "stats",
                        lambda self: {**real_stats(self), "brand_new_key": 0})
    monkeypatch.setattr(ddp_qhooks.QuantizedHookState.stats, "__doc__", real_stats.__doc__, raising=False)
    gaps = gen.undocumented()
    assert "documented:beta" in gaps and "documented:alpha" not in gaps
    assert "bare" in gaps and "bare:x" in gaps
    assert "QuantizedHookState.stats:brand_new_key" in gaps


def test_stats_keys_are_listed_in_api_md():
    api = _read("docs", "api.md")
    for key in gen.hook_stats_keys() + list(gen.local_sgd_stats_keys()):
        assert f"| `{key}` |" in api


def test_readme_test_command_is_what_ci_runs():
    ci = _read(".ci", "run")
    m = re.search(r"^# README's test command:\n(.+)$", ci, re.M)
    assert m, ".ci/run lost its '# README's test command:' line"
    command = m.group(1).strip()
    readme = _read("README.md")
    block = re.search(r"# tests: exactly what CI \(.ci/run\) runs after installing\n(.*?)```", readme, re.S)
    assert block, "README lost its tests block"
    assert command in block.group(1).splitlines(), f"README's test command must be {command!r}"
    assert 'pip install -e ".[test]"' in block.group(1)
    extras = re.search(r"^test = \[(.*?)\]", _read("pyproject.toml"), re.M).group(1)
    assert "pytest" in extras and "hypothesis" in extras


def test_readme_stays_short_and_about_the_product():
    readme = _read("README.md")
    assert len(readme.splitlines()) <= 300
    assert "python -m ddp_qhooks.bench" in readme
    for pattern in (r"this (round|session)", r"was lent", r"runs? [0-9]+ (and|to|–) [0-9]+", r"\brun [0-9]\b"):
        for page in ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))]:
            if page.endswith(".md"):
                assert not re.search(pattern, _read(page), re.I), f"{page} narrates how it was made ({pattern})"


def _anchors(text):
    return set(gen.slugs(re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)))


# pages that another change adds; a link to them may dangle until it lands
PENDING_PAGES = {"docs/results_defaults.md"}


@pytest.mark.parametrize("page", ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")))
def test_links_resolve(page):
    text = _read(page)
    base = os.path.dirname(os.path.join(ROOT, page))
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, frag = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, page)
        rel = os.path.relpath(full, ROOT).replace(os.sep, "/")
        if rel in PENDING_PAGES and not os.path.exists(full):
            continue
        assert os.path.exists(full), f"{page}: link to missing {target}"
        if frag and full.endswith(".md"):
            with open(full, encoding="utf-8") as f:
                assert frag in _anchors(f.read()), f"{page}: link to missing anchor {target}"
