"""The parts every method shares (`MethodConfig`, `personaliser`): each method keeps its own
default schedule and checks, the flat shortcuts reach `train`, and the one `train` entry point
has the `Personaliser` signature and checks the token before it touches the pipeline."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from hypernet.errors import InvalidInputError
from hypernet.methods import METHOD_NAMES, Personaliser, get_method
from hypernet.methods.config import MethodConfig

#: Each method's published schedule (README "Classic methods"): (steps, lr).
DEFAULT_SCHEDULE = {
    "dreambooth": (1000, 5e-6),
    "textual-inversion": (3000, 5e-4),
    "lora": (500, 1e-4),
    "lidb": (400, 3e-3),  # measured on the face world: eval_v2/DIAGNOSIS.md section 9
}
#: One setting per method that its own `__post_init__` must reject.
BAD_SETTING = {
    "dreambooth": dict(num_class_images=0),
    "textual-inversion": dict(num_vectors=17),
    "lora": dict(rank=0),
    "lidb": dict(a=0),
}


def test_the_table_covers_the_registry():
    assert set(DEFAULT_SCHEDULE) == set(BAD_SETTING) == set(METHOD_NAMES)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_config_keeps_its_defaults_and_takes_the_shortcuts(name):
    cls = get_method(name).config_cls
    assert issubclass(cls, MethodConfig)
    default = cls()
    assert (default.train.steps, default.train.lr) == DEFAULT_SCHEDULE[name]
    cfg = cls(steps=3, lr=0.25, seed=9)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.seed) == (3, 0.25, 9)
    # what `hdb train` does to apply its flags: the shortcuts survive a replace
    again = dataclasses.replace(cfg, train=cfg.train.with_overrides(batch_size=2))
    assert (again.train.steps, again.train.lr, again.train.seed, again.train.batch_size) == (3, 0.25, 9, 2)
    with pytest.raises(InvalidInputError, match="must be"):
        cls(**BAD_SETTING[name])


def test_the_base_states_no_schedule_of_its_own():
    with pytest.raises(TypeError, match="train"):
        MethodConfig()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_train_has_the_personaliser_signature_and_checks_the_token_first(name):
    method = get_method(name)
    ours = inspect.signature(method.train)
    assert list(ours.parameters) == [p for p in inspect.signature(Personaliser.__call__).parameters if p != "self"] + [
        "should_stop",
        "checkpoint_dir",
        "detector",
    ]
    assert ours.parameters["token"].default == "ohwx" and ours.parameters["class_noun"].default == "person"
    assert ours.parameters["config"].annotation == f"{method.config_cls.__name__} | None"
    assert ours.return_annotation == method.artifact_cls.__name__
    assert method.train.__doc__ and method.train.__module__.startswith("hypernet.methods.")
    # no pipeline and no photos: the token check must come before either is touched
    with pytest.raises(InvalidInputError, match="`token` must be one word"):
        method.train(None, None, token="two words")
