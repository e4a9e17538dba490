"""Client-drift corrections of :class:`~ddp_qhooks.LocalSGD`: what is added to each inner step's
gradient, and what a rank's round changes.

* ``"scaffold"`` (Karimireddy et al. 2020): every inner gradient ``g`` becomes ``g + c - c_i``, with
  ``c_i`` this rank's control variate and ``c`` the mean of all of them.  At the end of a round
  ``c_i`` is replaced by an estimate of the rank's own gradient: option ``"I"``, the gradient of the
  round's first inner step (taken at the round's start point, one minibatch); option ``"II"``, the
  mean of the round's uncorrected gradients.  For plain SGD option II equals the paper's
  ``c_i - c + (x - y_i) / (K lr)``, since ``x - y_i = lr * sum(g_k + c - c_i)``; taking the mean of
  the gradients instead keeps it right under momentum, Adam and learning-rate schedules.  The
  change ``c_i+ - c_i`` is exchanged like a pseudo-gradient (codec, error feedback with residuals
  of its own) and ``c`` grows by its mean over all ranks.  The inner steps subtract ``c_i - e_i``,
  ``e_i`` the control variates' residual: by the error-feedback identity that is the sum of what
  this rank's payloads delivered, so ``c`` is exactly the mean of the ``c_i - e_i`` in use
  (all-gather) and the corrections still cancel over the ranks; with the exact ``c_i``, the mean
  residual would be a bias added to every inner step.  ``c_i - e_i`` is renewed when the round's
  ``c`` arrives, so the two always come from the same round.
* ``"fedprox"`` (Li et al. 2020): ``g + mu * (x - x_start)``, ``x_start`` the round's start point.
"""
from __future__ import annotations

import torch

DRIFTS = ("none", "scaffold", "fedprox")
SCAFFOLD_OPTIONS = ("I", "II")


class NoDrift:
    name = "none"
    exchanges = False  # whether rounds send a second vector (control-variate deltas)

    def __init__(self, fragments):
        self.fragments = fragments

    def correct(self, starts) -> None:
        """Add the correction to every ``p.grad`` (called before each inner optimizer step)."""

    def round_end(self, i: int, contribute: bool):
        """End of fragment ``i``'s round: the flat control-variate delta to send (or None), and what
        :meth:`restore` needs to undo it."""
        return None, None

    def apply(self, i: int, mean, residuals=None) -> None:
        """The mean over ranks of the sent deltas of fragment ``i`` arrived (``residuals``: this
        rank's control-variate residual of each parameter, or None)."""

    def restore(self, i: int, undo) -> None:
        """A dropped round (non-finite): undo :meth:`round_end`."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FedProx(NoDrift):
    name = "fedprox"

    def __init__(self, fragments, mu: float):
        super().__init__(fragments)
        self.mu = mu

    @torch.no_grad()
    def correct(self, starts) -> None:
        for frag, start in zip(self.fragments, starts):
            for p, s in zip(frag, start):
                if p.grad is not None:
                    p.grad.add_(p.detach() - s, alpha=self.mu)


class Scaffold(NoDrift):
    name = "scaffold"
    exchanges = True

    def __init__(self, fragments, option: str):
        super().__init__(fragments)
        self.option = option
        zeros = lambda: [[torch.zeros_like(p, memory_format=torch.contiguous_format) for p in f]  # noqa: E731
                         for f in fragments]
        self.c, self.ci, self.acc = zeros(), zeros(), zeros()  # acc: option I's first gradient / II's sum
        self.used = zeros()  # c_i - e_i, what the inner steps subtract
        self.k = [0] * len(fragments)  # inner steps of the current round, per fragment

    @torch.no_grad()
    def correct(self, starts) -> None:
        for i, frag in enumerate(self.fragments):
            seen = False
            for p, c, ci, acc in zip(frag, self.c[i], self.used[i], self.acc[i]):
                if p.grad is None:
                    continue
                seen = True
                if self.option == "II":
                    acc.add_(p.grad)
                elif self.k[i] == 0:
                    acc.copy_(p.grad)
                p.grad.add_(c).sub_(ci)
            self.k[i] += seen

    @torch.no_grad()
    def round_end(self, i: int, contribute: bool):
        k, ci, acc = self.k[i], self.ci[i], self.acc[i]
        self.k[i] = 0
        if not contribute or k == 0:  # sitting out (or nothing learnt): c_i kept, nothing sent
            for a in acc:
                a.zero_()
            return torch.zeros(sum(t.numel() for t in ci), dtype=torch.float32, device=ci[0].device), None
        new = [a / k for a in acc] if self.option == "II" else [a.clone() for a in acc]
        delta = torch.cat([(n - c).reshape(-1).float() for n, c in zip(new, ci)])
        undo = [c.clone() for c in ci]
        for c, n, a in zip(ci, new, acc):
            c.copy_(n)
            a.zero_()
        return delta, undo

    @torch.no_grad()
    def apply(self, i: int, mean, residuals=None) -> None:
        offset = 0
        for c in self.c[i]:
            n = c.numel()
            c.add_(mean[offset:offset + n].view_as(c).to(c.dtype))
            offset += n
        for used, ci, e in zip(self.used[i], self.ci[i], residuals or [None] * len(self.ci[i])):
            used.copy_(ci)
            if e is not None:
                used.sub_(e.view_as(used).to(used.dtype))

    @torch.no_grad()
    def restore(self, i: int, undo) -> None:
        if undo is not None:
            for c, u in zip(self.ci[i], undo):
                c.copy_(u)

    def state_dict(self) -> dict:
        cpu = lambda ts: [[t.detach().cpu().clone() for t in f] for f in ts]  # noqa: E731
        return {"c": cpu(self.c), "ci": cpu(self.ci), "acc": cpu(self.acc), "used": cpu(self.used),
                "k": list(self.k)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name in ("c", "ci", "acc", "used"):
            for mine, saved in zip(getattr(self, name), state[name]):
                for t, s in zip(mine, saved):
                    t.copy_(s)
        self.k = [int(k) for k in state["k"]]


def make_drift(drift: str, fragments, mu: float, option: str) -> NoDrift:
    if drift == "scaffold":
        return Scaffold(fragments, option)
    if drift == "fedprox":
        return FedProx(fragments, mu)
    return NoDrift(fragments)
