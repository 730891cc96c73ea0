"""The real CLIP BPE tokenizer, built offline from the vocabulary shipped in open_clip's wheel.

transformers 5 pitfall: `CLIPTokenizer(vocab_file=..., merges_file=...)` silently ignores both
files; we write vocab.json/merges.txt and load them with `from_pretrained(dir)`.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

# CLIP's BPE file holds 48,894 merges after its header; OpenAI's tokenizer uses 49152-256-2 of them.
_N_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_tokenizer(out_dir: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write the SD 1.x tokenizer (vocab.json, merges.txt, tokenizer_config.json) to `out_dir`.

    Ids match OpenAI's: "a photo of a person" -> [49406, 320, 1125, 539, 320, 2533, 49407].
    `pad_token` "!" (id 0) is the OpenCLIP convention of SDXL's and SD3's second tokenizer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
    return out


def load_clip_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """Load a tokenizer written by `write_clip_tokenizer` (or any diffusers `tokenizer/` dir)."""
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=MODEL_MAX_LENGTH)
