"""docs/codecs_table.md is generated from the registry (scripts/gen_codec_table.py) and current."""
import importlib.util
import os
import subprocess
import sys

from ddp_qhooks.codecs import CODECS, available_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gen_codec_table.py")


def _script():
    spec = importlib.util.spec_from_file_location("gen_codec_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_codecs_table_is_current():
    text = open(os.path.join(ROOT, "docs", "codecs_table.md"), encoding="utf-8").read()
    assert text == _script().render(), "docs/codecs_table.md is stale: run python scripts/gen_codec_table.py"
    assert available_markdown() in text
    for name in CODECS:
        assert f"| `{name}` |" in text


def test_check_mode_and_stdout():
    env = dict(os.environ, PYTHONPATH=ROOT)
    ok = subprocess.run([sys.executable, SCRIPT, "--check"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    out = subprocess.run([sys.executable, SCRIPT, "--stdout"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == _script().render()
