"""Independent reference implementations used by the tests.

Written straight from the equations with ``torch.func.functional_call`` on explicit parameter
dicts, sharing no code with ``msam``: per micro-batch j (``torch.tensor_split`` sizes),
``g_j = grad L_j(w)``, ``e_j = rho g_j/(||g_j|| + 1e-12)`` (ASAM: ``rho T^2 g_j/(||T g_j|| +
1e-12)``, ``T = |w| + eta``), ``h_j = grad L_j(w + e_j)``, result ``sum_j n_j/n h_j``.
Only for models without BatchNorm (buffers are not handled).
"""

from __future__ import annotations

import torch
from torch.func import functional_call


def split(batch, m):
    if isinstance(batch, torch.Tensor):
        return list(torch.tensor_split(batch, m))
    if isinstance(batch, dict):
        parts = {k: split(v, m) for k, v in batch.items()}
        return [{k: parts[k][j] for k in batch} for j in range(m)]
    parts = [split(v, m) for v in batch]
    return [type(batch)(p[j] for p in parts) for j in range(m)]


def first_size(batch):
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return first_size(next(iter(batch.values())))
    return first_size(batch[0])


def reference_msam_grad(model, loss_of, batch, m, rho, adaptive=False, eta=0.01, perturb=None):
    """``loss_of(model_output_fn, micro_batch)``: ``model_output_fn(x)`` runs the model."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    perturb = set(names) if perturb is None else set(perturb)
    n = first_size(batch)
    total = {k: torch.zeros_like(v) for k, v in w.items()}
    loss_total = 0.0
    for mb in split(batch, m):
        nj = first_size(mb)

        def loss_at(params, mb=mb):
            return loss_of(lambda x: functional_call(model, params, (x,)), mb)

        wp = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        loss = loss_at(wp)
        g = dict(zip(names, torch.autograd.grad(loss, [wp[k] for k in names])))
        loss_total += float(loss.detach()) * nj / n
        if adaptive:
            t = {k: w[k].abs() + eta for k in names}
            norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in perturb))
            e = {k: rho * t[k] * t[k] * g[k] / (norm + 1e-12) for k in perturb}
        else:
            norm = torch.sqrt(sum((g[k] ** 2).sum() for k in perturb))
            e = {k: rho * g[k] / (norm + 1e-12) for k in perturb}
        wq = {k: (w[k] + e[k] if k in e else w[k]).clone().requires_grad_(True) for k in names}
        h = torch.autograd.grad(loss_at(wq), [wq[k] for k in names])
        for k, hk in zip(names, h):
            total[k] += hk * (nj / n)
    return total, loss_total


def reference_msam_grad_bn(model, loss_of, batch, m, rho, perturb=None):
    """As :func:`reference_msam_grad` for models with BatchNorm in training mode.

    Every pass normalises with its micro-batch's own statistics (BatchNorm in training mode
    normalises with the batch's statistics whatever its buffers hold); buffers go in as
    throw-away copies, so the running statistics never reach the result.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    perturb = set(names) if perturb is None else set(perturb)
    n = first_size(batch)
    total = {k: torch.zeros_like(v) for k, v in w.items()}

    def loss_at(params, mb):
        state = dict(params)
        state.update({k: b.detach().clone() for k, b in model.named_buffers()})
        return loss_of(lambda x: functional_call(model, state, (x,)), mb)

    for mb in split(batch, m):
        nj = first_size(mb)
        wp = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        g = dict(zip(names, torch.autograd.grad(loss_at(wp, mb), [wp[k] for k in names])))
        norm = torch.sqrt(sum((g[k] ** 2).sum() for k in perturb))
        e = {k: rho * g[k] / (norm + 1e-12) for k in perturb}
        wq = {k: (w[k] + e[k] if k in e else w[k]).clone().requires_grad_(True) for k in names}
        h = torch.autograd.grad(loss_at(wq, mb), [wq[k] for k in names])
        for k, hk in zip(names, h):
            total[k] += hk * (nj / n)
    return total


def reference_linear_bn_running_stats(weight, bias, x, m, old_mean, old_var, momentum, nbt):
    """Running statistics of ``BatchNorm1d`` placed after ``Linear(weight, bias)`` after one
    step: the statistics of ``x_j W^T + b`` at the **unperturbed** weights, per micro-batch
    (mean; unbiased variance), averaged, then ``(1 - f) old + f mean`` with ``f = momentum``
    (``1 / (nbt + 1)`` for ``momentum=None``)."""
    means, variances = [], []
    for xj in torch.tensor_split(x, m):
        hj = xj @ weight.T + bias
        means.append(hj.mean(0))
        variances.append(hj.var(0, unbiased=True))
    f = 1.0 / (nbt + 1) if momentum is None else momentum
    mean = torch.stack(means).mean(0)
    var = torch.stack(variances).mean(0)
    return (1 - f) * old_mean + f * mean, (1 - f) * old_var + f * var


