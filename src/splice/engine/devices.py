"""Where a model's modules compute, for models split across devices by accelerate.

A model loaded with `device_map=...` (or dispatched with `accelerate.dispatch_model`) keeps each
block on its own device. Blocks offloaded to "cpu" (with an accelerator) or "disk" keep their
weights on the "meta" device between calls. accelerate wraps each module's `forward` so that it
loads the weights and moves the inputs to the module's *execution device* first. splice's hooks
are plain torch hooks beside those wrappers: its pre-hooks see a block's input before accelerate
moves it, its forward hooks see outputs on the block's device. This module answers what splice
needs besides: where a module computes (not where its weights rest), where inputs go, and how to
read an offloaded module's weights for a moment. It never imports accelerate: it uses the hook
objects a dispatched model carries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain

import torch
import torch.nn as nn


def _as_device(value: object) -> torch.device | None:
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return None
    try:
        return torch.device(value)  # "cuda:1", "cpu", or an accelerator index (accelerate's 0)
    except (RuntimeError, TypeError):
        return None


def _hooks(module: nn.Module) -> list:
    """accelerate's hooks on `module` (its `_hf_hook`, a `SequentialHook` unpacked), or []."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def execution_device(module: nn.Module) -> torch.device | None:
    """The device `module` computes on: its accelerate hook's execution device when it has one,
    else the device of its first parameter or buffer that is not on "meta"; None when neither
    tells (e.g. a module without tensors).

    Example:
        >>> execution_device(torch.nn.Linear(2, 2))
        device(type='cpu')
        >>> execution_device(torch.nn.Linear(2, 2, device="meta")) is None  # weights nowhere yet
        True
    """
    for hook in _hooks(module):
        device = _as_device(getattr(hook, "execution_device", None))
        if device is not None:
            return device
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids go: the execution device of its input embedding (for a model
    split by accelerate, the block that runs first), else of the model itself, else the CPU.

    Example:
        >>> import transformers
        >>> config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)
        >>> input_device(transformers.GPT2LMHeadModel(config))
        device(type='cpu')
    """
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    for candidate in (embeddings, model):
        if isinstance(candidate, nn.Module):
            device = execution_device(candidate)
            if device is not None:
                return device
    return torch.device("cpu")


def to_module(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`tensor` on the device `module` computes on (itself when already there or unknown).

    Example:
        >>> x = torch.ones(2)
        >>> to_module(x, torch.nn.Linear(2, 2)) is x
        True
    """
    device = execution_device(module)
    return tensor if device is None or tensor.device == device else tensor.to(device)


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps this module's own weights off-device between calls (mapped to
    "cpu" offload or "disk": they sit on "meta" outside its forward).

    Example:
        >>> offloaded(torch.nn.Linear(2, 2))
        False
    """
    return any(getattr(hook, "offload", False) for hook in _hooks(module))


@contextmanager
def loaded(module: nn.Module) -> Iterator[None]:
    """Inside the block, an offloaded module's own weights are on its execution device (as during
    its forward), and offloaded again afterwards, however the block ends. A no-op for any other
    module. For code that reads a module's weights from a hook (`attn.result` does).

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> with loaded(layer):  # not offloaded: nothing to do
        ...     layer.weight.device
        device(type='cpu')
    """
    hooks = [hook for hook in _hooks(module) if getattr(hook, "offload", False)]
    done = []
    try:
        for hook in hooks:
            hook.pre_forward(module)
            done.append(hook)
        yield
    finally:
        for hook in reversed(done):
            hook.post_forward(module, None)


def parameters(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter of `model` with its values, in `model.parameters()` order, offloaded ones
    loaded one module at a time: each is valid until the next is yielded (read it at once, e.g.
    to sum it). For fingerprints of models whose weights partly sit on "meta".

    Example:
        >>> [p.shape for p in parameters(torch.nn.Linear(3, 2))]
        [torch.Size([2, 3]), torch.Size([2])]
    """
    # (module, name) pairs in `parameters()` order, tied weights once, taken before anything is
    # loaded: loading and offloading replaces a module's parameter objects.
    seen: set[int] = set()
    places = []
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                places.append((module, pname))
    for module, pname in places:
        param = getattr(module, pname)
        if param.device.type != "meta":
            yield param
            continue
        with loaded(module):
            yield getattr(module, pname)
