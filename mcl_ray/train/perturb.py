"""Perturbation of the input embeddings during training: random noise, FGM and PGD (adversarial
training in embedding space, as for text models; Miyato et al. 2017, Madry et al. 2018).

Every InputLayer of the model adds `delta` [B, F, D] to its output when one is set; the training
loop asks `perturbed_loss` for the extra loss term of a batch. Norms are per row, over all the
row's fields together, so `eps` bounds how far a row's whole input moves."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mcl_ray.models.blocks import InputLayer


def input_layers(model: torch.nn.Module) -> list[InputLayer]:
    return [m for m in model.modules() if isinstance(m, InputLayer)]


def _unit(x: torch.Tensor) -> torch.Tensor:  # [B, F, D] -> the same, each row scaled to norm 1
    return x / x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))


def _project(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row of x onto the ball of radius eps."""
    n = x.flatten(1).norm(dim=1).clamp_min(1e-12)
    return x * (eps / n).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))


def fgm_delta(grad: torch.Tensor, eps: float) -> torch.Tensor:
    """The fast gradient method's step: eps along the gradient of the loss, per row."""
    return eps * _unit(grad)


def random_delta(like: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise scaled to norm eps per row."""
    return eps * _unit(torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device))


def set_deltas(kind: str, eps: float, steps: int, model: torch.nn.Module, loss_of: Callable[[], torch.Tensor],
               clean_loss: torch.Tensor, scale: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
               ) -> list[InputLayer]:
    """Compute the batch's perturbation and set it on every InputLayer (the next forward of the
    same batch is the perturbed one; `clear` removes it). Call after the clean forward, which the
    layers kept (`capture`): its outputs give the shapes and, for fgm/pgd, the gradients.
    loss_of() runs the model on the batch and returns its loss (pgd's inner steps); `scale` is the
    fp16 GradScaler's (gradients of the scaled loss do not underflow; only their direction is used)."""
    layers = input_layers(model)
    outs = [layer.last for layer in layers]
    if kind == "random":
        deltas = [random_delta(o, eps) for o in outs]
    else:
        grads = torch.autograd.grad(scale(clean_loss), outs, retain_graph=True, allow_unused=True)
        deltas = [fgm_delta(g if g is not None else torch.zeros_like(o), eps) for g, o in zip(grads, outs)]
        if kind == "pgd":
            alpha = 2 * eps / steps
            deltas = [_project(d * (alpha / eps), eps) for d in deltas]  # the first step, of size alpha
            for _ in range(steps - 1):
                for layer, d in zip(layers, deltas):
                    layer.delta = d.detach().requires_grad_(True)
                grads = torch.autograd.grad(scale(loss_of()), [layer.delta for layer in layers], allow_unused=True)
                deltas = [_project(layer.delta.detach() + alpha * _unit(g if g is not None else torch.zeros_like(d)),
                                   eps) for layer, g, d in zip(layers, grads, deltas)]
    for layer, d in zip(layers, deltas):
        layer.delta = d.detach()
    return layers


def clear(layers: list[InputLayer]) -> None:
    for layer in layers:
        layer.delta = None
        layer.last = None
