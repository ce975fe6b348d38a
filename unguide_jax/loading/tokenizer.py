"""CLIP BPE tokenizer files, built offline.

``transformers.CLIPTokenizer`` reads ``vocab.json`` + ``merges.txt``. We build them from a list of
BPE merges: the real CLIP vocabulary comes from the BPE file that ships inside open_clip's wheel
(first 48,894 merges after the header -> 49,408 ids, exactly open_clip's); tests use a few merges
to get a tiny vocabulary with the same rules.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Sequence

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_NUM_MERGES = 49152 - 256 - 2  # 48,894


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def open_clip_merges(path: str | Path | None = None) -> list[tuple[str, str]]:
    """The real CLIP merges, read from open_clip's wheel (or an explicit ``bpe_simple_vocab_16e6.txt.gz``)."""
    if path is None:
        spec = importlib.util.find_spec("open_clip")  # locates the package without importing torch/torchvision
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("open_clip is not installed: `pip install --no-deps open_clip_torch` ships the CLIP BPE file")
        path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1 : 1 + CLIP_NUM_MERGES]]


def write_clip_tokenizer(
    out_dir: str | Path, merges: Sequence[tuple[str, str]], *, pad_token: str = EOS, max_length: int = 77
) -> Path:
    """Write a tokenizer folder that ``transformers.CLIPTokenizer.from_pretrained`` loads.

    ``pad_token``: SD1 pads with ``<|endoftext|>``, SD2 with ``!`` (id 0).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(build_vocab(merges), ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}, indent=2)
    )
    return out
