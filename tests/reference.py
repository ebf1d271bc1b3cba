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
