"""A small T5 (SentencePiece-unigram) tokenizer, built offline and deterministically.

SD3 and FLUX encode prompts with T5-XXL, whose 32,128-piece SentencePiece vocabulary cannot be
downloaded here. The tiny SD3/FLUX bases need a real `T5Tokenizer` (the class those pipelines
load) with T5's conventions, not T5's exact ids: the tiny T5 encoder has random weights anyway.

How the vocabulary is made (no training run, so the files are byte-identical on every machine):
- the pieces T5 always has: <pad> = 0, </s> = 1, <unk> = 2, then "▁" (SentencePiece's word
  boundary);
- every printable ASCII character, so any English prompt segments without <unk>;
- the first `N_WORDS` alphabetic whole-word tokens of CLIP's BPE vocabulary (the same open_clip
  file as the CLIP tokenizer; its merge order approximates frequency) as "▁word" pieces, and the
  first `N_SUBWORDS` alphabetic word-internal tokens as plain pieces;
- unigram log-probability scores from a Zipf law over that order (score = -log(rank + 2)), with
  single characters at -20 so that whole words win whenever they exist;
- 100 sentinel pieces <extra_id_0..99>, as T5 (the class adds them).

Unigram segmentation (Viterbi over these scores) then behaves like T5's: "a photo of a person"
-> ["▁a", "▁photo", "▁of", "▁a", "▁person", "</s>"].
"""

from __future__ import annotations

import gzip
import math
from importlib import resources
from pathlib import Path

from transformers import T5Tokenizer

#: Whole-word and word-internal pieces taken from CLIP's vocabulary (see the module docstring).
N_WORDS = 3000
N_SUBWORDS = 1000
#: T5's sequence length for SD3 (256) is the pipelines' own default; the tokenizer allows FLUX's 512.
T5_MAX_LENGTH = 512
_CHAR_SCORE = -20.0


def t5_vocabulary() -> list[tuple[str, float]]:
    """[(piece, score)] in id order, without the sentinels (the tokenizer class appends those)."""
    bpe = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1:]
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    chars = [chr(c) for c in range(33, 127)]  # printable ASCII without the space
    words: list[str] = []
    subwords: list[str] = []
    for line in merges:
        token = "".join(line.split())
        if token.endswith("</w>"):
            w = token.removesuffix("</w>")
            if w.isalpha() and w.isascii() and len(words) < N_WORDS:
                words.append("▁" + w)
        elif token.isalpha() and token.isascii() and len(subwords) < N_SUBWORDS:
            subwords.append(token)
        if len(words) >= N_WORDS and len(subwords) >= N_SUBWORDS:
            break
    for rank, piece in enumerate(words + subwords):
        if piece not in seen:
            pieces.append((piece, -math.log(rank + 2)))
            seen.add(piece)
    for c in chars:
        for piece in (c, "▁" + c):
            if piece not in seen:
                pieces.append((piece, _CHAR_SCORE))
                seen.add(piece)
    return pieces


def make_t5_tokenizer() -> T5Tokenizer:
    """The tokenizer itself (see the module docstring for what it holds)."""
    return T5Tokenizer(vocab=t5_vocabulary(), extra_ids=100, model_max_length=T5_MAX_LENGTH)


def write_t5_tokenizer(out_dir: str | Path) -> Path:
    """Write the tokenizer to `out_dir` (tokenizer.json + config), loadable with
    `T5Tokenizer.from_pretrained(out_dir)` / `T5TokenizerFast` as SD3 and FLUX pipelines do."""
    out = Path(out_dir)
    make_t5_tokenizer().save_pretrained(str(out))
    return out


__all__ = ["N_SUBWORDS", "N_WORDS", "T5_MAX_LENGTH", "make_t5_tokenizer", "t5_vocabulary", "write_t5_tokenizer"]
