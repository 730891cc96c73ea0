"""Every supported base at real shape (meta device): LiDB layers, trainable parameters, file bytes.

For SD 1.5, SDXL base 1.0, SD3-medium and FLUX.1-dev/schnell (`hypernet.base.real_configs`), the
denoiser is built on the meta device (no memory, no weights), the family's default LiDB spec is
attached by the library (`default_spec_for`), and the artifacts are saved with the library's own
writers from zero tensors of the real shapes and layer names, so the byte counts are real files:
- the LiDB file (`save_lidb`) and the hypernetwork-only identity (`Identity.save`, LiDB alone);
- the HyperDreamBooth identity after the fast fine-tune: with relax="subspace" (the default) the
  LiDB core at rank 4 inside the same aux bases; with relax="lora" the rank-1 LiDB plus a rank-4
  LoRA over the full layer dimensions;
- the standard LoRA export (diffusers keys, rank r = 1: B_aux·B_train, A_train·A_aux per layer);
- the LiDB file at the paper's a = b = 100, to show why a family's default differs from it;
- the hypernetwork of the family's GPU config, heads sized from that spec (parameters, outputs,
  forward FLOPs on the meta device), and one denoiser forward's FLOPs at the native size.
Sizes do not depend on tiny mode: both modes measure the real shapes (a few seconds).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchContext, Outcome, ratio

log = logging.getLogger(__name__)

NAME = "bases_scale"
RELAXED_RANK = 4  # PersonalizeConfig().rank: the subspace core's rank (or the relaxed LoRA's)
FINGERPRINT = "0" * 16
IDENTITY_BUDGET_BYTES = 250_000  # issue 17: an identity at r = 1 stays under about 250 KB


def base_sizes(name: str, work: Path, full: bool = True) -> dict[str, Any]:
    """One base's denoiser size, default LiDB spec and the bytes of each artifact.

    `full=False` (the test's setting) skips the large files: the identities after the fine-tune,
    the LoRA export and the a = b = 100 variant."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from hypernet.adapters import LiDB, LiDBSpec, default_spec_for, save_lidb, uninject
    from hypernet.adapters.lidb.model import lidb_layers
    from hypernet.base.arch import denoiser
    from hypernet.base.real_configs import arch_of, meta_base
    from hypernet.identity import Identity

    ns = meta_base(name)
    net = denoiser(ns)
    spec = default_spec_for(ns)
    handle = LiDB(ns, spec)
    layers, params = list(handle.layer_names), handle.num_parameters()
    shapes = [(m.base_layer.in_features, m.base_layer.out_features) for m in handle.layers.values()]
    uninject(ns)
    L = len(layers)
    lidb = {"A_train": torch.zeros(L, spec.r, spec.a),  # (L, r, a)
            "B_train": torch.zeros(L, spec.b, spec.r)}  # (L, b, r)
    out_dir = work / name
    out_dir.mkdir(parents=True, exist_ok=True)
    lidb_bytes = save_lidb(out_dir / "lidb.safetensors", lidb, spec, layers, FINGERPRINT)
    relaxed = {}
    for i, (n_in, n_out) in enumerate(shapes if full else []):
        relaxed[f"{i}.A"] = torch.zeros(RELAXED_RANK, n_in)  # (R, n_in)
        relaxed[f"{i}.B"] = torch.zeros(n_out, RELAXED_RANK)  # (n_out, R)
    sub_spec = dataclasses.replace(spec, r=RELAXED_RANK)  # relax="subspace": the same aux bases, rank R
    sub = {"A_train": torch.zeros(L, RELAXED_RANK, spec.a),  # (L, R, a)
           "B_train": torch.zeros(L, spec.b, RELAXED_RANK)}  # (L, b, R)
    ident = {}
    kinds = (("hypernetwork_only_identity", spec, lidb, {}), ("hyperdreambooth_identity", sub_spec, sub, {}),
             ("hyperdreambooth_identity_relax_lora", spec, lidb, relaxed))
    for label, sp, core, rel in kinds if full else kinds[:1]:
        obj = Identity(spec=sp, layers=layers, shapes=shapes, base_fingerprint=FINGERPRINT, lidb=core, relaxed=rel)
        ident[label] = {"params": sum(v.numel() for v in [*core.values(), *rel.values()]),
                        "bytes": obj.save(out_dir / f"{label}.safetensors")}
    by_kind: dict[str, int] = {}
    for layer in layers:
        kind = "to_out.0" if layer.endswith("to_out.0") else layer.rsplit(".", 1)[-1]
        by_kind[kind] = by_kind.get(kind, 0) + 1
    out = {
        "arch": arch_of(name),
        "denoiser": type(net).__name__,
        "denoiser_params": sum(p.numel() for p in net.parameters()),
        "layers": L,
        "layers_by_projection": by_kind,
        "narrowest_layer": min(min(s) for s in shapes),
        "spec": {"a": spec.a, "b": spec.b, "r": spec.r},
        "lidb_params": params,
        "lidb_bytes": lidb_bytes,
        "hypernetwork_only_identity": ident["hypernetwork_only_identity"],
        "under_budget": ident["hypernetwork_only_identity"]["bytes"] < IDENTITY_BUDGET_BYTES,
    }
    if not full:
        return out
    lora = {}  # the diffusers-format export of the LiDB alone: rank r per layer
    for layer, (n_in, n_out) in zip(layers, shapes, strict=True):
        lora[f"{layer}.lora_A.weight"] = torch.zeros(spec.r, n_in)  # (r, n_in)
        lora[f"{layer}.lora_B.weight"] = torch.zeros(n_out, spec.r)  # (n_out, r)
    save_file(lora, out_dir / "lora_export.safetensors")
    paper = LiDBSpec(a=100, b=100, r=1)
    paper_layers = lidb_layers(ns, paper)
    paper_bytes = save_lidb(out_dir / "lidb_a100_b100.safetensors",
                            {"A_train": torch.zeros(len(paper_layers), 1, 100),
                             "B_train": torch.zeros(len(paper_layers), 100, 1)}, paper, paper_layers, FINGERPRINT)
    out.update({
        "hyperdreambooth_identity": ident["hyperdreambooth_identity"],  # relax="subspace", the default
        "hyperdreambooth_identity_relax_lora": ident["hyperdreambooth_identity_relax_lora"],
        "lora_export_bytes": (out_dir / "lora_export.safetensors").stat().st_size,
        "lidb_a100_b100": {"params": len(paper_layers) * 200, "bytes": paper_bytes},
    })
    return out


#: The pretraining config (pretrain/configs/) whose hypernetwork each family gets on a GPU.
GPU_CONFIG = {"sd15": "sd15-gpu", "sdxl": "sdxl-gpu", "sd3": "sd3-gpu", "flux": "flux-gpu"}


def hypernet_sizes(name: str) -> dict[str, Any]:
    """The family's GPU-config hypernetwork with heads sized from the base's default LiDB spec
    (`sized_for_base`), built and run on the meta device: parameters by part, outputs per identity,
    fp32 bytes and forward FLOPs (torch's FlopCounterMode; one photo at the encoder's size)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hypernet.base.real_configs import arch_of, meta_base
    from hypernet.hypernetwork import HyperNetwork, sized_for_base
    from pretrain.config import load_config

    config = GPU_CONFIG[arch_of(name)]
    heads = sized_for_base(meta_base(name), load_config(config).stage2.model)
    c = heads.config
    with torch.device("meta"):
        model = HyperNetwork(c)
        flops = FlopCounterMode(display=False)
        with flops:
            out = model(torch.zeros(1, 3, c.image_size, c.image_size))
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    head_params = model.head_weight.numel() + model.head_bias.numel()
    total = count([model])
    encoder = count([model.encoder, model.proj]) if model.encoder is not None else 0
    return {
        "config": config, "encoder": c.encoder, "image_size": c.image_size, "dim": c.dim, "depth": c.depth,
        "layers": c.num_layers, "a": c.a, "b": c.b, "r": c.r,
        "output_shapes": {k: list(v.shape[1:]) for k, v in out.items()},
        "outputs_per_identity": c.output_size,
        "params": total, "encoder_params": encoder, "head_params": head_params,
        "decoder_params": total - encoder - head_params,
        "fp32_bytes": total * 4, "forward_tflop": flops.get_total_flops() / 1e12,
    }


def denoiser_tflop(name: str) -> float:
    """TFLOPs of one denoiser forward at the family's native size (1024 px; SD 1.5 512 px), batch 1,
    counted on the meta device: what the GPU configs' cost estimates start from."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hypernet.base.real_configs import BASES, arch_of, meta_denoiser

    arch, cfg = arch_of(name), BASES[name][2]
    z = torch.zeros
    with torch.device("meta"):
        net = meta_denoiser(name)
        if arch == "sd15":
            call = lambda: net(z(1, 4, 64, 64), torch.tensor([500]), encoder_hidden_states=z(1, 77, 768))  # noqa: E731
        elif arch == "sdxl":
            call = lambda: net(z(1, 4, 128, 128), torch.tensor([500]), encoder_hidden_states=z(1, 77, 2048),  # noqa: E731
                               added_cond_kwargs={"text_embeds": z(1, 1280), "time_ids": z(1, 6)})
        elif arch == "sd3":  # 77 CLIP + 256 T5 tokens
            call = lambda: net(z(1, 16, 128, 128), encoder_hidden_states=z(1, 333, 4096),  # noqa: E731
                               pooled_projections=z(1, 2048), timestep=torch.tensor([500.0]))
        else:  # FLUX: 64x64 packed latents = 4,096 tokens + 512 T5 tokens
            guidance = torch.tensor([3.5]) if cfg["guidance_embeds"] else None
            call = lambda: net(z(1, 4096, 64), encoder_hidden_states=z(1, 512, 4096),  # noqa: E731
                               pooled_projections=z(1, 768), timestep=torch.tensor([0.5]), img_ids=z(4096, 3),
                               txt_ids=z(512, 3), guidance=guidance)
        flops = FlopCounterMode(display=False)
        with flops:
            call()
    return flops.get_total_flops() / 1e12


def run(ctx: BenchContext) -> Outcome:
    from hypernet.adapters.lidb.model import DEFAULT_AUX
    from hypernet.base.real_configs import BASES

    work = ctx.work_dir / "bases"
    results: dict[str, Any] = {}
    for name in BASES:
        results[name] = base_sizes(name, work)
        results[name]["hypernetwork"] = hypernet_sizes(name)
        results[name]["denoiser_forward_tflop"] = denoiser_tflop(name)
        log.info("bases_scale: %s %s", name, {k: results[name][k] for k in ("layers", "lidb_params", "lidb_bytes")})
    sd15 = results["sd15"]
    for r in results.values():
        r["identity_bytes_over_sd15"] = ratio(r["hypernetwork_only_identity"]["bytes"],
                                              sd15["hypernetwork_only_identity"]["bytes"])
    settings = {"bases": sorted(BASES), "default_aux": {k: list(v) for k, v in DEFAULT_AUX.items()},
                "relaxed_rank": RELAXED_RANK, "identity_budget_bytes": IDENTITY_BUDGET_BYTES,
                "device": "meta (shapes only)"}
    notes = [
        "Real-shape sizes on the meta device: the files are real (written by save_lidb / Identity.save / "
        "safetensors from zero tensors of the real shapes and layer names); nothing was trained or run.",
        "Default a = b per family (hypernet.adapters.lidb.model.DEFAULT_AUX): the paper's 100 where the "
        "identity stays under ~250 KB; SDXL adapts 560 layers, so 40. Every default layer is at least as wide as "
        "a and b, so no per-layer a/b is needed on these bases.",
        "Layer names are stored once in the file's metadata; on SDXL they are ~35 KB of the file.",
        "Hypernetwork per base: the family's GPU pretraining config (pretrain/configs/*-gpu.yaml) with its output "
        "heads sized from the base's default LiDB spec (hypernet.hypernetwork.heads.sized_for_base), built and run "
        "on the meta device; its outputs per identity are exactly the LiDB's parameters. FLOPs: torch "
        "FlopCounterMode (matmul/conv/attention), batch 1, on the meta device.",
    ]
    return Outcome(settings, results, notes)
