"""`PipelineGuard`: after every job, the shared pipeline is checked to be the base again, and
repaired (or reloaded) when it is not.

The model worker runs every job on one shared pipeline. A method that fails half-way (peft's
`add_adapter` raising mid-injection, a swapped-in UNet not swapped back, a merged adapter, a
Textual Inversion token not removed) would otherwise change every later caller's images, or make
every later job fail. What "the base" means here:
- the same denoiser (`unet`/`transformer`), text encoders and `vae` objects as at load, in the
  same train/eval mode,
  with the same parameters trainable (requires_grad) as at load;
- the same module structure (names and types; an `AdaptedLinear` counts as the layer it wraps,
  because the service keeps idle wrappers on purpose: they carry the batch generator's cached
  adapters), no peft layers and no `peft_config`;
- no merged and no active adapter on any `AdaptedLinear`;
- the same tokenizer length and text-embedding rows, and the same `base_fingerprint`.

`check()` lists what differs; `repair()` undoes what it can in place and says what it found; the
engine reloads the base from disk when the repair is not enough.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hypernet.adapters import AdaptedLinear, adapted_layers, delete_adapter
from hypernet.base import base_fingerprint
from hypernet.batch_generate import BATCH_LIDB, BATCH_RELAXED

#: Adapters the service keeps on idle wrappers between jobs (disabled); any other is a leftover.
PERSISTENT_ADAPTERS = frozenset({BATCH_LIDB, BATCH_RELAXED})
#: Every weight-holding component of the four families (SD 1.x/2.x, SDXL, SD3, FLUX); absent ones
#: are skipped.
MODEL_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
#: (tokenizer, text encoder) pairs whose vocabulary Textual Inversion may grow (SDXL: both CLIPs).
_TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def _is_peft_layer(m: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft in this build: nothing can have added its layers
        return False
    return isinstance(m, BaseTunerLayer)


def _structure(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """(module path, type name) of every module, an `AdaptedLinear` as the layer it wraps."""
    out: list[tuple[str, str]] = []
    skip: tuple[str, ...] = ()
    for path, m in model.named_modules():
        if skip and path.startswith(skip):
            continue
        if isinstance(m, AdaptedLinear):
            out.append((path, type(m.base_layer).__name__))
            skip = (f"{path}.",)
            continue
        out.append((path, type(m).__name__))
    return tuple(out)


def _base_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's own parameters (not those of adapters living in `AdaptedLinear` wrappers)."""
    return {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()
            if ".adapters." not in n}


def _mode(model: nn.Module) -> tuple[bool, int]:
    return model.training, sum(p.requires_grad for p in _base_params(model).values())


def _vocab(pipe) -> tuple[int, ...]:
    """(tokenizer length, text embedding rows) of each CLIP pair the pipeline has, flattened."""
    out: list[int] = []
    for tok_name, te_name in _TEXT_PAIRS:
        tok, te = getattr(pipe, tok_name, None), getattr(pipe, te_name, None)
        if tok is None and te is None:
            continue
        out += [len(tok) if tok is not None else 0,
                int(te.get_input_embeddings().weight.shape[0]) if te is not None else 0]
    return tuple(out)


@dataclass(frozen=True)
class _Snapshot:
    models: dict[str, nn.Module]  # the objects loaded
    modes: dict[str, tuple[bool, int]]  # per model: training, number of requires_grad tensors
    structure: dict[str, tuple[tuple[str, str], ...]]
    vocab: tuple[int, ...]  # per CLIP pair: tokenizer length, text embedding rows
    fingerprint: str


class PipelineGuard:
    """A snapshot of the freshly loaded pipeline, and the check/repair against it."""

    def __init__(self, pipe):
        self.pipe = pipe
        models = {k: getattr(pipe, k) for k in MODEL_COMPONENTS if getattr(pipe, k, None) is not None}
        self._grad_flags = {k: {n: p.requires_grad for n, p in _base_params(m).items()}
                            for k, m in models.items()}
        self.base = _Snapshot(models, {k: _mode(m) for k, m in models.items()},
                              {k: _structure(m) for k, m in models.items()},
                              _vocab(pipe), base_fingerprint(pipe))

    def check(self) -> list[str]:
        """What differs from the base (empty: the pipeline is the base)."""
        pipe, base, problems = self.pipe, self.base, []
        for name, model in base.models.items():
            now = getattr(pipe, name, None)
            if now is not model:
                problems.append(f"pipe.{name} is not the base's {name} (swapped, not restored)")
                continue
            if getattr(model, "peft_config", None) or any(map(_is_peft_layer, model.modules())):
                problems.append(f"{name} carries peft adapters")
            elif _structure(model) != base.structure[name]:
                problems.append(f"{name}'s module structure differs from the base")
            elif _mode(model) != base.modes[name]:
                problems.append(f"{name}'s (training, trainable tensors) is {_mode(model)}, "
                                f"base {base.modes[name]}")
        for name, layer in adapted_layers(pipe).items():
            if layer.merged_adapters:
                problems.append(f"{name} has merged adapters {layer.merged_adapters}")
            extra = [a for a in layer.adapters if a not in PERSISTENT_ADAPTERS]
            if extra or layer.active_adapters():
                problems.append(f"{name} has leftover or active adapters "
                                f"{sorted(set(extra) | set(layer.active_adapters()))}")
        if _vocab(pipe) != base.vocab:
            problems.append(f"tokenizer/text embeddings are {_vocab(pipe)}, base {base.vocab}")
        if not problems and base_fingerprint(pipe) != base.fingerprint:
            problems.append("the base fingerprint changed (base weights were modified)")
        return problems

    def repair(self) -> list[str]:
        """Undo what can be undone in place; returns the problems found before (empty: none).

        Swapped models go back, peft layers come out, merges are undone, leftover adapters are
        deleted and the persistent ones disabled, models get their train/eval mode and
        requires_grad flags back. A changed vocabulary or fingerprint cannot be undone here: `check()` still
        reports it afterwards, and the caller reloads the base.
        """
        problems = self.check()
        if not problems:
            return []
        pipe = self.pipe
        for name, model in self.base.models.items():
            setattr(pipe, name, model)
            _remove_peft(model)
            training, _ = self.base.modes[name]
            model.train(training)
            flags = self._grad_flags[name]
            for n, p in _base_params(model).items():
                p.requires_grad_(flags.get(n, False))
        for layer in adapted_layers(pipe).values():
            while layer.merged_adapters:
                layer.unmerge()
        for name in {a for layer in adapted_layers(pipe).values() for a in layer.adapters}:
            if name not in PERSISTENT_ADAPTERS:
                delete_adapter(pipe, name)
        for layer in adapted_layers(pipe).values():
            layer.disabled.update(layer.adapters.keys())
        return problems


def _remove_peft(model: nn.Module) -> None:
    """Every peft layer and peft's bookkeeping out of `model`, whatever state it is in."""
    if getattr(model, "peft_config", None) is None and not any(map(_is_peft_layer, model.modules())):
        return
    from diffusers.utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    for attr in ("peft_config",):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
