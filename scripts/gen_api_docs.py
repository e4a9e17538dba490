#!/usr/bin/env python
"""Generate the parts of docs/ that are derived from the code, so that they cannot go stale.

* ``docs/api.md``: the API reference, from ``ddp_qhooks.__all__`` by introspection: every public
  name with its signature and docstring, the public methods of the public classes, and the keys
  that ``stats()`` returns (found by calling it, with their meaning parsed from its docstring).
* generated blocks inside other pages, between ``<!-- BEGIN GENERATED name -->`` and
  ``<!-- END GENERATED name -->``: ``folder-map`` (the repository's folders and modules with the
  first sentence of each module's docstring) and ``codec-table`` (``ddp_qhooks.codecs.available_markdown()``).

Nothing here names a library module path: everything is found from ``ddp_qhooks.__all__``, the
classes' members and the files on disk, so it keeps working when modules move.

    python scripts/gen_api_docs.py           # rewrite docs/api.md and the generated blocks
    python scripts/gen_api_docs.py --check   # exit 1 (and say which) if any of them is stale

``tests/test_docs.py`` runs the same functions in memory and also checks that every public name,
argument and ``stats()`` key is documented (see ``undocumented()`` below).
"""
from __future__ import annotations

import ast
import functools
import inspect
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
DOCS = os.path.join(ROOT, "docs")
API_MD = os.path.join(DOCS, "api.md")
SCRIPT = "scripts/gen_api_docs.py"
BLOCK = re.compile(r"(<!-- BEGIN GENERATED ([\w-]+)[^>]*-->\n)(.*?)(<!-- END GENERATED \2 -->)", re.S)


# ---------------------------------------------------------------- introspection

def public_names():
    """(name, object) for every name of ``ddp_qhooks.__all__``, in its order."""
    import ddp_qhooks
    return [(n, getattr(ddp_qhooks, n)) for n in ddp_qhooks.__all__]


def public_methods(cls):
    """(name, function) for the public methods and properties a class defines or inherits from
    this package (not from ``object``, ``Exception`` or torch)."""
    out = []
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or not owner.__module__.startswith("ddp_qhooks"):
            continue
        attr = vars(owner)[name]
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if inspect.isfunction(attr) or isinstance(attr, property):
            out.append((name, attr))
    return out


def is_exception(obj) -> bool:
    return inspect.isclass(obj) and issubclass(obj, BaseException)


def signature(obj):
    """inspect.Signature of a public callable (a class: its constructor), or None."""
    if is_exception(obj) or isinstance(obj, property):
        return None
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def parameters(obj):
    """Names of the documented-worthy parameters of a callable: no ``self``, no private ``_x``."""
    sig = signature(obj)
    if sig is None:
        return []
    return [p.name for p in sig.parameters.values() if p.name != "self" and not p.name.startswith("_")]


_QUALIFIED = re.compile(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)")


def _short(text: str) -> str:
    """Annotations without module paths (``torch.jit.Future`` -> ``Future``): api.md must not change
    when a class moves to another module."""
    text = text.replace("typing.", "")
    return _QUALIFIED.sub(lambda m: m.group(1), text)


def format_signature(name: str, obj) -> str:
    sig = signature(obj)
    if sig is None:
        return f"{name}(...)"
    params, seen_kwonly = [], False
    for p in sig.parameters.values():
        if p.name == "self" or p.name.startswith("_"):
            continue
        if p.kind is p.KEYWORD_ONLY and not seen_kwonly:
            params.append("*")
        if p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL):
            seen_kwonly = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            ann = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
            text += ": " + _short(ann)
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + repr(p.default)
        params.append(text)
    ret = ""
    if sig.return_annotation is not sig.empty and not inspect.isclass(obj):
        ann = sig.return_annotation
        ret = " -> " + _short(ann if isinstance(ann, str) else inspect.formatannotation(ann))
    one = f"{name}({', '.join(params)}){ret}"
    if len(one) <= 100:
        return one
    return f"{name}(\n" + "".join(f"    {p},\n" for p in params) + f"){ret}"


# ---------------------------------------------------------------- docstrings -> Markdown

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
_ARG_NAME = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*):")
_SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Keys|Yields|Example|Examples):\s*$")


def _inline(text: str) -> str:
    def role(m):
        target = m.group(1).split(".")[-1]
        return f"`{target}()`" if m.group(0).startswith((":func:", ":meth:")) else f"`{target}`"
    text = _ROLE.sub(role, text)
    return text.replace("``", "`")


