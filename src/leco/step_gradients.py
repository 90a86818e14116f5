"""Several optimizer steps' gradients from one batched forward and backward pass.

The steps of one rollout are independent examples in a batch: a UNet never mixes batch elements
(group norm and attention work per element), so the gradient of a step's loss with respect to a
Linear or Conv2d weight is the sum, over that step's batch elements only, of the outer products
of the layer's output gradient and input. Capturing both during one batched backward gives every
step its own gradient (the per-example trick of Goodfellow 2015 and Opacus), for the price of one
batched UNet call instead of one per step. Where a call's fixed cost dominates that is most of a
step: on ink-digits (one CPU thread) a forward and backward of 16 latents took 51 ms, of one 16 ms.

The gradients are those at the weights before the first of these steps; each step still applies
its own optimizer update (train.steps_per_forward). PyTorch has no public per-example gradient
API (torch.func's vmap would have to trace the whole diffusers UNet), hence the hooks here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leco.errors import LecoError


class StepGradients:
    """Hooks on the trained weights' modules; after `backward`, `by_group()` holds each group's
    gradient, a group being the batch elements `owners` assigns to it."""

    def __init__(self, parameters: list[nn.Parameter], modules: list[nn.Module], owners: Tensor, groups: int):
        self.parameters, self.modules, self.owners, self.groups = parameters, modules, owners, groups
        self.totals: list[Tensor | None] = [None] * len(modules)  # [group, *weight.shape] per module

    def capture(self, index: int, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not output.requires_grad:  # a no-grad pass (e.g. gradient checkpointing's first one)
            return
        x = inputs[0].detach()

        def add(gradient: Tensor) -> None:
            # Summed as the gradient arrives, so that neither it nor the input is kept to the end.
            total = self.totals[index]
            if total is None:
                total = self.totals[index] = torch.zeros(self.groups, *module.weight.shape, device=x.device)
            total.index_add_(0, self.owners, per_example(module, x, gradient.detach()))

        output.register_hook(add)

    def by_group(self) -> list[list[Tensor]]:
        """[group][parameter] gradients, in the order of `parameters`."""
        if self.groups == 1:  # nothing to split: the plain backward's gradients
            return [[p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]]
        totals = [
            total
            if total is not None
            else torch.zeros(self.groups, *module.weight.shape, device=module.weight.device)
            for module, total in zip(self.modules, self.totals, strict=True)
        ]
        return [[total[group] for total in totals] for group in range(self.groups)]


def per_example(module: nn.Module, x: Tensor, output_grad: Tensor) -> Tensor:
    """[batch, *weight.shape]: each batch element's gradient of `module.weight`."""
    x, g = x.float(), output_grad.float()
    batch = x.shape[0]
    if isinstance(module, nn.Linear):
        x, g = x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1])
        return torch.einsum("bno,bni->boi", g, x)
    columns = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return torch.einsum("bol,bkl->bok", g.flatten(2), columns).reshape(batch, *module.weight.shape)


def supported(modules: list[nn.Module]) -> bool:
    """Whether `per_example` covers every module: Linear, or Conv2d without groups or string padding."""
    for module in modules:
        if isinstance(module, nn.Linear):
            continue
        is_plain_conv = (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and not isinstance(module.padding, str)
            and module.padding_mode == "zeros"
        )
        if not is_plain_conv:
            return False
    return all(module.bias is None or not module.bias.requires_grad for module in modules)


@contextmanager
def step_gradients(
    parameters: list[nn.Parameter], modules: list[nn.Module] | None, owners: list[int]
) -> Iterator[StepGradients]:
    """Each group's gradient of `parameters` from the one backward run inside the block. `modules`
    hold them as weights (Trainable.weight_modules, in the same order); `owners[i]` is the group of
    batch element i. One group, or no modules: the plain backward, no hooks."""
    groups = max(owners) + 1
    if groups > 1 and (modules is None or not supported(modules)):
        raise LecoError(
            "train.steps_per_forward: the trained part has weights whose gradients cannot be split by "
            "step (only Linear and plain Conv2d layers can); set 1"
        )
    device = parameters[0].device
    gradients = StepGradients(parameters, modules or [], torch.tensor(owners, device=device), groups)
    hooked = modules if groups > 1 else []
    handles = [
        module.register_forward_hook(
            lambda module, inputs, output, index=index: gradients.capture(index, module, inputs, output)
        )
        for index, module in enumerate(hooked)
    ]
    try:
        yield gradients
    finally:
        for handle in handles:
            handle.remove()