def _ce(f, b):
    return torch.nn.functional.cross_entropy(f(b[0]), b[1])


def _flat_dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


class VariantReference:
    """The SAM family's gradients written from the papers' update equations (docs/variants.md):
    ``kind`` in gsam, friendlysam, wsam, gcsam (or sam). ``grad(model, batch, m) -> {name:
    gradient}``; ``grad_and_loss`` also returns the mean loss at ``w``. Keeps its own state
    (FriendlySAM's EMA), so one instance follows one training run.

    WSAM (``decoupled=True``, the default, as in the paper) returns ``g`` for the base
    optimizer and leaves ``beta * sum_j (n_j/n) (h_j - g_j)`` in :attr:`decoupled`; the caller
    applies ``w -= lr * decoupled`` after the base step (:meth:`after_base_step`)."""

    def __init__(self, kind, rho, **hp):
        self.kind, self.rho, self.hp, self.ema = kind, rho, hp, None
        self.decoupled = None

    def after_base_step(self, model, lr):
        """The decoupled WSAM step ``w -= lr * d`` (nothing for the other kinds)."""
        if self.decoupled is None:
            return
        with torch.no_grad():
            for k, p in model.named_parameters():
                p -= lr * self.decoupled[k]
        self.decoupled = None

    def grad(self, model, batch, m, lr=None):
        return self.grad_and_loss(model, batch, m, lr)[0]

    def grad_and_loss(self, model, batch, m, lr=None):
        names = [n for n, _ in model.named_parameters()]
        w = {n: p.detach().clone() for n, p in model.named_parameters()}
        total = {k: torch.zeros_like(v) for k, v in w.items()}
        gbatch = {k: torch.zeros_like(v) for k, v in w.items()}
        n = first_size(batch)
        loss_total = 0.0
        rho = self.rho
        if self.kind == "gsam" and "sched" in self.hp:
            rmax, rmin, lmax, lmin = self.hp["sched"]
            rho = rmin + (rmax - rmin) * min(1.0, max(0.0, (lr - lmin) / (lmax - lmin)))
        for mb in split(batch, m):
            wj = first_size(mb) / n

            def grad_at(params, mb=mb):
                ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
                loss = _ce(lambda x: functional_call(model, ps, (x,)), mb)
                return dict(zip(names, torch.autograd.grad(loss, [ps[k] for k in names]))), \
                    float(loss.detach())

            g, loss_w = grad_at(w)
            loss_total += wj * loss_w
            for k in names:
                gbatch[k] += wj * g[k]
            if self.kind == "gcsam":
                d = {k: (v - v.mean(dim=1, keepdim=True)) if v.dim() == 2 else v
                     for k, v in g.items()}
            elif self.kind == "friendlysam":
                sig, lam = self.hp["sigma"], self.hp["lmbda"]  # the paper's sigma, lambda
                m_prev = self.ema or {k: torch.zeros_like(v) for k, v in g.items()}
                m_t = {k: lam * m_prev[k] + (1 - lam) * g[k] for k in names}
                d = {k: g[k] - sig * m_t[k] for k in names}
            else:
                d = g
            norm = torch.sqrt(_flat_dot(d, d))
            e = {k: rho * d[k] / (norm + 1e-12) for k in names}
            h, _ = grad_at({k: w[k] + e[k] for k in names})
            if self.kind == "gsam":
                hh = _flat_dot(h, h)
                coef = _flat_dot(g, h) / hh if hh > 0 else 0.0
                step = {k: h[k] - self.hp["alpha"] * (g[k] - coef * h[k]) for k in names}
            elif self.kind == "wsam" and self.hp.get("decoupled", True):
                beta = self.hp["gamma"] / (1 - self.hp["gamma"])
                step = g
                if self.decoupled is None:
                    self.decoupled = {k: torch.zeros_like(v) for k, v in w.items()}
                for k in names:
                    self.decoupled[k] += wj * beta * (h[k] - g[k])
            elif self.kind == "wsam":
                gam = self.hp["gamma"]
                step = {k: (1 - 2 * gam) / (1 - gam) * g[k] + gam / (1 - gam) * h[k]
                        for k in names}
            else:
                step = h
            for k in names:
                total[k] += wj * step[k]
        if self.kind == "friendlysam":
            lam = self.hp["lmbda"]
            m_prev = self.ema or {k: torch.zeros_like(v) for k, v in w.items()}
            self.ema = {k: lam * m_prev[k] + (1 - lam) * gbatch[k] for k in names}
        return total, loss_total
