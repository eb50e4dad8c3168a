"""Write README.pypi.md, the package index's description: README.md with links that work off the repository.

README.md links to files of the repository (docs/*.md, LICENSE) by relative paths, which work in a
clone and on a code host, but not on a package index page. This rewrites each relative link: to
``<Source>/blob/main/<path>`` when pyproject.toml's ``[project.urls]`` has a ``Source``, else to the
link's text followed by the path in the source repository. ``python scripts/pypi_readme.py`` rewrites
the file; tests/test_readme.py checks that the committed copy is up to date.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[([^\]]+)\]\((?!https?://|#)([^)]+)\)")


def source_url(pyproject: str) -> str | None:
    """``[project.urls] Source`` of pyproject.toml, if set."""
    import tomllib

    return tomllib.loads(pyproject).get("project", {}).get("urls", {}).get("Source")


def render(readme: str, source: str | None) -> str:
    def absolute(m: re.Match) -> str:
        text, target = m.group(1), m.group(2)
        if source:
            return f"[{text}]({source.rstrip('/')}/blob/main/{target})"
        return f"{text} (`{target}` in the source repository)"

    return LINK.sub(absolute, readme)


def main() -> int:
    text = render((ROOT / "README.md").read_text(encoding="utf-8"), source_url((ROOT / "pyproject.toml").read_text()))
    (ROOT / "README.pypi.md").write_text(text, encoding="utf-8")
    print(f"wrote {ROOT / 'README.pypi.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
