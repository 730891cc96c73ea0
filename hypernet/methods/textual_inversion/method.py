"""Textual Inversion: learn 1..k token embeddings, initialised from the class noun; nothing else
trains. The artifact is the diffusers embedding file ({token: (k, D)}) that stock
`pipe.load_textual_inversion()` reads; multi-vector tokens expand to "tok tok_1 ... tok_{k-1}".

On SDXL the token is learnt in BOTH text encoders (each its own (k, D_i) vectors, trained
together through SDXL's conditioning), and the file is the SDXL embedding layout
{"clip_l": (k, 768), "clip_g": (k, 1280)} that stock diffusers loads with one
`load_textual_inversion(file["clip_l"], token=..., text_encoder=pipe.text_encoder,
tokenizer=pipe.tokenizer)` per encoder (`clip_g` into `text_encoder_2`/`tokenizer_2`).
SD3/FLUX are refused (`hypernet.methods.base.METHOD_ARCHS`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from hypernet.errors import IncompatibleAdapterError, InvalidInputError
from hypernet.files import atomic_write_bytes, read_safetensors
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


#: SDXL embedding file keys, in `_encoders` order.
SDXL_KEYS = ("clip_l", "clip_g")


def _encoders(pipe) -> list[tuple]:
    """(tokenizer, text encoder) pairs the token is learnt in: one on SD 1.x, both CLIPs on SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _class_init(pipe, class_noun: str, k: int, tok=None, te=None) -> torch.Tensor:
    """(k, D) copies of the class noun's embedding (the mean over its BPE pieces) in encoder `te`
    with tokenizer `tok` (default the pipeline's first)."""
    tok, te = tok or pipe.tokenizer, te or pipe.text_encoder
    ids = tok(class_noun, add_special_tokens=False).input_ids
    emb = te.get_input_embeddings().weight
    return emb[ids].detach().float().mean(0, keepdim=True).repeat(k, 1)


def _fit(pipe, call: TrainCall, config: TIMethodConfig) -> TIArtifact:
    """Learn `config.num_vectors` embeddings for `token` (in each text encoder); the pipeline is
    left as it was."""
    token, class_noun = call.token, call.class_noun
    tokens = token_names(token, config.num_vectors)
    pairs = _encoders(pipe)
    if any(t in tok.get_added_vocab() for tok, _ in pairs for t in tokens):
        raise InvalidInputError(f"`token` must not already be an added token of this pipeline, got {token!r}")
    pixels = call.pixels(pipe)  # (N, 3, R, R)
    prompt = call.prompt(config.prompt)
    inits = [_class_init(pipe, class_noun, config.num_vectors, tok, te) for tok, te in pairs]  # (k, D_i) each
    # resizing (and diffusers' unload) make new embedding modules, trainable by default: put the
    # caller's flags back afterwards, so the pipeline is left exactly as it was
    was_trainable = [te.get_input_embeddings().weight.requires_grad for _, te in pairs]
    rows = []
    try:
        for (tok, te), init in zip(pairs, inits, strict=True):
            tok.add_tokens(tokens)
            te.resize_token_embeddings(len(tok), mean_resizing=False)
            rows.append(_TokenRows(te.get_input_embeddings(), tok.convert_tokens_to_ids(tokens), init))
            te.set_input_embeddings(rows[-1])
        # "ohwx" -> "ohwx ohwx_1 ..." exactly as the pipeline expands it at generation time.
        expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        data = TrainData(
            latents=encode_images(pipe, pixels),
            flipped=encode_images(pipe, pixels, flip=True) if config.train.flip else None,
            input_ids=tokenize(pipe, expanded),  # (1, 77) or SDXL's (1, 2, 77)
        )
        result = call.fit(pipe, [r.vectors for r in rows], data, config.train, text_encoder_trains=True,
                          stage="textual-inversion")
        vectors = [r.vectors.detach().to("cpu", torch.float32).clone() for r in rows]
    finally:
        for (tok, te), flag in zip(pairs, was_trainable, strict=True):
            current = te.get_input_embeddings()
            if isinstance(current, _TokenRows):
                te.set_input_embeddings(current.base)
            _drop_tokens(pipe, tokens, tok, te)
            te.get_input_embeddings().weight.requires_grad_(flag)
    return TIArtifact(token, vectors[0], call.metadata(KIND, prompt, result.losses[-1], config),
                      vectors_2=vectors[1] if len(vectors) > 1 else None)


train = personaliser(TIMethodConfig, _fit, KIND)


