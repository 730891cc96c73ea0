"""Saving a trained hypernetwork: `.safetensors` (+ config JSON in metadata) and ONNX.

The ONNX graph is the whole photo-to-weights path after face alignment: its inputs are
`onnx_input_names(config)`, i.e. "pixels" (N, 3, R, R) for the pixel condition and/or "faces"
(N, 3, 112, 112) aligned faces for the identity condition, whose frozen face encoder
(hypernet.face_encoder) is inside the graph. The `.safetensors` file holds the hypernetwork only;
the torch runtime loads the face encoder beside it from its own file.

Both files describe themselves: the same metadata (hypernetwork config, LiDB spec, layer names,
base fingerprint, base resolution) goes into the safetensors header and the ONNX
`metadata_props`, so either file alone tells a caller which base it was trained for.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.adapters.lidb.io import FORMAT_VERSION, encode_metadata
from hypernet.errors import IncompatibleAdapterError, InvalidInputError, ModelNotFoundError
from hypernet.files import atomic_write_bytes
from hypernet.hypernetwork.config import HypernetConfig
from hypernet.hypernetwork.model import HyperNetwork
from hypernet.personalize_config import check_prediction_scale

log = logging.getLogger(__name__)

FORMAT = "hdb.hypernet"
SAFETENSORS_NAME = "hypernet.safetensors"
ONNX_NAME = "hypernet.onnx"


@dataclass
class HypernetInfo:
    """What a hypernetwork file says about itself (everything but the weights)."""

    config: HypernetConfig
    spec: LiDBSpec
    layers: list[str]
    base_fingerprint: str
    resolution: int
    metadata: dict[str, str] = field(default_factory=dict)
    #: The base family it predicts for (`hypernet.base.arch.ARCHS`). Files written before other
    #: families existed lack the key: they were all trained on SD 1.x/2.x.
    arch: str = "sd15"
    #: How much `personalize` multiplies the predicted delta_W by, unless told otherwise. A
    #: hypernetwork trained by regression onto per-photo stage-1 targets predicts their
    #: conditional mean, shrunk towards the average adapter; the scale that scores best on
    #: held-out people is a property of the trained network, so it travels in its file
    #: (`hdb pretrain export --set export.prediction_scale=S`). Files without the key: 1.
    prediction_scale: float = 1.0

    def to_metadata(self) -> dict[str, str]:
        extra = {"config": self.config.to_json(), "resolution": str(self.resolution), "arch": self.arch,
                 "prediction_scale": repr(float(self.prediction_scale))}
        return encode_metadata(self.spec, self.layers, self.base_fingerprint, fmt=FORMAT, extra=extra)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str) -> HypernetInfo:
        """Raises InvalidInputError (not a hypernetwork file) / IncompatibleAdapterError (version)."""
        if meta.get("format") != FORMAT:
            raise InvalidInputError(f"{source} must be a {FORMAT} file, got format {meta.get('format')!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise IncompatibleAdapterError(
                f"{source} must have format_version {FORMAT_VERSION}, got {meta.get('format_version')!r}"
            )
        return cls(
            config=HypernetConfig.from_json(meta["config"]),
            spec=LiDBSpec.from_json(meta["spec"]),
            layers=meta["layers"].split(",") if meta.get("layers") else [],
            base_fingerprint=meta["base_fingerprint"],
            resolution=int(meta["resolution"]),
            metadata=dict(meta),
            arch=meta.get("arch", "sd15"),
            prediction_scale=_scale_of(meta, source),
        )

    def check(self) -> None:
        from hypernet.base.arch import ARCHS

        if self.arch not in ARCHS:
            raise InvalidInputError(f"hypernetwork `arch` must be one of {ARCHS}, got {self.arch!r}")
        check_prediction_scale(self.prediction_scale)
        c = self.config
        if (c.num_layers, c.a, c.b, c.r) != (len(self.layers), self.spec.a, self.spec.b, self.spec.r):
            raise InvalidInputError(
                f"hypernetwork config must predict the spec's geometry (L={len(self.layers)}, "
                f"a={self.spec.a}, b={self.spec.b}, r={self.spec.r}), got L={c.num_layers}, "
                f"a={c.a}, b={c.b}, r={c.r}"
            )


def _scale_of(meta: dict[str, str], source: str) -> float:
    raw = meta.get("prediction_scale", "1.0")
    try:
        return check_prediction_scale(float(raw))
    except (ValueError, InvalidInputError) as e:
        raise InvalidInputError(f"{source} must have a `prediction_scale` number in [0, 100], got {raw!r}") from e


def save_hypernet(path: str | Path, model: HyperNetwork, info: HypernetInfo,
                  extra_meta: dict[str, str] | None = None) -> Path:
    """Atomically write the model's weights (fp32) with `info` (+ `extra_meta`) as metadata."""
    info.check()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    data = st_save(tensors, metadata={**info.to_metadata(), **(extra_meta or {})})
    return atomic_write_bytes(path, data)


