"""Rebuild the small dataset in launch/data/tiny that the README demo trains on (provenance; the files are
committed). ``en``: the paragraphs of this repository's README; ``code``: the adapter's config-package source,
in blocks of lines. Tokenized with the built-in byte tokenizer (ids 1-256)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapter.data.prepare import ByteTokenizer, prepare  # noqa: E402


def main() -> None:
    out = ROOT / "launch" / "data" / "tiny"
    paragraphs = [p.strip() for p in (ROOT / "README.md").read_text().split("\n\n") if p.strip()]
    code = []
    for path in sorted((ROOT / "adapter" / "config").glob("*.py")):
        lines = path.read_text().splitlines()
        code += ["\n".join(lines[i:i + 12]) for i in range(0, len(lines), 12)]
    prepare(paragraphs, ByteTokenizer(), out / "en" / "train_000.bin")
    prepare(code, ByteTokenizer(), out / "code" / "train_000.bin")


if __name__ == "__main__":
    main()
