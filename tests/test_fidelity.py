"""The fidelity table script: runs on real Fashion-MNIST gradients and synthetic tensors, and its
numbers are the measured ones (bits/value from payload sizes, NMSE recomputed here)."""
import math

import pytest
import torch

from ddp_qhooks.tools import data, fidelity
from ddp_qhooks.codecs import Layout, make_codec, payload_nbytes


def test_measure_matches_an_independent_computation():
    layout = Layout([1000, 24])
    xs = [torch.randn(1024, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    row = fidelity.measure("uniform", 4, {}, layout, xs)
    assert row["bits_per_value"] == 8 * payload_nbytes("uniform", [1000, 24], bits=4) / 1024
    codec = make_codec("uniform", bits=4)
    nmse = []
    for x in xs:  # deterministic codec: recompute the error with numpy-free plain torch float64
        body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8)
        codec.encode(x, body, layout)
        out = torch.empty(1024)
        codec.decode([body], layout, out)
        nmse.append(float(((x.double() - out.double()) ** 2).sum() / (x.double() ** 2).sum()))
    assert row["nmse"] == pytest.approx(sum(nmse) / 3, rel=1e-9)


def test_cli_synthetic(capsys):
    fidelity.main(["--no-real", "--numel", "4096", "--codecs", "uniform", "qsgd", "--markdown"])
    out = capsys.readouterr().out
    assert "| uniform 4b |" in out and "| qsgd 2b |" in out
    rows = [l for l in out.splitlines() if l.startswith("| uniform 8b")]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert math.isclose(float(cells[1]), 8 * payload_nbytes("uniform", [2048, 1024, 512, 512], bits=8) / 4096, rel_tol=1e-3)


def test_real_gradients_from_fashion_mnist():
    if not data.available():
        pytest.fail("Fashion-MNIST is missing: `apt-get install dataset-fashion-mnist` (CI installs it)")
    layout, grads = fidelity.real_gradients(steps=20, capture_every=10)
    assert len(grads) == 2 and layout.numel == sum(p.numel() for p in data.SmallCNN().parameters())
    assert all(bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0 for g in grads)


def test_missing_dataset_error_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(data, "DEFAULT_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(data.DatasetMissing, match="dataset-fashion-mnist"):
        data.load("train")