def docstring_markdown(doc: str | None) -> str:
    """A Google-style docstring as Markdown: ``Args:`` entries become a bullet list, RST roles and
    double backticks become code spans, literal blocks (``::``) become fenced code."""
    if not doc:
        return "*(no docstring)*"
    lines = inspect.cleandoc(doc).split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        m = _SECTION.match(line)
        if m:
            out.append(f"**{m.group(1)}:**\n")
            i += 1
            entries = []
            while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip()):
                if lines[i].strip():
                    indent = len(lines[i]) - len(lines[i].lstrip())
                    if not entries or indent <= entries[-1][0]:
                        entries.append([indent, lines[i].strip()])
                    else:
                        entries[-1][1] += " " + lines[i].strip()
                i += 1
            out += ["* " + _inline(_ARG_NAME.sub(lambda m: f"`{m.group(1)}`:", text, count=1)) for _, text in entries]
            out.append("")
            continue
        if line.rstrip().endswith("::"):
            out.append(_inline(line.rstrip()[:-1].rstrip() + ("" if line.strip() == "::" else ":")))
            i += 1
            block = []
            while i < len(lines) and (lines[i].startswith(" ") or not lines[i].strip()):
                block.append(lines[i])
                i += 1
            out += ["", "```", inspect.cleandoc("\n".join(block)), "```", ""]
            continue
        out.append(_inline(line))
        i += 1
    return "\n".join(out).strip()


# ---------------------------------------------------------------- stats() keys

_KEY_DESC = re.compile(r"``(\w+)``\s*(\((?:[^()]|\([^()]*\))*\))?")


def documented_keys(doc: str) -> dict:
    """``key`` -> its parenthesised description in a docstring ('' when it has none)."""
    out = {}
    for m in _KEY_DESC.finditer(doc or ""):
        desc = (m.group(2) or "")[1:-1]
        if m.group(1) not in out or (desc and not out[m.group(1)]):
            out[m.group(1)] = " ".join(desc.split())
    return out


def hook_stats_keys() -> list:
    """The keys ``QuantizedHookState.stats()`` returns, from a state that was never registered
    (no process group needed)."""
    import ddp_qhooks
    return sorted(ddp_qhooks.QuantizedHookState(codec="stochastic", bits=4).stats())


_LOCAL_SGD_KEYS = """
import json, torch, torch.distributed as dist, ddp_qhooks
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
try:
    print(json.dumps(sorted(ddp_qhooks.LocalSGD(torch.nn.Linear(2, 2), local_steps=1, bits=4).stats())))
finally:
    dist.destroy_process_group()
"""


