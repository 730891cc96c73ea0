"""Single-file checkpoints: diffusers SD 1.x -> original (LDM) layout -> `load_pipeline` again.

No original-layout checkpoint exists offline, so the tiny base is written as one with
`save_single_file` and read back through diffusers' own single-file loader. At SD 1.5 shapes
(meta device: no memory) diffusers' converters serve as the independent oracle for the mapping.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hypernet.base import load_pipeline
from hypernet.base.single_file import diffusers_to_ldm, save_single_file
from hypernet.errors import InvalidInputError


@pytest.fixture(scope="module")
def single_file(tiny_base_dir, tmp_path_factory):
    pipe = load_pipeline(tiny_base_dir, device="cpu", dtype="fp32")
    return save_single_file(pipe, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def test_round_trip_through_diffusers_single_file_loader(tiny_pipe, tiny_base_dir, single_file):
    torch.manual_seed(0)
    loaded = load_pipeline(single_file, config_dir=tiny_base_dir, device="cpu", dtype="fp32")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: weights differ after the round trip"
    # Outputs, not only weights: the same modules must be rebuilt around them.
    ids = tiny_pipe.tokenizer(["a photo of ohwx person"], padding="max_length", max_length=77,
                              return_tensors="pt").input_ids               # (1, 77)
    assert torch.equal(ids, loaded.tokenizer(["a photo of ohwx person"], padding="max_length",
                                             max_length=77, return_tensors="pt").input_ids)
    with torch.no_grad():
        emb_a, emb_b = tiny_pipe.text_encoder(ids)[0], loaded.text_encoder(ids)[0]  # (1, 77, 32)
        torch.testing.assert_close(emb_a, emb_b, rtol=0, atol=0)
        z = torch.randn(2, 4, 8, 8)                                       # (B, 4, H/8, W/8)
        t = torch.tensor([10, 900])
        torch.testing.assert_close(tiny_pipe.unet(z, t, emb_a.expand(2, -1, -1)).sample,
                                   loaded.unet(z, t, emb_a.expand(2, -1, -1)).sample, rtol=0, atol=0)
        x = torch.rand(1, 3, 64, 64) * 2 - 1                              # (1, 3, H, W)
        lat_a = tiny_pipe.vae.encode(x).latent_dist.mean
        torch.testing.assert_close(lat_a, loaded.vae.encode(x).latent_dist.mean, rtol=0, atol=0)
        torch.testing.assert_close(tiny_pipe.vae.decode(lat_a).sample, loaded.vae.decode(lat_a).sample,
                                   rtol=0, atol=0)
    assert loaded.scheduler.config.beta_schedule == tiny_pipe.scheduler.config.beta_schedule


def test_keys_use_the_original_layout(tiny_pipe):
    sd = diffusers_to_ldm(tiny_pipe)
    n = sum(len(getattr(tiny_pipe, c).state_dict()) for c in ("unet", "vae", "text_encoder"))
    assert len(sd) == n, "one original key per diffusers tensor"
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in sd)
    # The tiny UNet: level 0 with attention + downsample, level 1 plain; layers_per_block 1.
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.input_blocks.2.0.op.weight",
                "model.diffusion_model.input_blocks.3.0.skip_connection.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.1.1.conv.weight",   # plain level: upsample at .1
                "model.diffusion_model.output_blocks.3.1.norm.weight",
                "model.diffusion_model.time_embed.2.weight",
                "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "first_stage_model.encoder.down.0.downsample.conv.weight",
                "first_stage_model.encoder.norm_out.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in sd, key
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4, "LDM VAE attention is 1x1 conv"
    assert sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 32)


def test_sd15_shapes_match_diffusers_own_converters():
    """At SD 1.5 shapes: the keys diffusers uses to recognise an SD 1.x file are there, and
    diffusers' ldm->diffusers converters map the file back onto every model key and shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # architecture from /work/shared/reference/sd15-architecture.md
        unet = UNet2DConditionModel(
            sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=8, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768))
    sd = diffusers_to_ldm(SimpleNamespace(unet=unet, vae=vae, text_encoder=text))
    assert CHECKPOINT_KEY_NAMES["v1"] in sd
    assert sd[CHECKPOINT_KEY_NAMES["v2"]].shape[-1] == 768       # 1024 would read as SD 2.x
    assert sd[CHECKPOINT_KEY_NAMES["inpainting"]].shape[1] == 4  # 9 would read as inpainting
    assert CHECKPOINT_KEY_NAMES["clip"] in sd
    for model, back in ((unet, convert_ldm_unet_checkpoint(sd, dict(unet.config))),
                        (vae, convert_ldm_vae_checkpoint(sd, dict(vae.config)))):
        want = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in back.items()} == want
    back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in text.state_dict().items()}


def test_hdb_base_to_single_file(tiny_base_dir, tmp_path):
    from safetensors import safe_open

    from hdb.cli import main

    out = tmp_path / "base.safetensors"
    assert main(["base", "to-single-file", str(tiny_base_dir), str(out), "--dtype", "fp16"]) == 0
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype == torch.float16
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    pipe = load_pipeline(out, config_dir=tiny_base_dir, device="cpu", dtype="fp32")
    assert pipe.unet.dtype == torch.float32


def test_rejects_what_the_sd1_layout_cannot_hold(tiny_pipe, tmp_path, single_file):
    from diffusers import UNet2DConditionModel

    from hypernet.base.tiny import tiny_unet_config

    with pytest.raises(InvalidInputError, match=r"`path` must end in \.safetensors"):
        save_single_file(tiny_pipe, tmp_path / "base.ckpt")
    tiny_pipe.unet = UNet2DConditionModel(**tiny_unet_config(), class_embed_type="timestep")
    with pytest.raises(InvalidInputError, match="class_embed_type"):
        diffusers_to_ldm(tiny_pipe)
    with pytest.raises(InvalidInputError, match="`config_dir` must be a local diffusers directory"):
        load_pipeline(single_file, device="cpu")
