"""`HypernetRuntime`: run an exported hypernetwork with onnxruntime or torch, same interface.

    rt = HypernetRuntime.load("runs/x/export")          # dir, .safetensors or .onnx
    rt.check_base(pipe)                                  # same base + layers as it was trained for?
    weights = rt.predict(pixels)                         # (N, 3, R, R) in [-1, 1]
    weights = rt.predict(pixels, faces=rt.faces_for(imgs))  # identity condition: faces of the photos
    lidb.use(weights)                                    # {"A_train": (N, L, r, a), "B_train": ...}
    weights = rt.decode(rt.encode(pixels).mean(0, keepdim=True))  # several photos: mean of condition tokens

`encode`/`decode` run the torch model: the ONNX graph is one piece (photo -> weights), so an ONNX
runtime loads the torch weights beside it (hypernet.safetensors) the first time they are asked for.

An identity-conditioned hypernetwork (`config.condition` "identity"/"both") also needs the photo's
face aligned to 112x112 (hypernet.face_alignment). Callers that still have the photo pass
`faces=` (best: aligned at the photo's full resolution, as pretraining's embedding cache does);
otherwise the faces are aligned from `pixels` (the R x R face crop), which works but sees fewer
pixels. ONNX: the face encoder is inside the graph; torch: it is loaded beside the hypernetwork
(hypernet.face_encoder.FaceEncoder, found by $HDB_FACE_ENCODER or `make setup`'s cache).

onnxruntime gets the CUDA provider only when torch sees a GPU (asking for it without CUDA logs an
error), else the CPU provider; thread spinning is off because it slows torch running in the same
process on small machines (environment-notes.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from hypernet.adapters.lidb.config import LiDBSpec
from hypernet.device import resolve_device
from hypernet.errors import IncompatibleAdapterError, InvalidInputError, ModelNotFoundError
from hypernet.hypernetwork.config import HypernetConfig
from hypernet.hypernetwork.export import ONNX_NAME, SAFETENSORS_NAME, HypernetInfo, load_hypernet, read_info

log = logging.getLogger(__name__)

Backend = Literal["auto", "onnx", "torch"]


class HypernetRuntime:
    """A loaded hypernetwork; build it with `HypernetRuntime.load`."""

    def __init__(self, info: HypernetInfo, backend: str, device: torch.device, session=None, model=None,
                 face_encoder=None, torch_path: Path | None = None):
        self.info = info
        self.backend = backend
        self.device = device
        self._session = session
        self._model = model
        self._face_encoder = face_encoder
        self._torch_path = torch_path  # ONNX backend: the safetensors beside it, loaded on demand

    # --- what a caller checks against its base -------------------------------------------------
    @property
    def spec(self) -> LiDBSpec:
        return self.info.spec

    @property
    def layers(self) -> list[str]:
        return self.info.layers

    @property
    def base_fingerprint(self) -> str:
        return self.info.base_fingerprint

    @property
    def resolution(self) -> int:
        return self.info.resolution

    @property
    def config(self) -> HypernetConfig:
        return self.info.config

    @property
    def prediction_scale(self) -> float:
        """The scale `personalize` applies to this network's predictions by default (its file's)."""
        return self.info.prediction_scale

    @property
    def needs_faces(self) -> bool:
        """True for an identity-conditioned hypernetwork: `predict` uses aligned faces."""
        return self.info.config.uses_identity

    @classmethod
    def load(cls, path: str | Path, backend: Backend = "auto",
             device: str | torch.device | None = None) -> HypernetRuntime:
        """Load from an export folder (hypernet.onnx and/or hypernet.safetensors) or one file.

        backend "auto" prefers ONNX when an .onnx file is there, else torch.

        Raises:
            ModelNotFoundError: no hypernetwork file at `path` for the backend asked for.
            InvalidInputError: unknown backend, or not a hypernetwork file.
        """
        if backend not in ("auto", "onnx", "torch"):
            raise InvalidInputError(f"`backend` must be 'auto', 'onnx' or 'torch', got {backend!r}")
        onnx_path, st_path = _locate(Path(path))
        auto = backend == "auto"
        if auto:
            backend = "onnx" if onnx_path is not None else "torch"
        dev = resolve_device(device)
        if backend == "onnx":
            if onnx_path is None:
                raise ModelNotFoundError(
                    f"`path` must hold an .onnx hypernetwork for backend 'onnx', got {str(path)!r}"
                )
            try:
                return cls._load_onnx(onnx_path, dev, st_path)
            except Exception as e:  # onnxruntime raises its own (pybind) types for corrupt files, bad opsets
                if not (auto and st_path is not None):
                    raise InvalidInputError(
                        f"`path` must hold an ONNX hypernetwork onnxruntime can load, got {str(onnx_path)!r}: "
                        f"{type(e).__name__}: {e}; re-export it (hdb pretrain export) or use backend='torch'"
                    ) from e
                # a service must not refuse to start over a broken optional file: the weights are there
                log.warning("hypernetwork %s failed to load in onnxruntime (%s: %s); using torch with %s",
                            onnx_path, type(e).__name__, e, st_path)
        if st_path is None:
            raise ModelNotFoundError(
                f"`path` must hold a .safetensors hypernetwork for backend 'torch', got {str(path)!r}"
            )
        model, info = load_hypernet(st_path, device=dev)
        face_encoder = None
        if info.config.uses_identity:
            from hypernet.face_encoder import FaceEncoder

            face_encoder = FaceEncoder.load().to(dev)
        log.info("hypernetwork %s on torch (%s)", st_path, dev)
        return cls(info, "torch", dev, model=model, face_encoder=face_encoder)

    @classmethod
    def _load_onnx(cls, path: Path, dev: torch.device, torch_path: Path | None = None) -> HypernetRuntime:
        import onnxruntime as ort

        info = read_info(path)
        providers = ["CPUExecutionProvider"]
        if torch.cuda.is_available() and dev.type == "cuda":
            opts = {"device_id": dev.index or 0}
            providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), so, providers=providers)
        log.info("hypernetwork %s on onnxruntime (%s)", path, session.get_providers()[0])
        return cls(info, "onnx", dev, session=session, torch_path=torch_path)

    @property
    def arch(self) -> str:
        """The base family it was trained for: "sd15", "sdxl", "sd3" or "flux"."""
        return self.info.arch

    def check_base(self, pipe) -> None:
        """Raise `IncompatibleAdapterError` unless `pipe` is the base this was trained for.

        The family is checked first, so a hypernetwork of another family (say an SDXL one given
        a FLUX base) is named as such rather than as a fingerprint mismatch.
        """
        from hypernet.adapters.lidb.model import lidb_layers
        from hypernet.base.arch import pipeline_arch
        from hypernet.base.loading import base_fingerprint

        arch = pipeline_arch(pipe)
        if arch != self.arch:
            raise IncompatibleAdapterError(
                f"hypernetwork must be used with a base of the family it was trained for ({self.arch!r}, "
                f"{len(self.layers)} LiDB layers), got a {arch!r} base; pretrain one for this base "
                f"(hdb pretrain all --config <{arch} config> --base DIR)"
            )
        fp = base_fingerprint(pipe)
        if fp != self.base_fingerprint:
            raise IncompatibleAdapterError(
                f"hypernetwork must be used with the base it was trained on (fingerprint "
                f"{self.base_fingerprint}), got a base with fingerprint {fp}"
            )
        if lidb_layers(pipe, self.spec) != self.layers:
            raise IncompatibleAdapterError(
                f"hypernetwork must match the base's {len(self.layers)} LiDB layers, got a different layer set"
            )

    def predict(self, pixels: torch.Tensor | np.ndarray,
                faces: torch.Tensor | np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """pixels (N, 3, R, R) in [-1, 1] (+ faces (N, 3, 112, 112) in [-1, 1], aligned, for an
        identity-conditioned model; None: aligned from `pixels`) -> {"A_train": (N, L, r, a),
        "B_train": (N, L, b, r)} as fp32 tensors on this runtime's device.

        Raises:
            InvalidInputError: wrong shape (R must be the base's resolution) or non-finite values.
        """
        x = self._check_pixels(pixels)
        fx = self._faces(x, faces) if self.needs_faces else None  # (N, 3, 112, 112)
        if self._session is not None:
            from hypernet.hypernetwork.export import onnx_input_names

            given = {"pixels": x, "faces": fx}
            feeds = {n: given[n].cpu().numpy() for n in onnx_input_names(self.config)}
            A, B = self._session.run(["A_train", "B_train"], feeds)
            return {"A_train": torch.from_numpy(A).to(self.device),
                    "B_train": torch.from_numpy(B).to(self.device)}
        with torch.no_grad():
            identity = self._face_encoder(fx.to(self.device)) if fx is not None else None  # (N, 512)
            out = self._model(x.to(self.device) if self.config.uses_pixels else None, identity)
        return {k: v.float() for k, v in out.items()}

    def faces_for(self, images, detector: str = "auto") -> torch.Tensor | None:
        """The aligned faces (N, 3, 112, 112) `predict` wants for these decoded photos (full
        resolution: as pretraining's embedding cache saw them), or None when this hypernetwork is
        not identity-conditioned (no detection is paid then)."""
        if not self.needs_faces:
            return None
        from hypernet.face_alignment import align_faces

        return align_faces(list(images), detector=detector)

    def _faces(self, x: torch.Tensor, faces) -> torch.Tensor:
        """Checked aligned faces (N, 3, 112, 112), or faces aligned from the pixels `x`."""
        from hypernet.face_alignment import FACE_SIZE, align_faces, pixels_to_images

        if faces is None:
            log.info("hypernetwork: no aligned faces given; aligning them from the %d px crops", x.shape[-1])
            return align_faces(pixels_to_images(x))
        f = torch.as_tensor(faces).float()
        if f.dim() != 4 or tuple(f.shape[1:]) != (3, FACE_SIZE, FACE_SIZE) or f.shape[0] != x.shape[0]:
            raise InvalidInputError(
                f"`faces` must have shape ({x.shape[0]}, 3, {FACE_SIZE}, {FACE_SIZE}), got {tuple(f.shape)}"
            )
        if not torch.isfinite(f).all():
            raise InvalidInputError("`faces` must be finite, got NaN/inf")
        return f

    def _check_pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(pixels)
        R = self.resolution
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, R, R) or x.shape[0] < 1:
            raise InvalidInputError(f"`pixels` must have shape (N, 3, {R}, {R}), got {tuple(x.shape)}")
        x = x.float()
        if not torch.isfinite(x).all():
            raise InvalidInputError("`pixels` must be finite, got NaN/inf")
        return x

    def encode(self, pixels: torch.Tensor | np.ndarray,
               faces: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """pixels (N, 3, R, R) in [-1, 1] (+ faces, as `predict`) -> the decoder's condition tokens
        (N, T', d), fp32: image tokens and/or face-identity tokens, by `config.condition`.

        Raises:
            InvalidInputError: as `predict`.
            ModelNotFoundError: an ONNX-only export (the split needs the torch weights).
        """
        x = self._check_pixels(pixels)
        fx = self._faces(x, faces) if self.needs_faces else None  # (N, 3, 112, 112)
        model = self._torch_model()
        with torch.no_grad():
            identity = self._torch_face_encoder()(fx.to(self.device)) if fx is not None else None  # (N, 512)
            return model.condition_tokens(x.to(self.device) if self.config.uses_pixels else None, identity).float()

    def decode(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image tokens (N, T, d) -> {"A_train": (N, L, r, a), "B_train": (N, L, b, r)}, fp32.

        Raises:
            InvalidInputError: tokens not (N, T, d) with this hypernetwork's d.
            ModelNotFoundError: an ONNX-only export.
        """
        d = self.config.dim
        if tokens.dim() != 3 or tokens.shape[0] < 1 or tokens.shape[-1] != d:
            raise InvalidInputError(f"`tokens` must have shape (N, T, {d}), got {tuple(tokens.shape)}")
        with torch.no_grad():
            out = self._torch_model().decode(tokens.to(self.device).float())
        return {k: v.float() for k, v in out.items()}

    def _torch_model(self):
        if self._model is None:
            if self._torch_path is None:
                raise ModelNotFoundError(
                    "hypernetwork must have its torch weights (hypernet.safetensors) beside the ONNX file "
                    "to encode and decode separately (combining photos in embedding space), got ONNX only"
                )
            self._model, _ = load_hypernet(self._torch_path, device=self.device)
            log.info("hypernetwork %s on torch for encode/decode", self._torch_path)
        return self._model

    def _torch_face_encoder(self):
        if self._face_encoder is None:  # ONNX backend: the face encoder is inside the graph
            from hypernet.face_encoder import FaceEncoder

            self._face_encoder = FaceEncoder.load().to(self.device)
        return self._face_encoder


def _locate(path: Path) -> tuple[Path | None, Path | None]:
    """(onnx file or None, safetensors file or None) for a folder or a single file."""
    if path.is_dir():
        onnx_p, st_p = path / ONNX_NAME, path / SAFETENSORS_NAME
        found = (onnx_p if onnx_p.is_file() else None, st_p if st_p.is_file() else None)
        if found == (None, None):
            raise ModelNotFoundError(
                f"`path` must be a folder holding {ONNX_NAME} or {SAFETENSORS_NAME}, got {str(path)!r}"
            )
        return found
    if not path.is_file():
        raise ModelNotFoundError(f"`path` must be an existing hypernetwork file or folder, got {str(path)!r}")
    if path.suffix == ".onnx":
        sib = path.with_suffix(".safetensors")
        return path, sib if sib.is_file() else None
    sib = path.with_suffix(".onnx")
    return (sib if sib.is_file() else None), path


__all__ = ["HypernetRuntime"]
