"""tools/lm.py: the Debian-text corpus, the tiny causal transformer, the AdamW recipe, and the
study's ``--task lm`` (a few steps, 2 ranks)."""
import json
import math
import os

import pytest
import torch

from ddp_qhooks.tools import lm

pytestmark = pytest.mark.skipif(not lm.corpus_files(), reason="no Debian text (common-licenses, info manuals)")


def test_corpus_is_regular_files_split_90_10_deterministically():
    files = lm.corpus_files()
    assert files == sorted(f for f in files if "common-licenses" in f) + sorted(f for f in files if "/info/" in f)
    assert all(os.path.isfile(f) and not os.path.islink(f) for f in files)
    c = lm.load_corpus()
    raw = lm.load_text()
    n = len(raw)
    assert c["train"].numel() + c["val"].numel() == n
    # every 10th 4 KiB piece is validation: an independent count
    val_bytes = sum(min(lm.PIECE, n - a) for i, a in enumerate(range(0, n, lm.PIECE)) if i % 10 == 9)
    assert c["val"].numel() == val_bytes
    assert 0.09 < val_bytes / n < 0.11
    # tokens map back to the bytes: the first validation piece is raw[9*PIECE:10*PIECE]
    table = torch.tensor(c["bytes"])
    assert bytes(table[c["val"][:lm.PIECE]].tolist()) == raw[9 * lm.PIECE:10 * lm.PIECE]
    assert c["vocab"] == len(set(raw))


def test_model_size_and_causality():
    task = lm.LmTask(4, 0, "cpu")
    model = task.model()
    n = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n <= 500_000
    x, y = task.batch_for(0)
    assert x.shape == y.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
    with torch.no_grad():
        a = model(x)
        x2 = x.clone()
        x2[:, 40:] = (x2[:, 40:] + 1) % task.vocab  # change the future
        b = model(x2)
    assert torch.allclose(a[:, :40], b[:, :40], atol=1e-6) and not torch.allclose(a[:, 40:], b[:, 40:])


def test_recipe_warmup_cosine_and_decay_groups():
    model = lm.TinyGPT(10, d=16, layers=1, heads=2, context=8)
    opt, sched = lm.adamw_recipe(model, steps=100, lr=1e-3)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # 10 warm-up steps
    assert lrs[10] == pytest.approx(1e-3)
    mid = 10 + 45  # half way through the cosine: (1 + 0.1) / 2
    assert lrs[mid] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))))
    assert lrs[-1] > 1e-4 * 0.99 and lrs[-1] < 1.1e-4 + 1e-6
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in rest["params"])


def test_a_few_steps_lower_the_validation_loss():
    torch.manual_seed(0)
    task = lm.LmTask(8, 0, "cpu", eval_windows=64)
    model = task.model()
    opt, sched = lm.adamw_recipe(model, 40)
    before = task.evaluate(model)
    assert before == pytest.approx(math.log(task.vocab), rel=0.05)  # near-uniform predictions at init
    for step in range(40):
        x, y = task.batch_for(step)
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), lm.CLIP)
        opt.step()
        sched.step()
    assert task.evaluate(model) < before - 1.0


def test_study_task_lm(tmp_path):
    from ddp_qhooks.tools import study
    study.main(["--task", "lm", "--configs", "fp32", "none", "--seeds", "0", "--world", "2", "--steps", "6",
                "--eval-every", "3", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "study.json").read_text())
    runs = {r["config"]: r for r in result["runs"]}
    assert [p["step"] for p in runs["fp32"]["curve"]] == [3, 6]
    assert runs["fp32"]["lr"] == lm.DEFAULT_LR and runs["fp32"]["momentum"] is None
    # codec "none" sends fp32 values: the same training as the fp32 allreduce, up to summation order
    assert runs["none"]["final_val_loss"] == pytest.approx(runs["fp32"]["final_val_loss"], rel=1e-4)
    assert all(p["grad_norm"] > 0 for p in runs["fp32"]["curve"])
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["fp32"]["ratio"] == 1.0 and "val loss" in (tmp_path / "study.md").read_text()
