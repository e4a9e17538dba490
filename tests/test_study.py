"""The convergence study, small: one seed, 2 ranks, 150 steps, one configuration per codec family,
each above a loose accuracy floor (the full study is run on demand: README, results/study/)."""
import json

import pytest

from ddp_qhooks.tools import data, study

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not data.available(), reason="Debian package dataset-fashion-mnist not installed")]


def test_split_recipe():
    assert study.split_recipe("sign,lr=0.3,momentum=0,ef=0", 0.05) == ("sign,ef=0", 0.3, 0.0)
    assert study.split_recipe("stochastic:4", 0.05, 0.8) == ("stochastic:4", 0.05, 0.8)
    with pytest.raises(ValueError, match="momentum must be in"):
        study.split_recipe("sign,momentum=1.5", 0.05)


def test_split_recipe_onebit():
    assert study.split_recipe_onebit("sign,onebit_adam=30,lr=0.001", 3e-3) == \
        ("sign", 0.001, 0.9, {"warmup_steps": 30, "variance_refresh": ()})
    assert study.split_recipe_onebit("sign,onebit_adam=1,onebit_refresh=10/20", 3e-3)[3] == \
        {"warmup_steps": 1, "variance_refresh": (10, 20)}
    with pytest.raises(ValueError, match="onebit_refresh and onebit_warmup need onebit_adam"):
        study.split_recipe_onebit("sign,onebit_refresh=10", 3e-3)
    assert study.split_recipe_onebit("sign,onebit_adam=60,onebit_warmup=fp32", 3e-3)[3] == \
        {"warmup_steps": 60, "variance_refresh": (), "warmup_codec": None}
    assert study.split_recipe_onebit("sign,onebit_adam=60,onebit_warmup=stochastic:1", 3e-3)[3] == \
        {"warmup_steps": 60, "variance_refresh": (), "warmup_codec": "stochastic", "warmup_bits": 1}
    with pytest.raises(ValueError, match="onebit_warmup must be fp32 or codec:bits"):
        study.split_recipe_onebit("sign,onebit_adam=60,onebit_warmup=stochastic", 3e-3)
    assert study.split_recipe_onebit("sign", 3e-3) == ("sign", 3e-3, 0.9, None)
    assert study.split_recipe("sign,onebit_adam=30", 3e-3) == ("sign", 3e-3, 0.9)  # the bench never sees it
    for bad in ("0", "-3", "2.5", "x"):
        with pytest.raises(ValueError, match="onebit_adam must be the warm-up steps"):
            study.split_recipe_onebit(f"sign,onebit_adam={bad}", 3e-3)


def test_split_lr():
    assert study.split_lr("sign,block_size=256,lr=0.01,ef=0", 0.05) == ("sign,block_size=256,ef=0", 0.01)
    assert study.split_lr("stochastic:4", 0.05) == ("stochastic:4", 0.05)
    with pytest.raises(ValueError, match="lr must be"):
        study.split_lr("sign,lr=fast", 0.05)
    with pytest.raises(ValueError, match="lr must be > 0"):
        study.split_lr("sign,lr=-1", 0.05)


