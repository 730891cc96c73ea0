"""Putting `AdaptedLinear` wrappers into a pipeline's models and taking them out again.

Layers are named across the whole pipeline as "<component>.<module path>", e.g.
"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" or
"text_encoder.text_model.encoder.layers.0.self_attn.q_proj", so one adapter can span the UNet
and the text encoder. SD3/FLUX layers live under "transformer." (e.g.
"transformer.single_transformer_blocks.0.attn.to_q"). Any object with these component attributes
works (a diffusers pipeline, or a plain namespace holding meta-device models in shape tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from hypernet.adapters.layer import AdaptedLinear
from hypernet.errors import IncompatibleAdapterError, InvalidInputError

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def components(pipe) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for each adaptable model the pipeline has."""
    for comp in COMPONENTS:
        mod = getattr(pipe, comp, None)
        if mod is not None:
            yield comp, mod


def linear_layers(pipe) -> Iterator[tuple[str, nn.Linear]]:
    """Every base `nn.Linear` of the pipeline's models, by pipeline-wide name, in module order.

    Layers already wrapped are reported under their plain name (pointing at the base layer).
    """
    for comp, mod in components(pipe):
        for path, m in mod.named_modules():
            if isinstance(m, AdaptedLinear):
                yield f"{comp}.{path}", m.base_layer
            elif isinstance(m, nn.Linear) and not path.endswith(".base_layer"):
                yield f"{comp}.{path}", m


def _resolve(pipe, name: str) -> tuple[nn.Module, str, nn.Module]:
    comp, _, path = name.partition(".")
    root = getattr(pipe, comp, None)
    if comp not in COMPONENTS or root is None or not path:
        raise InvalidInputError(f"layer name must start with one of {COMPONENTS}, got {name!r}")
    parent_path, _, child = path.rpartition(".")
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
        module = getattr(parent, child)
    except AttributeError as e:
        raise InvalidInputError(f"layer {name!r} must exist in the pipeline, got no such module") from e
    return parent, child, module


def inject(pipe, layer_names: list[str]) -> dict[str, AdaptedLinear]:
    """Wrap each named `nn.Linear` in an `AdaptedLinear` (idempotent); return the wrappers."""
    out: dict[str, AdaptedLinear] = {}
    for name in layer_names:
        parent, child, module = _resolve(pipe, name)
        if isinstance(module, AdaptedLinear):
            out[name] = module
            continue
        if not isinstance(module, nn.Linear):
            raise InvalidInputError(f"layer {name!r} must be an nn.Linear, got {type(module).__name__}")
        wrapper = AdaptedLinear(module)
        setattr(parent, child, wrapper)
        out[name] = wrapper
    return out


def adapted_layers(pipe) -> dict[str, AdaptedLinear]:
    """Every `AdaptedLinear` currently in the pipeline, by pipeline-wide name."""
    found: dict[str, AdaptedLinear] = {}
    for comp, mod in components(pipe):
        for path, m in mod.named_modules():
            if isinstance(m, AdaptedLinear):
                found[f"{comp}.{path}"] = m
    return found


def delete_adapter(pipe, adapter: str) -> None:
    """Remove adapter `adapter` from every layer (unmerging it first if merged)."""
    for layer in adapted_layers(pipe).values():
        if adapter in layer.adapters:
            while adapter in layer.merged_adapters:
                layer.unmerge()
            del layer.adapters[adapter]
            layer.disabled.discard(adapter)


def uninject(pipe) -> None:
    """Put the plain base layers back everywhere, unmerging whatever was merged.

    Afterwards the models' state dicts are exactly what they were before `inject`.
    """
    for name, layer in adapted_layers(pipe).items():
        while layer.merged_adapters:
            layer.unmerge()
        parent, child, _ = _resolve(pipe, name)
        setattr(parent, child, layer.base_layer)


@contextlib.contextmanager
def wrappers_detached(pipe) -> Iterator[int]:
    """Take every (idle) `AdaptedLinear` out of the pipeline for the block, then put the very
    same wrapper objects back; yields how many were taken out.

    Why: code that injects its own layers (peft's `add_adapter` / `load_lora_weights`) or copies
    and saves the UNet (DreamBooth) needs plain `nn.Linear`s; peft refuses an `AdaptedLinear`
    target, and a copied UNet would save `...base_layer.weight` keys. Putting the same objects
    back (rather than re-injecting) keeps the adapters that live on them (e.g. the batch
    generator's cached per-sample adapters) valid. Whatever the block left at those names (even a
    half-injected peft layer) is replaced by the wrapper.

    Raises:
        IncompatibleAdapterError: a wrapper has a merged or active adapter (taking it out would
            change the model's output).
    """
    found = adapted_layers(pipe)
    for name, layer in found.items():
        if layer.merged_adapters or layer.active_adapters():
            raise IncompatibleAdapterError(
                f"layer {name!r} must have no merged or active adapter to be detached, got "
                f"merged {layer.merged_adapters}, active {layer.active_adapters()}")
    for name, layer in found.items():
        parent, child, _ = _resolve(pipe, name)
        setattr(parent, child, layer.base_layer)
    try:
        yield len(found)
    finally:
        for name, layer in found.items():
            parent, child, _ = _resolve(pipe, name)
            setattr(parent, child, layer)
