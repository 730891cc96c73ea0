"""Saving a trained hypernetwork: `.safetensors` (+ config JSON in metadata) and ONNX.

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

    def to_metadata(self) -> dict[str, str]:
        extra = {"config": self.config.to_json(), "resolution": str(self.resolution)}
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
        )

    def check(self) -> None:
        c = self.config
        if (c.num_layers, c.a, c.b, c.r) != (len(self.layers), self.spec.a, self.spec.b, self.spec.r):
            raise InvalidInputError(
                f"hypernetwork config must predict the spec's geometry (L={len(self.layers)}, "
                f"a={self.spec.a}, b={self.spec.b}, r={self.spec.r}), got L={c.num_layers}, "
                f"a={c.a}, b={c.b}, r={c.r}"
            )


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


def export_onnx(model: HyperNetwork, info: HypernetInfo, path: str | Path, opset: int = 18,
                exporter: str = "torchscript") -> Path:
    """Write an ONNX graph pixels (N, 3, R, R) -> A_train, B_train with a dynamic batch dim.

    Args:
        exporter: "torchscript" (default: ~1 s for the tiny model) or "dynamo" (torch's newer
            exporter; ~30 s on 2 cores for the same graph, same outputs within 1e-7).
            Either way the example batch is 2: dynamo specialises a batch of 1 to a constant.

    Raises:
        InvalidInputError: unknown exporter, or "torchscript" for a model over 2 GB.
    """
    import onnx

    if exporter not in ONNX_EXPORTERS:
        raise InvalidInputError(f"`exporter` must be one of {ONNX_EXPORTERS}, got {exporter!r}")
    path = Path(path)
    model = model.to("cpu").float().eval()
    example = torch.zeros(2, 3, info.resolution, info.resolution)  # (2, 3, R, R)
    names = dict(input_names=["pixels"], output_names=["A_train", "B_train"], opset_version=opset)
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
                _OnnxWrapper(model), (example,), None, dynamic_shapes={"pixels": {0: batch}},
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
            axes = {n: {0: "batch"} for n in ("pixels", "A_train", "B_train")}
            torch.onnx.export(_OnnxWrapper(model), (example,), buf, dynamic_axes=axes, dynamo=False,
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
    """Returns a tuple (ONNX outputs are positional)."""

    def __init__(self, model: HyperNetwork):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixels)
        return out["A_train"], out["B_train"]


def _asdict(cfg: HypernetConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


__all__ = ["FORMAT", "ONNX_EXPORTERS", "ONNX_NAME", "SAFETENSORS_NAME", "HypernetInfo", "export_onnx", "load_hypernet",
           "read_info", "save_hypernet"]
