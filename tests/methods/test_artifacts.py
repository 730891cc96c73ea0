"""`detect_kind` / `load_artifact`: artifacts are recognised by content, junk is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hypernet.errors import InvalidInputError, ModelNotFoundError
from hypernet.methods import detect_kind, get_method, load_artifact


@pytest.mark.parametrize(
    "tensors, meta, kind",
    [
        ({"ohwx": torch.zeros(2, 32)}, {"format": "pt"}, "textual-inversion"),
        ({"emb_params": torch.zeros(1, 32)}, {}, "textual-inversion"),
        (
            {"unet.a.to_q.lora.down.weight": torch.zeros(4, 32), "unet.a.to_q.lora.up.weight": torch.zeros(32, 4)},
            {},
            "lora",
        ),
        ({"lora_unet_a_to_q.lora_down.weight": torch.zeros(4, 32)}, {}, "lora"),
        ({"x.lora_A.weight": torch.zeros(4, 32), "x.lora_B.weight": torch.zeros(32, 4)}, {}, "lora"),
        ({"lidb.A_train": torch.zeros(1, 1, 2)}, {"format": "hdb.lidb"}, "lidb"),
        ({"lidb.A_train": torch.zeros(1, 1, 2)}, {"format": "hdb.identity"}, "identity"),
    ],
)
def test_kind_is_detected_from_content(tmp_path, tensors, meta, kind):
    path = tmp_path / "artifact.bin"  # the name says nothing
    save_file(tensors, str(path), metadata=meta)
    assert detect_kind(path) == kind


def test_dreambooth_directory_and_bad_inputs(tmp_path):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert detect_kind(tmp_path / "db") == "dreambooth"
    with pytest.raises(ModelNotFoundError, match="must be an existing"):
        load_artifact(tmp_path / "missing.safetensors")
    with pytest.raises(InvalidInputError, match="pipeline directory"):
        detect_kind(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello, I am not tensors")
    with pytest.raises(InvalidInputError, match="junk.safetensors"):
        load_artifact(junk)
    many = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.zeros(2, 2, 2) for i in range(3)}, str(many))
    with pytest.raises(InvalidInputError, match="LiDB, identity, LoRA or textual-inversion"):
        detect_kind(many)


@pytest.mark.parametrize("method, what", [("lora", "a LoRA .safetensors file"),
                                          ("textual-inversion", "an embedding .safetensors file")])
def test_artifact_class_names_what_an_unreadable_file_should_be(tmp_path, method, what):
    """Loading through the method's own artifact class (as `hdb generate --identity` does once
    the kind is known) says what the file must be, not a safetensors traceback."""
    junk = tmp_path / "torn.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidInputError, match=f"torn.safetensors must be {what}, got unreadable data"):
        get_method(method).artifact_cls.load(junk)


def test_registry_names_and_unknown_method():
    assert {get_method(n).name for n in ("lora", "LoRA", "textual_inversion", "dreambooth", "lidb")} == {
        "lora",
        "textual-inversion",
        "dreambooth",
        "lidb",
    }
    with pytest.raises(InvalidInputError, match="`method` must be one of"):
        get_method("hypernetwork-magic")
