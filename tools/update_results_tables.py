"""Regenerate the issue-14 tables of docs/results.md from the committed sweep cells.

Each table sits between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers; the text around them is
written by hand. Rows are the given losses in that order, columns the sync staleness N present
in the cells, entries mean ± std over seeds (seed count in parentheses)::

    python tools/update_results_tables.py            # rewrites docs/results.md in place
    python tools/update_results_tables.py --check    # exit 1 if the tables are out of date
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_vespo.evidence.sweep import aggregate, load_done, markdown_table  # noqa: E402

LOSSES = ["vespo", "vespo_adaptive", "psis", "snis", "gepo", "grpo", "gspo"]
TABLES = {  # marker -> (cells directory, metric key)
    "issue14-table": ("docs/results/staleness", "eval"),
    "issue14-u256-table": ("docs/results/staleness_u256", "eval"),
}


def table(out_dir: Path, key: str) -> str:
    """The markdown table of the sync cells of ``LOSSES`` in ``out_dir`` (``key``: eval or eval_best)."""
    cells = [c for c in load_done(out_dir).values() if c["mode"] == "sync" and c["loss"] in LOSSES]
    if not cells:
        return "(no finished cells yet)"
    agg = sorted(aggregate(cells, key), key=lambda a: LOSSES.index(a["loss"]))
    return markdown_table(agg)


def render(text: str) -> str:
    """``text`` with every known marker pair's content replaced by the current table."""
    for name, (rel, key) in TABLES.items():
        pat = re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(<!-- /{re.escape(name)} -->)", re.S)
        if pat.search(text):
            body = table(ROOT / rel, key)
            text = pat.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main() -> int:
    """Rewrite docs/results.md (or only check it with ``--check``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 if a table differs from the cells")
    args = ap.parse_args()
    doc = Path(args.doc)
    old = doc.read_text()
    new = render(old)
    if args.check:
        return int(new != old)
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)  # atomic: a torn results page is worse than a stale one
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