def read_info(path: str | Path) -> HypernetInfo:
    """The metadata of a `.safetensors` or `.onnx` hypernetwork file, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"`hypernet` must be an existing hypernetwork file, got {str(path)!r}")
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
    else:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                meta = dict(json.loads(f.read(n)).get("__metadata__", {}))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InvalidInputError(f"{path} must be a .safetensors hypernetwork, got unreadable data") from e
    return HypernetInfo.from_metadata(meta, str(path))


def load_hypernet(path: str | Path, device: str | torch.device = "cpu") -> tuple[HyperNetwork, HypernetInfo]:
    """Rebuild the model from a `.safetensors` file alone (eval mode, fp32)."""
    path = Path(path)
    info = read_info(path)
    try:
        state = st_load(path.read_bytes())
    except SafetensorError as e:
        raise InvalidInputError(f"{path} must be a .safetensors hypernetwork, got unreadable data ({e})") from e
    # The encoder's own weights are in `state`: never re-read encoder_weights (it may be elsewhere).
    cfg = HypernetConfig(**{**_asdict(info.config), "encoder_weights": None})
    model = HyperNetwork(cfg)
    model.load_state_dict(state, strict=True)
    model.cfg = info.config
    return model.to(device).eval(), info


ONNX_EXPORTERS = ("torchscript", "dynamo")


def onnx_input_names(cfg: HypernetConfig) -> tuple[str, ...]:
    """The ONNX graph's inputs for `cfg.condition`: ("pixels",), ("faces",) or ("pixels", "faces")."""
    return (("pixels",) if cfg.uses_pixels else ()) + (("faces",) if cfg.uses_identity else ())


def export_onnx(model: HyperNetwork, info: HypernetInfo, path: str | Path, opset: int = 18,
                exporter: str = "torchscript", face_encoder: torch.nn.Module | None = None) -> Path:
    """Write an ONNX graph (pixels and/or faces, see `onnx_input_names`) -> A_train, B_train with a
    dynamic batch dim.

    Args:
        exporter: "torchscript" (default: ~1 s for the tiny model) or "dynamo" (torch's newer
            exporter; ~30 s on 2 cores for the same graph, same outputs within 1e-7).
            Either way the example batch is 2: dynamo specialises a batch of 1 to a constant.
        face_encoder: the frozen face encoder put in front of an identity-conditioned model
            (default: `FaceEncoder.load()`); unused for the pixel condition.

    Raises:
        InvalidInputError: unknown exporter, or "torchscript" for a model over 2 GB.
    """
    import onnx

    if exporter not in ONNX_EXPORTERS:
        raise InvalidInputError(f"`exporter` must be one of {ONNX_EXPORTERS}, got {exporter!r}")
    path = Path(path)
    model = model.to("cpu").float().eval()
    cfg = model.cfg
    inputs = onnx_input_names(cfg)
    if cfg.uses_identity and face_encoder is None:
        from hypernet.face_encoder import FaceEncoder

        face_encoder = FaceEncoder.load()
    wrapper = _OnnxWrapper(model, face_encoder.to("cpu").eval() if cfg.uses_identity else None)
    shapes = {"pixels": (2, 3, info.resolution, info.resolution), "faces": (2, 3, 112, 112)}
    example = tuple(torch.zeros(shapes[n]) for n in inputs)  # batch 2 each
    names = dict(input_names=list(inputs), output_names=["A_train", "B_train"], opset_version=opset)
    meta = info.to_metadata()
    large = sum(p.numel() * 4 for p in model.parameters()) > _PROTOBUF_LIMIT
    if large and exporter != "dynamo":
        raise InvalidInputError(f"`exporter` must be 'dynamo' for a model over 2 GB, got {exporter!r}")
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the shape checks in `encode`; shapes are fixed except the batch.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torchscript exporter: see `exporter`
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per initializer
            program = torch.onnx.export(
                wrapper, example, None, dynamic_shapes=tuple({0: batch} for _ in inputs),
                external_data=False, dynamo=True, verbose=False, **names,
            )
            program.model.metadata_props.update(meta)
            if large:  # e.g. a ViT-H encoder: protobuf cannot hold 2 GB, weights go beside the graph
                program.save(str(path), external_data=True)
                log.info("wrote ONNX hypernetwork %s (+ external data, dynamo exporter)", path)
                return path
            proto = program.model_proto
        else:
            buf = io.BytesIO()
            axes = {n: {0: "batch"} for n in (*inputs, "A_train", "B_train")}
            torch.onnx.export(wrapper, example, buf, dynamic_axes=axes, dynamo=False,
                              **names)
            proto = onnx.load_from_string(buf.getvalue())
            for k, v in meta.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = k, v
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    log.info("wrote ONNX hypernetwork %s (%d bytes, %s exporter)", path, len(data), exporter)
    return path


#: protobuf cannot serialise a message of 2 GiB or more; stay well below.
_PROTOBUF_LIMIT = 1_800_000_000


class _OnnxWrapper(torch.nn.Module):
    """(pixels and/or faces, in `onnx_input_names` order) -> (A_train, B_train): a tuple, since ONNX
    outputs are positional; the face encoder runs in front for the identity condition."""

    def __init__(self, model: HyperNetwork, face_encoder: torch.nn.Module | None):
        super().__init__()
        self.model = model
        self.face_encoder = face_encoder
        self.inputs = onnx_input_names(model.cfg)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        named = dict(zip(self.inputs, xs, strict=True))
        identity = self.face_encoder(named["faces"]) if self.face_encoder is not None else None  # (N, 512)
        out = self.model(named.get("pixels"), identity)
        return out["A_train"], out["B_train"]


def _asdict(cfg: HypernetConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


__all__ = ["FORMAT", "ONNX_EXPORTERS", "ONNX_NAME", "SAFETENSORS_NAME", "HypernetInfo", "export_onnx", "load_hypernet",
           "onnx_input_names", "read_info", "save_hypernet"]
