"""What the rewrite did at each attention site: the log, the counters, and `explain`'s report."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

log = logging.getLogger("flash_inductor")


@dataclass
class SiteReport:
    site: str  # the graph node that anchored the site (softmax or SDPA call)
    rewritten: bool
    spelling: str = ""  # which pattern families matched, e.g. "matmul·mul·add·softmax(fp32)·matmul"
    kernel: str = ""  # which kernel dispatch picks for the traced input
    kernel_why: str = ""  # why the kernels ahead of it in dispatch order refused
    guard: str = ""  # for a skipped site: the guard that refused it
    reason: str = ""
    graph: str = ""  # the Dynamo graph the site was in

    def line(self) -> str:
        if self.rewritten:
            return f"rewritten  {self.site}: {self.spelling} -> {self.kernel}"
        return f"skipped    {self.site:<24} {self.guard}: {self.reason}"


@dataclass
class Report:
    sites: list[SiteReport] = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    @property
    def skipped(self) -> int:
        return len(self.sites) - self.rewritten

    def __str__(self) -> str:
        head = f"flash-inductor: {self.rewritten} attention site(s) rewritten, {self.skipped} skipped"
        lines = [head] + ["  " + s.line() for s in self.sites]
        why = sorted({(s.kernel, s.kernel_why) for s in self.sites if s.rewritten and s.kernel_why})
        lines += [f"  why {kernel} and not a faster kernel: {text}" for kernel, text in why]
        return "\n".join(lines)


_recorders: list[Report] = []


@contextlib.contextmanager
def recording():
    """Collect every SiteReport the rewrite makes inside the block."""
    rep = Report()
    _recorders.append(rep)
    try:
        yield rep
    finally:
        _recorders.remove(rep)


def record(site: SiteReport) -> None:
    from torch._dynamo.utils import counters

    counters["flash_inductor"]["rewritten" if site.rewritten else "skipped"] += 1
    if site.rewritten:
        counters["flash_inductor"][f"spelling:{site.spelling}"] += 1
    log.info("flash-inductor %s", site.line())
    for rep in _recorders:
        rep.sites.append(site)
