"""A small causal character-level transformer language model on text that Debian ships, and the
AdamW recipe the study and the bench train it with (``--task lm``).

Text (no download): every regular file of ``/usr/share/common-licenses`` (symlinks such as
``GPL -> GPL-3`` are skipped, they duplicate a file) and every GNU Texinfo manual
``/usr/share/info/*.info*.gz``, read in sorted order and joined by blank lines (~1.5-3 MB
depending on the installed packages).  Bytes are the tokens (vocabulary: the byte values present,
in sorted order).  Split, deterministic: the text is cut into 4 KiB pieces, every tenth piece
(index 9, 19, ...) is validation, the rest training (90/10, every document contributes to both).

Model (:class:`TinyGPT`): token + learned position embeddings, ``layers`` pre-LayerNorm blocks
(causal multi-head self-attention, 4x GELU MLP), final LayerNorm, output head tied to the token
embedding; defaults d=128, 2 layers, 4 heads, context 64: ~0.43 M parameters.

Recipe (:func:`adamw_recipe`): AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear
warm-up over the first 10 % of the steps, cosine decay to 10 % of the peak; the training loop
clips the gradient norm to 1.0 (:data:`CLIP`).
"""
from __future__ import annotations

import glob
import gzip
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

LICENSES = "/usr/share/common-licenses"
INFO = "/usr/share/info"
PIECE = 4096      # split granularity (bytes)
CLIP = 1.0        # clip_grad_norm_ max norm of the recipe
DEFAULT_LR = 3e-3


class CorpusMissing(FileNotFoundError):
    pass


def corpus_files(licenses: str = LICENSES, info: str = INFO) -> list[str]:
    """The files read, in the order read."""
    files = []
    if os.path.isdir(licenses):
        files += [os.path.join(licenses, n) for n in sorted(os.listdir(licenses))
                  if os.path.isfile(os.path.join(licenses, n)) and not os.path.islink(os.path.join(licenses, n))]
    files += [f for f in sorted(glob.glob(os.path.join(info, "*.info*.gz"))) if not os.path.islink(f)]
    return files


def load_text(licenses: str = LICENSES, info: str = INFO) -> bytes:
    files = corpus_files(licenses, info)
    if not files:
        raise CorpusMissing(f"no text found in {licenses} or {info}/*.info*.gz (Debian's base-files and "
                            "the info manuals of coreutils, grep, sed ... provide it)")
    parts = []
    for f in files:
        opener = gzip.open if f.endswith(".gz") else open
        with opener(f, "rb") as fh:
            parts.append(fh.read())
    return b"\n\n".join(parts)


_CACHE: dict = {}


def load_corpus(licenses: str = LICENSES, info: str = INFO) -> dict:
    """``{"train": LongTensor, "val": LongTensor, "vocab": int, "bytes": tuple}`` (cached per process)."""
    key = (licenses, info)
    if key not in _CACHE:
        raw = load_text(licenses, info)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        present = torch.unique(data)
        lut = torch.full((256,), -1, dtype=torch.long)
        lut[present] = torch.arange(present.numel())
        tokens = lut[data]
        pieces = torch.arange(tokens.numel()) // PIECE
        val = pieces % 10 == 9
        _CACHE[key] = {"train": tokens[~val].clone(), "val": tokens[val].clone(), "vocab": int(present.numel()),
                       "bytes": tuple(int(b) for b in present)}
    return _CACHE[key]


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        for blk in self.blocks:
            for lin in (blk.qkv, blk.proj, blk.fc, blk.out):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            for lin in (blk.proj, blk.out):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.t()  # tied head


def adamw_recipe(model: nn.Module, steps: int, lr: float = DEFAULT_LR, weight_decay: float = 0.1,
                 warmup: float = 0.1, final: float = 0.1, betas=(0.9, 0.95), onebit: dict | None = None,
                 hook=None):
    """``(optimizer, scheduler)``: AdamW with decay on >= 2-d weights only, linear warm-up over
    ``warmup`` of the steps, cosine decay to ``final`` x lr.  Call ``scheduler.step()`` per step.
    With ``onebit={"warmup_steps": N, ...}`` the optimizer is ``ddp_qhooks.optim.OneBitAdam(...,
    **onebit, hook=hook)`` with the same hyper-parameters (the one line a user changes)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if onebit is None:
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas)
    else:
        from ..optim import OneBitAdam
        opt = OneBitAdam(groups, lr=lr, betas=betas, **onebit, hook=hook)
    warm = max(1, int(round(warmup * steps)))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class LmTask:
    """The study's / bench's task interface: ``model()``, ``batch_for(step)``, ``loss(out, y)``,
    ``evaluate(model)`` (here: mean validation cross-entropy in nats per byte, lower is better, on
    ``eval_windows`` fixed windows)."""

    higher_is_better = False

    def __init__(self, batch: int, rank: int, device, context: int = 64, eval_windows: int = 256):
        c = load_corpus()
        self.train, self.val, self.vocab = c["train"], c["val"], c["vocab"]
        self.batch, self.rank, self.device, self.context = batch, rank, device, context
        g = torch.Generator().manual_seed(12345)
        self.eval_starts = torch.randint(0, self.val.numel() - context - 1, (eval_windows,), generator=g)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return TinyGPT(self.vocab, context=self.context).to(self.device)

    def _windows(self, src, starts):
        off = torch.arange(self.context + 1)
        w = src[starts[:, None] + off]
        return w[:, :-1].to(self.device), w[:, 1:].to(self.device)

    def batch_for(self, step: int):
        g = torch.Generator().manual_seed(7919 * self.rank + step)
        starts = torch.randint(0, self.train.numel() - self.context - 1, (self.batch,), generator=g)
        return self._windows(self.train, starts)

    def loss(self, out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model) -> float:
        model.eval()
        total, n = 0.0, 0
        for a in range(0, self.eval_starts.numel(), 64):
            x, y = self._windows(self.val, self.eval_starts[a:a + 64])
            total += float(self.loss(model(x), y)) * x.shape[0]
            n += x.shape[0]
        model.train()
        return total / n
