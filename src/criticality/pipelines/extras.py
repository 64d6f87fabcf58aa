"""Operations outside the grid: module criticality (its own search) and the one-pass proxies, run after it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from criticality.core.ops import OPERATIONS, check_ops, choices
from criticality.errors import CriticalityError
from criticality.interventions import proxies
from criticality.interventions.module_criticality import DEFAULT_EPS, SEARCH_ALPHAS, search_plan, write

EXTRA_OPS = ("criticality", "proxies")  # module criticality (its own search) and the one-pass proxies


def split_ops(ops: Sequence[str] | str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``--ops`` → (the grid's ops, the extra ops), each validated."""
    ops = [o.strip() for o in ops.split(",") if o.strip()] if isinstance(ops, str) else list(ops)
    extra = tuple(o for o in dict.fromkeys(ops) if o in EXTRA_OPS)
    unknown = [o for o in ops if o not in OPERATIONS and o not in EXTRA_OPS]
    if unknown:
        raise CriticalityError(f"unknown op {unknown[0]!r}; choose from {', '.join([*choices(), *EXTRA_OPS])}")
    return check_ops([o for o in ops if o in OPERATIONS]), extra


def run_extras(plan: Any, data: Any, out: Any, table: Any, extras: Sequence[str], *, draws: int,
               alphas: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
               eps: float | None = None, device: Any = "cpu", store: str | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Run module criticality and/or the proxies for an analysed plan, write their tables into ``out``
    and return what the summary records about them."""
    summary: dict[str, Any] = {}
    if "criticality" in extras:
        sig = tuple(s for s in (sigmas or ()) if s > 0) or None  # σ = 0 has μ = ∞: no point searching it
        kw = {"alphas": alphas or SEARCH_ALPHAS, "eps": DEFAULT_EPS if eps is None else eps}
        final_error = float(table.loc[table.op == "final", "error"].iloc[0])
        mc = search_plan(plan, data, draws=max(1, draws), device=device, store=store, progress=progress,
                         final_error=final_error, **kw, **({"sigmas": sig} if sig else {}))
        write(mc, out)
        summary["module_criticality"] = {**mc.summary, "table": mc.table.to_dict(orient="records")}
    if "proxies" in extras:
        final = copy.deepcopy(plan.model).to(device)
        final.load_state_dict(plan.checkpoints[plan.final_epoch])
        table_p = proxies.block_proxies(final, data, groups=plan.groups, batch_size=plan.batch_size, device=device,
                                        max_examples=plan.max_examples)
        proxies.write(table_p, out)
        summary["proxies"] = {"blocks": len(table_p), "spearman": proxies.correlations(table_p, table)}
    return summary