@functools.lru_cache(maxsize=None)
def local_sgd_stats_keys() -> tuple:
    """The keys ``LocalSGD.stats()`` returns, from a one-rank Gloo group in a child process (so that
    no process group is left in the caller)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _LOCAL_SGD_KEYS], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    if res.returncode != 0:
        raise RuntimeError("LocalSGD.stats() keys: the child process failed:\n" + res.stderr[-3000:])
    return tuple(json.loads(res.stdout.strip().splitlines()[-1]))


def _keys_table(keys, doc, inherited_doc=None) -> list:
    mine, base = documented_keys(doc), documented_keys(inherited_doc or "")
    rows = ["| key | meaning |", "|---|---|"]
    for k in keys:
        desc = mine.get(k) or base.get(k) or ("see the docstring above" if k in mine or k in base else "**undocumented**")
        rows.append(f"| `{k}` | {_inline(desc)} |")
    return rows


# ---------------------------------------------------------------- api.md

def _kind(obj) -> str:
    if inspect.ismodule(obj):
        return "module"
    if is_exception(obj):
        return "exception"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "constant"


def _constant_value(name: str, obj) -> str:
    if name == "__version__":
        return "the package version, a string"
    if isinstance(obj, dict):
        return "a dict whose keys are " + ", ".join(f"`{k}`" for k in obj)
    return f"`{obj!r}`"


def _mentions(name: str) -> list:
    """The public docstrings that mention ``name`` (how a constant, which has no docstring of its
    own, is documented)."""
    import ddp_qhooks
    found = []
    for n, obj in [("ddp_qhooks", ddp_qhooks)] + public_names():
        if n != name and not isinstance(obj, (str, dict, tuple, list)) and re.search(
                rf"``(?:ddp_qhooks\.)?{re.escape(name)}``", inspect.getdoc(obj) or ""):
            found.append(n)
    return found


def api_markdown() -> str:
    import ddp_qhooks
    names = public_names()
    out = ["# API reference", "",
           f"<!-- generated by {SCRIPT} from ddp_qhooks.__all__ and the docstrings; do not edit by hand -->", "",
           "Generated from the docstrings (`python scripts/gen_api_docs.py`; `tests/test_docs.py` fails when",
           "this page is stale or a public name, argument or `stats()` key is undocumented). Everything",
           "below is importable as `ddp_qhooks.<name>`. How to use it: [guide.md](guide.md).", ""]
    anchors = dict(zip([n for n, _ in names], slugs([f"`{n}`" for n, _ in names])))
    out += ["| name | kind | summary |", "|---|---|---|"]
    for n, obj in names:
        summary = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ") \
            if _kind(obj) != "constant" else _constant_value(n, obj)
        out.append(f"| [`{n}`](#{anchors[n]}) | {_kind(obj)} | {_inline(summary)} |")
    out.append("")
    for n, obj in names:
        kind = _kind(obj)
        out += [f"## `{n}`", "", f"*{kind}*", ""]
        if kind == "constant":
            where = _mentions(n)
            out += [_constant_value(n, obj) + "."]
            if where:
                out += ["", "Described in: " + ", ".join(f"[`{w}`](#{anchors[w]})" if w != "ddp_qhooks" else "the package docstring"
                                                        for w in where) + "."]
            out.append("")
            continue
        if kind in ("function", "class"):
            out += ["```python", format_signature(f"ddp_qhooks.{n}", obj), "```", ""]
        out += [docstring_markdown(inspect.getdoc(obj) if kind != "module" else obj.__doc__), ""]
        if kind == "module" and n == "codecs":
            out += ["Registered codecs (`ddp_qhooks.CODECS`): " + ", ".join(f"`{c}`" for c in ddp_qhooks.CODECS)
                    + ". Their options and payload sizes: [codecs.md](codecs.md#codec-table).", ""]
        if kind == "class":
            for m, fn in public_methods(obj):
                out += [f"### `{n}.{m}`", ""]
                if isinstance(fn, property):
                    out += ["*property*", "", docstring_markdown(fn.__doc__), ""]
                    continue
                out += ["```python", format_signature(m, fn), "```", "", docstring_markdown(inspect.getdoc(fn)), ""]
                if m == "stats" and obj is ddp_qhooks.QuantizedHookState:
                    out += ["Keys returned (found by calling `stats()`; meanings from the docstring):", ""]
                    out += _keys_table(hook_stats_keys(), inspect.getdoc(fn)) + [""]
                if m == "stats" and obj is ddp_qhooks.LocalSGD:
                    out += ["Keys returned (found by calling `stats()` on a one-rank group; meanings from this "
                            "docstring or, for the hook's counters, `QuantizedHookState.stats`):", ""]
                    out += _keys_table(local_sgd_stats_keys(), inspect.getdoc(fn), inspect.getdoc(ddp_qhooks.QuantizedHookState.stats)) + [""]
    return "\n".join(out).rstrip() + "\n"


def slugs(headings) -> list:
    """GitHub's anchors of Markdown headings (their text, in page order): lower case, punctuation
    dropped, spaces as dashes; a repeated slug gets -1, -2, ..."""
    out, seen = [], {}
    for h in headings:
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        out.append(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


# ---------------------------------------------------------------- undocumented names, arguments, keys

def _mentioned(name: str, doc: str) -> bool:
    """``name`` is mentioned in a docstring: as a literal (``name``, ``name.x``, ``**name``) or as the
    entry (or one of a comma-separated list of entries) of an ``Args:`` list."""
    n = re.escape(name)
    return bool(re.search(rf"``\*{{0,2}}{n}(?:[.(\[][^`]*)?``", doc)
                or re.search(rf"^\s*(?:\*{{0,2}}\w+\s*,\s*)*\*{{0,2}}{n}\s*[:,]", doc, re.M))


def undocumented() -> list:
    """Every gap, as strings ``Name`` (no docstring), ``Name:argument`` (an argument its docstring
    does not mention; a class's constructor arguments belong in the class docstring) or
    ``Name.stats:key`` (a key ``stats()`` returns that its docstring does not name)."""
    import ddp_qhooks
    gaps = []
    for n, obj in public_names():
        kind = _kind(obj)
        if kind == "constant":
            if not n.startswith("__") and not _mentions(n):
                gaps.append(n)
            continue
        doc = (obj.__doc__ if kind == "module" else inspect.getdoc(obj)) or ""
        if not doc.strip():
            gaps.append(n)
        gaps += [f"{n}:{a}" for a in parameters(obj) if not _mentioned(a, doc)]
        if kind == "class":
            for m, fn in public_methods(obj):
                mdoc = (fn.__doc__ if isinstance(fn, property) else inspect.getdoc(fn)) or ""
                if not mdoc.strip():
                    gaps.append(f"{n}.{m}")
                    continue
                gaps += [f"{n}.{m}:{a}" for a in parameters(fn) if not _mentioned(a, mdoc)]
    hook_doc = inspect.getdoc(ddp_qhooks.QuantizedHookState.stats) or ""
    gaps += [f"QuantizedHookState.stats:{k}" for k in hook_stats_keys() if k not in documented_keys(hook_doc)]
    local_doc = inspect.getdoc(ddp_qhooks.LocalSGD.stats) or ""
    known = {**documented_keys(hook_doc), **documented_keys(local_doc)}
    gaps += [f"LocalSGD.stats:{k}" for k in local_sgd_stats_keys() if k not in known]
    return gaps


# ---------------------------------------------------------------- generated blocks

_TOP = {  # the folders outside the package, one line each (the package itself is listed module by module)
    "examples": "runnable scripts: the quickstart, Fashion-MNIST training with checkpoint/resume, Lightning, Accelerate",
    "slurm": "SLURM job scripts: torchrun.sbatch (one agent per node), srun.sbatch (one task per rank)",
    "scripts": "maintenance scripts (docs generation, the GPU check)",
    "docs": "this documentation",
    "tests": "the test suite (pytest; see reliability.md)",
    "results": "raw outputs of the measurements in results.md",
}


def _first_sentence(text: str, limit: int = 100) -> str:
    text = _ROLE.sub(lambda m: m.group(1), " ".join((text or "").split("\n\n")[0].split()))
    s = re.split(r"(?<!\bal)\.(?:\s|$)|(?<=\?)\s", text)[0].replace("``", "")
    return s if len(s) <= limit else s[:limit - 1].rstrip() + "…"


def _module_doc(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read())) or ""


def folder_map() -> str:
    """The package's folders and modules, each with the first sentence of its docstring, and one
    line per top-level folder; from the files on disk."""
    rows = []
    pkg = os.path.join(ROOT, "ddp_qhooks")
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        rel = os.path.relpath(dirpath, ROOT).replace(os.sep, "/")
        depth = rel.count("/")
        init = os.path.join(dirpath, "__init__.py")
        if not os.path.exists(init):
            continue
        rows.append(("  " * depth + rel.split("/")[-1] + "/", _first_sentence(_module_doc(init))))
        for f in sorted(filenames):
            if f.endswith(".py") and f != "__init__.py":
                rows.append(("  " * (depth + 1) + f, _first_sentence(_module_doc(os.path.join(dirpath, f)))))
    for d, what in _TOP.items():
        if os.path.isdir(os.path.join(ROOT, d)):
            rows.append((d + "/", what))
    width = max(len(a) for a, _ in rows) + 2
    return "```\n" + "".join(f"{a.ljust(width)}{b}".rstrip() + "\n" for a, b in rows) + "```\n"


def codec_table() -> str:
    from ddp_qhooks import codecs
    return codecs.available_markdown().rstrip() + "\n"


GENERATORS = {"folder-map": folder_map, "codec-table": codec_table}


def render_blocks(text: str) -> str:
    """``text`` with every generated block replaced by its current content."""
    def one(m):
        gen = GENERATORS.get(m.group(2))
        if gen is None:
            raise KeyError(f"unknown generated block {m.group(2)!r} (known: {', '.join(GENERATORS)})")
        return m.group(1) + gen() + m.group(4)
    return BLOCK.sub(one, text)


def pages_with_blocks() -> list:
    out = []
    for f in sorted(os.listdir(DOCS)):
        if f.endswith(".md"):
            with open(os.path.join(DOCS, f), encoding="utf-8") as fh:
                if BLOCK.search(fh.read()):
                    out.append(os.path.join(DOCS, f))
    return out


def expected_files() -> dict:
    """path -> the content it should have."""
    want = {API_MD: api_markdown()}
    for p in pages_with_blocks():
        with open(p, encoding="utf-8") as f:
            want[p] = render_blocks(f.read())
    return want


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is stale")
    args = ap.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old != text:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    if args.check:
        if stale:
            print("stale (run python scripts/gen_api_docs.py):", ", ".join(stale))
            return 1
        print("docs are current")
    else:
        print("wrote:", ", ".join(stale) if stale else "nothing (all current)")
    gaps = undocumented()
    if gaps:
        print(f"undocumented ({len(gaps)}): " + ", ".join(gaps), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