def test_short_run_every_family_learns(tmp_path, capsys):
    configs = ["fp32", "stochastic:4", "qsgd:4,block_size=32", "log:4", "kmeans:2", "ternary,block_size=256",
               "sign,block_size=256,lr=0.3,momentum=0", "topk:8,ratio=0.05", "stochastic:4,local_steps=10"]
    # the MLP: every family reaches 78-82 % in 150 steps (the CNN took twice as long to 71-80 %)
    study.main(["--configs", *configs, "--model", "mlp", "--seeds", "0", "--world", "2", "--steps", "150",
                "--eval-every", "50", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "study.json").read_text())
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == configs
    numel = sum(p.numel() for p in data.MLP().parameters())
    for spec, r in rows.items():
        assert r["finished"] == 1 and not r["errors"], r
        assert r["accuracy"] > 75.0, f"{spec}: {r['accuracy']:.1f} % after 150 steps"  # chance is 10 %
    runs = {r["config"]: r for r in result["runs"]}
    sign = runs["sign,block_size=256,lr=0.3,momentum=0"]  # per-config recipe
    assert (sign["lr"], sign["momentum"], runs["fp32"]["lr"], runs["fp32"]["momentum"]) == (0.3, 0.0, 0.05, 0.9)
    for spec, r in runs.items():
        steps = [p["step"] for p in r["curve"]]
        assert steps == [50, 100, 150]
        assert r["curve"][-1]["loss"] < r["curve"][0]["loss"] * 1.05, spec
        sent = [p["bytes_sent"] for p in r["curve"]]
        assert sent == sorted(sent) and sent[0] > 0
    # bytes: fp32 is a ring allreduce (2(W-1)/W x 4 bytes per value per step); 4-bit about 8x less
    assert runs["fp32"]["bytes_sent"] == pytest.approx(150 * 4 * numel)
    assert 6 < runs["fp32"]["bytes_sent"] / runs["stochastic:4"]["bytes_sent"] < 9
    # local SGD, H=10: one 4-bit exchange every 10 steps (15 in 150 steps)
    assert 9 < runs["stochastic:4"]["bytes_sent"] / runs["stochastic:4,local_steps=10"]["bytes_sent"] < 11
    assert "| config |" in out and (tmp_path / "study.md").exists()
    assert "vs fp32" in (tmp_path / "study.md").read_text()


def test_noniid_split_gives_each_rank_mostly_its_two_classes():
    import torch

    from ddp_qhooks.tools.bench import FashionMnistTask
    for rank in range(4):
        task = FashionMnistTask(200, rank, "cpu", noniid=0.9)
        y = torch.cat([task.batch_for(step)[1] for step in range(5)])
        home = ((y == 2 * rank) | (y == 2 * rank + 1)).float().mean()
        assert 0.9 <= float(home) < 0.95  # 90 % drawn from the home classes, plus their share of the rest
    iid = FashionMnistTask(200, 0, "cpu")
    y = torch.cat([iid.batch_for(step)[1] for step in range(5)])
    assert float(((y == 0) | (y == 1)).float().mean()) < 0.3
    with pytest.raises(ValueError, match="noniid"):
        FashionMnistTask(8, 0, "cpu", noniid=1.5)


def test_dirichlet_split_partitions_every_class_over_the_ranks():
    import numpy as np
    import torch

    from ddp_qhooks.tools import data
    from ddp_qhooks.tools.bench import FashionMnistTask, dirichlet_share
    _, labels = data.load("train", None)
    shares = [dirichlet_share(labels, r, 4, 0.1) for r in range(4)]
    joined = torch.cat(shares).sort().values
    assert torch.equal(joined, torch.arange(labels.numel()))  # disjoint, and nothing left out
    # the proportions of each class are one Dirichlet(0.1) draw: mostly concentrated on one rank
    counts = np.array([[int((labels[s] == c).sum()) for s in shares] for c in range(10)])
    assert (counts.max(1) / counts.sum(1)).mean() > 0.6
    task = FashionMnistTask(64, 2, "cpu", dirichlet=0.1, world=4)
    _, y = task.batch_for(0)
    assert bool(torch.isin(y, labels[shares[2]].unique()).all())
    with pytest.raises(ValueError, match="dirichlet must be a concentration > 0"):
        FashionMnistTask(8, 0, "cpu", dirichlet=0.0, world=4)


def test_drift_participation_and_delay_are_local_sgd_options():
    from ddp_qhooks.tools.bench import parse_config
    cfg = parse_config("stochastic:4,local_steps=16,drift=fedprox,mu=0.1,participation=0.5,overlap=True,delay=2")
    assert cfg["kind"] == "local" and cfg["local"] == {"local_steps": 16, "drift": "fedprox", "mu": 0.1,
                                                       "participation": 0.5, "overlap": True, "delay": 2}
    with pytest.raises(ValueError, match=r"drift must be one of \('none', 'scaffold', 'fedprox'\)"):
        parse_config("stochastic:4,local_steps=16,drift=prox")
