"""The codec micro-benchmark CLI runs and reports every requested row (numbers are not asserted:
it is a benchmark, not a timed test)."""
from ddp_qhooks.tools import microbench


def test_microbench_cli_prints_every_row(capsys):
    microbench.main(["--numel", "4099", "--repeat", "1", "--codecs", "uniform", "stochastic", "fp16",
                     "--bits", "8", "2", "1", "--no-compile", "--markdown"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| codec")]
    names = [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows]
    assert names == [("uniform", "8"), ("uniform", "2"), ("uniform", "1"), ("stochastic", "8"),
                     ("stochastic", "2"), ("stochastic", "1"), ("fp16", "16"), ("naive-torch", "8")]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        numbers = cells[2:-2] if cells[0] == "naive-torch" else cells[2:]  # no error-feedback path
        assert all(float(c) > 0 for c in numbers), r
        assert cells[0] != "naive-torch" or cells[-2:] == ["–", "–"]
    assert "clone:" in out