def _drop_tokens(pipe, tokens: list[str], tok=None, te=None) -> None:
    """Remove added tokens from one tokenizer/encoder (default the first) and shrink the
    embedding back (stock unload, which is exact)."""
    tok, te = tok or pipe.tokenizer, te or pipe.text_encoder
    present = [t for t in tokens if t in tok.get_added_vocab()]
    if present:
        pipe.unload_textual_inversion(present, tokenizer=tok, text_encoder=te)
        # diffusers shrinks the embedding but leaves config.vocab_size at the grown size, so a
        # pipeline saved afterwards would not load: put it back in step with the weights.
        te.config.vocab_size = te.get_input_embeddings().weight.shape[0]


class TIArtifact:
    """A token and its (k, D) embedding vectors (and (k, D2) ones for SDXL's second encoder)."""

    kind = KIND

    def __init__(self, token: str, vectors: torch.Tensor, metadata: dict[str, str] | None = None, *,
                 vectors_2: torch.Tensor | None = None):
        if vectors.dim() == 1:
            vectors = vectors[None]
        if vectors_2 is not None and vectors_2.dim() == 1:
            vectors_2 = vectors_2[None]
        if vectors_2 is not None and vectors_2.shape[0] != vectors.shape[0]:
            raise InvalidInputError(f"`vectors_2` must have {vectors.shape[0]} rows like `vectors`, got "
                                    f"{vectors_2.shape[0]}")
        self.token, self.vectors, self.vectors_2 = token, vectors, vectors_2  # (k, D), (k, D2) | None
        self.metadata = dict(metadata or {})
        self._applied: set[int] = set()
        self._trainable: dict[int, bool] = {}  # per pipeline: its embedding's requires_grad

    def save(self, path: str | Path) -> int:
        data = self.export()
        atomic_write_bytes(path, data)
        return len(data)

    def export(self) -> bytes:
        """The embedding file as bytes: {token: (k, D)}, what `load_textual_inversion` reads, or on
        SDXL {"clip_l": (k, D), "clip_g": (k, D2)}, one `load_textual_inversion` per encoder."""
        meta = {"format": "pt", **{k: v for k, v in self.metadata.items() if k != "format"}}
        meta["hdb_token"] = self.token
        if self.vectors_2 is None:
            return save({self.token: self.vectors.contiguous()}, metadata=meta)
        return save({SDXL_KEYS[0]: self.vectors.contiguous(), SDXL_KEYS[1]: self.vectors_2.contiguous()},
                    metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> TIArtifact:
        """Reads diffusers ({token: (k, D)}) and A1111 ({"emb_params": (k, D)}) embedding files."""
        path = Path(path)
        tensors, meta = read_safetensors(path, "an embedding .safetensors file")
        if set(tensors) == set(SDXL_KEYS):
            token = meta.get("hdb_token") or path.stem
            return cls(token, tensors[SDXL_KEYS[0]].float(), meta, vectors_2=tensors[SDXL_KEYS[1]].float())
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

    def _pairs(self, pipe) -> list[tuple]:
        """(tokenizer, text encoder, vectors) per encoder the artifact loads into."""
        pairs = _encoders(pipe)
        if (self.vectors_2 is None) != (len(pairs) == 1):
            raise IncompatibleAdapterError(
                f"embedding must have one vector set per text encoder ({len(pairs)}), got "
                f"{1 if self.vectors_2 is None else 2}")
        return [(tok, te, v) for (tok, te), v in zip(pairs, (self.vectors, self.vectors_2), strict=False)]

    def apply(self, pipe) -> None:
        """Stock `load_textual_inversion` (per encoder on SDXL); raises IncompatibleAdapterError on
        a width mismatch."""
        if id(pipe) in self._applied:
            raise InvalidInputError("artifact must not be applied twice to the same pipeline, got a second apply")
        pairs = self._pairs(pipe)
        for _, te, v in pairs:
            width = te.get_input_embeddings().weight.shape[1]
            if v.shape[1] != width:
                raise IncompatibleAdapterError(
                    f"embedding must have the text encoder's width {width}, got {v.shape[1]}")
        # load/unload make new embedding modules (trainable by default): remove() restores this
        self._trainable[id(pipe)] = [te.get_input_embeddings().weight.requires_grad for _, te, _ in pairs]
        try:
            for tok, te, v in pairs:
                pipe.load_textual_inversion(v.clone(), token=self.token, tokenizer=tok, text_encoder=te)
        except ValueError as e:
            for tok, te, _ in pairs:
                _drop_tokens(pipe, self.tokens, tok, te)
            raise IncompatibleAdapterError(f"embedding for {self.token!r} could not be loaded: {e}") from e
        self._applied.add(id(pipe))

    def remove(self, pipe) -> None:
        if id(pipe) in self._applied:
            self._applied.discard(id(pipe))
            flags = self._trainable.pop(id(pipe), None)
            for i, (tok, te, _) in enumerate(self._pairs(pipe)):
                _drop_tokens(pipe, self.tokens, tok, te)
                if flags is not None:
                    te.get_input_embeddings().weight.requires_grad_(flags[i])
