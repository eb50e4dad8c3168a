"""Rebuild the embedded GSM8K sample from a full copy of GSM8K (maintainers only).

    python optlora/experiments/sample/make_sample.py ../shared/data/gsm8k

Writes ``gsm8k/train.jsonl.gz`` and ``gsm8k/test.jsonl.gz`` next to this file: the rows of the
full files that ``optlora demo`` draws with its default settings (the same selection functions
as :mod:`optlora.experiments.harness`), unchanged and in file order, so the demo reads the same
examples from the sample as from the full data.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from optlora.experiments.demo import FT_BATCH, FULL  # noqa: E402
from optlora.experiments.harness import split_train, subset  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(src: str) -> None:
    src_dir = Path(src)
    for split, pick in (
        ("train", lambda n: split_train(n, 0.0, None, FULL["ft_steps"] * FT_BATCH, 0)[0]),
        ("test", lambda n: subset(n, FULL["eval_samples"], 0)),
    ):
        lines = [ln for ln in (src_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
        keep = [lines[i] for i in pick(len(lines))]
        out = HERE / "gsm8k" / f"{split}.jsonl.gz"
        with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as fh:  # mtime=0: byte-identical rebuilds
            fh.write(("\n".join(keep) + "\n").encode("utf-8"))
        print(f"{out}: {len(keep)} of {len(lines)} rows, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/gsm8k")
