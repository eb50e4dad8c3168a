"""Rebuild the embedded GSM8K sample from a full copy of GSM8K (maintainers only).

    python optlora_experiments/sample/make_sample.py ../shared/data/gsm8k

Writes ``gsm8k/train.jsonl.gz`` (the first ``TRAIN_ROWS`` rows of ``train.jsonl``) and
``gsm8k/test.jsonl.gz`` (the first ``TEST_ROWS`` rows of ``test.jsonl``) next to this file,
unchanged and in order. ``optlora demo`` trains on ``32 x 16`` of the training rows and scores
its test split.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

TRAIN_ROWS, TEST_ROWS = 1000, 500
HERE = Path(__file__).resolve().parent


def main(src: str) -> None:
    for split, n in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        lines = [ln for ln in (Path(src) / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
        out = HERE / "gsm8k" / f"{split}.jsonl.gz"
        with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as fh:  # mtime=0: byte-identical rebuilds
            fh.write(("\n".join(lines[:n]) + "\n").encode("utf-8"))
        print(f"{out}: the first {n} of {len(lines)} rows, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/gsm8k")
