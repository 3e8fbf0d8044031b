"""Turn raw JSONL text into InternEvo's tokenized format (``.bin`` + ``.bin.meta``).

    python -m adapter.data.prepare --tokenizer internlm/internlm2-7b --input raw.jsonl --output data/en/train_000.bin
    python -m adapter.data.prepare --tokenizer bytes --input raw.jsonl.gz --output data/en/train_000.bin

Each input line is a JSON object whose ``--text-key`` field (default ``text``) is tokenized with the
Hugging Face tokenizer you name (``transformers.AutoTokenizer``; ``bytes`` is a built-in UTF-8 byte
tokenizer with ids 1-256, useful for demos without downloads). Put each data type in its own folder
(``data/en/``, ``data/code/``, ...): InternEvo derives type ids from those folder names.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Iterable, Protocol

from adapter.data.tokenized import write_tokenized


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by one, so that id 0 (InternEvo's "no label" value) never occurs."""

    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]


def load_tokenizer(name: str) -> Tokenizer:
    if name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=False)


def read_texts(path: Path, key: str) -> Iterable[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[key]
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"{path}:{number}: expected a JSON object with a {key!r} string ({exc})") from None


def prepare(texts: Iterable[str], tokenizer: Tokenizer, out: str | Path, *, bos: int | None = None,
            eos: int | None = None, progress: bool = False) -> int:
    """Tokenize ``texts`` into ``out`` (written atomically); returns the number of samples."""
    if progress:
        from tqdm import tqdm

        texts = tqdm(texts, unit="doc", desc="tokenize")
    samples = []
    for text in texts:
        ids = list(tokenizer.encode(text))
        samples.append(([bos] if bos is not None else []) + ids + ([eos] if eos is not None else []))
    write_tokenized(out, samples)
    return len(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapter.data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer name or path, or 'bytes'")
    parser.add_argument("--input", required=True, type=Path, help="JSONL file (optionally .gz)")
    parser.add_argument("--output", required=True, type=Path, help="the .bin file to write (.bin.meta beside it)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--bos", type=int, help="token id to put before every document")
    parser.add_argument("--eos", type=int, help="token id to put after every document")
    args = parser.parse_args(argv)
    if args.output.suffix != ".bin":
        parser.error("--output must end in .bin")
    count = prepare(read_texts(args.input, args.text_key), load_tokenizer(args.tokenizer), args.output,
                    bos=args.bos, eos=args.eos, progress=sys.stderr.isatty())
    print(f"{args.output}: {count} samples", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
