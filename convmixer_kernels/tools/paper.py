"""The paper's comparison as one table: inference img/s of the ConvMixers (fused, eager,
torch.compile) beside the timm models of the paper's table, from the ``paper`` rows of
one benchmark run."""
from __future__ import annotations

from typing import Sequence

__all__ = ["paper_summary", "paper_table"]


def paper_summary(rows: Sequence[dict]) -> list[dict]:
    """Per model: best fused, best eager and compile img/s, and fused / best baseline."""
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r["op"], {"model": r["op"], "dtype": r["dtype"], "N": r["N"], "fused": None,
                                     "fused_provider": "", "eager": None, "compile": None})
        ips = float(r["img_per_s"])
        if r["provider"].startswith("fused_"):
            if s["fused"] is None or ips > s["fused"]:
                s["fused"], s["fused_provider"] = ips, r["provider"]
        elif r["provider"].startswith("compile"):
            s["compile"] = max(ips, s["compile"] or 0.0)
        else:
            s["eager"] = max(ips, s["eager"] or 0.0)
    for s in out.values():
        baselines = [v for v in (s["eager"], s["compile"]) if v]
        s["fused_vs_best_baseline"] = s["fused"] / max(baselines) if s["fused"] and baselines else None
    return list(out.values())


def paper_table(rows: Sequence[dict]) -> str:
    head = ("model", "dtype", "N", "fused img/s", "(provider)", "eager img/s", "compile img/s", "fused/best")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    table = [head] + [(s["model"], s["dtype"], str(s["N"]), fmt(s["fused"], ".1f"), s["fused_provider"] or "-",
                       fmt(s["eager"], ".1f"), fmt(s["compile"], ".1f"), fmt(s["fused_vs_best_baseline"], ".2f"))
                      for s in paper_summary(rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
