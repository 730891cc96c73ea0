"""Textual Inversion: learn 1..k token embeddings, initialised from the class noun; nothing else
trains. The artifact is the diffusers embedding file ({token: (k, D)}) that stock
`pipe.load_textual_inversion()` reads; multi-vector tokens expand to "tok tok_1 ... tok_{k-1}".
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from hypernet.errors import IncompatibleAdapterError, InvalidInputError
from hypernet.files import atomic_write_bytes
from hypernet.methods._common import TrainCall, personaliser
from hypernet.methods.textual_inversion.config import TIMethodConfig
from hypernet.training import TrainData, encode_images, tokenize

KIND = "textual-inversion"


class _TokenRows(nn.Module):
    """An embedding whose rows for `ids` come from a small trainable (k, D) tensor.

    Training only the k new vectors (not the 49,408 x D matrix with a gradient mask) keeps the
    optimizer state tiny and leaves every other row bit-identical by construction.
    """

    def __init__(self, base: nn.Embedding, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, device=base.weight.device), persistent=False)
        self.vectors = nn.Parameter(init.detach().clone().float())  # (k, D)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)  # (B, T, D)
        for j in range(self.ids.shape[0]):
            hit = (input_ids == self.ids[j]).unsqueeze(-1)  # (B, T, 1)
            out = torch.where(hit, self.vectors[j].to(out.dtype), out)
        return out


def token_names(token: str, k: int) -> list[str]:
    """diffusers' naming of a k-vector token: tok, tok_1, ..., tok_{k-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, k)]


def _class_init(pipe, class_noun: str, k: int) -> torch.Tensor:
    """(k, D) copies of the class noun's embedding (the mean over its BPE pieces)."""
    ids = pipe.tokenizer(class_noun, add_special_tokens=False).input_ids
    emb = pipe.text_encoder.get_input_embeddings().weight
    return emb[ids].detach().float().mean(0, keepdim=True).repeat(k, 1)


def _fit(pipe, call: TrainCall, config: TIMethodConfig) -> TIArtifact:
    """Learn `config.num_vectors` embeddings for `token`; the pipeline is left as it was."""
    token, class_noun = call.token, call.class_noun
    tokens = token_names(token, config.num_vectors)
    tok, te = pipe.tokenizer, pipe.text_encoder
    if any(t in tok.get_added_vocab() for t in tokens):
        raise InvalidInputError(f"`token` must not already be an added token of this pipeline, got {token!r}")
    pixels = call.pixels(pipe)  # (N, 3, R, R)
    prompt = call.prompt(config.prompt)
    init = _class_init(pipe, class_noun, config.num_vectors)  # (k, D)
    # resizing (and diffusers' unload) make new embedding modules, trainable by default: put the
    # caller's flag back afterwards, so the pipeline is left exactly as it was
    was_trainable = te.get_input_embeddings().weight.requires_grad
    tok.add_tokens(tokens)
    try:
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        ids = tok.convert_tokens_to_ids(tokens)
        rows = _TokenRows(te.get_input_embeddings(), ids, init)
        te.set_input_embeddings(rows)
        # "ohwx" -> "ohwx ohwx_1 ..." exactly as the pipeline expands it at generation time.
        expanded = pipe.maybe_convert_prompt(prompt, tok)
        data = TrainData(
            latents=encode_images(pipe, pixels),
            flipped=encode_images(pipe, pixels, flip=True) if config.train.flip else None,
            input_ids=tokenize(pipe, expanded),
        )
        result = call.fit(pipe, [rows.vectors], data, config.train, text_encoder_trains=True, stage="textual-inversion")
        vectors = rows.vectors.detach().to("cpu", torch.float32).clone()
    finally:
        current = te.get_input_embeddings()
        if isinstance(current, _TokenRows):
            te.set_input_embeddings(current.base)
        _drop_tokens(pipe, tokens)
        te.get_input_embeddings().weight.requires_grad_(was_trainable)
    return TIArtifact(token, vectors, call.metadata(KIND, prompt, result.losses[-1], config))


train = personaliser(TIMethodConfig, _fit)


def _drop_tokens(pipe, tokens: list[str]) -> None:
    """Remove added tokens and shrink the embedding back (stock unload, which is exact)."""
    present = [t for t in tokens if t in pipe.tokenizer.get_added_vocab()]
    if present:
        pipe.unload_textual_inversion(present)
        # diffusers shrinks the embedding but leaves config.vocab_size at the grown size, so a
        # pipeline saved afterwards would not load: put it back in step with the weights.
        te = pipe.text_encoder
        te.config.vocab_size = te.get_input_embeddings().weight.shape[0]


class TIArtifact:
    """A token and its (k, D) embedding vectors."""

    kind = KIND

    def __init__(self, token: str, vectors: torch.Tensor, metadata: dict[str, str] | None = None):
        if vectors.dim() == 1:
            vectors = vectors[None]
        self.token, self.vectors = token, vectors  # (k, D)
        self.metadata = dict(metadata or {})
        self._applied: set[int] = set()
        self._trainable: dict[int, bool] = {}  # per pipeline: its embedding's requires_grad

    def save(self, path: str | Path) -> int:
        data = self.export()
        atomic_write_bytes(path, data)
        return len(data)

    def export(self) -> bytes:
        """The embedding file as bytes ({token: (k, D)}), what `load_textual_inversion` reads."""
        meta = {"format": "pt", **{k: v for k, v in self.metadata.items() if k != "format"}}
        return save({self.token: self.vectors.contiguous()}, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> TIArtifact:
        """Reads diffusers ({token: (k, D)}) and A1111 ({"emb_params": (k, D)}) embedding files."""
        path = Path(path)
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types
            raise InvalidInputError(f"{path} must be an embedding .safetensors file, got unreadable data ({e})") from e
        if "emb_params" in tensors:
            token, vec = meta.get("hdb_token") or path.stem, tensors["emb_params"]
        elif len(tensors) == 1:
            token, vec = next(iter(tensors.items()))
        else:
            raise InvalidInputError(f"{path} must hold one embedding tensor, got {sorted(tensors)}")
        return cls(token, vec.float(), meta)

    @property
    def tokens(self) -> list[str]:
        return token_names(self.token, self.vectors.shape[0])

    def apply(self, pipe) -> None:
        """Stock `load_textual_inversion`; raises IncompatibleAdapterError on a width mismatch."""
        if id(pipe) in self._applied:
            raise InvalidInputError("artifact must not be applied twice to the same pipeline, got a second apply")
        width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        if self.vectors.shape[1] != width:
            raise IncompatibleAdapterError(
                f"embedding must have the text encoder's width {width}, got {self.vectors.shape[1]}"
            )
        # load/unload make new embedding modules (trainable by default): remove() restores this
        self._trainable[id(pipe)] = pipe.text_encoder.get_input_embeddings().weight.requires_grad
        try:
            pipe.load_textual_inversion({self.token: self.vectors.clone()}, token=self.token)
        except ValueError as e:
            raise IncompatibleAdapterError(f"embedding for {self.token!r} could not be loaded: {e}") from e
        self._applied.add(id(pipe))

    def remove(self, pipe) -> None:
        if id(pipe) in self._applied:
            self._applied.discard(id(pipe))
            _drop_tokens(pipe, self.tokens)
            flag = self._trainable.pop(id(pipe), None)
            if flag is not None:
                pipe.text_encoder.get_input_embeddings().weight.requires_grad_(flag)
