"""Which configuration to measure next, and which never to measure: the decisions of a search that spends GPU time
only where the Pareto front can be. Pure Python, no engine, no Optuna (the study loop calls it).

Objectives (as in the study): perplexity (lower is better), generation tok/s and context length (higher is better).

Rules, each exact or conservative with respect to the front:

1. **Largest context only** (:func:`largest_context_only`): configurations of one (variant, cache, split, fill)
   group share perplexity and speed, so the largest feasible context dominates the others; they are skipped.
2. **Order by predicted front membership** (:func:`front_layers`, :meth:`Schedule.next`): non-dominated sorting of
   the predicted values; the loaded variant is finished first (a reload costs more than a measurement), then the
   variant whose best configuration has the best layer.
3. **Prune by optimistic bounds** (:func:`dominated_by`): after each measurement the predictions are refitted and a
   configuration is skipped when a *measured* point dominates its optimistic corner (low perplexity, high tok/s)
   widened by ``margin``.
4. **Paired sequential perplexity** (:func:`paired_decision`): windows are shared between configurations, so the
   per-window difference of log-perplexity against a reference is nearly noise-free; measuring stops once the sign
   is settled (or at the cap).
5. **Lossy caches only for context** (:meth:`Schedule.record`): where a format's quantized caches are lossy copies
   decoded to its lossless mode at every step (``Item.lossless``, exllamav2), such a configuration is never faster
   and not lower in perplexity than the same variant and split with the lossless cache; once that one, holding at
   least as much context, is measured or skipped as dominated, the lossy one is skipped too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from optimizer.predict.estimate import Estimate


@dataclass(frozen=True)
class Point:
    """An objective vector: perplexity (lower is better), tok/s and context (higher is better)."""

    ppl: float
    tok_s: float
    ctx: int


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    ge = a.ppl <= b.ppl and a.tok_s >= b.tok_s and a.ctx >= b.ctx
    return ge and (a.ppl < b.ppl or a.tok_s > b.tok_s or a.ctx > b.ctx)


def pareto(points: Mapping[str, Point]) -> set[str]:
    """Keys of the non-dominated points."""
    return {k for k, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != k)}


@dataclass(frozen=True)
class Item:
    """A configuration to schedule.

    ``load``: what must be loaded to measure it (variant and split; items of one load share a model load).
    ``group``: configurations that share perplexity and speed (variant, cache, split, speed fill, eval window).
    ``ppl`` / ``tok_s``: predicted values with intervals (any consistent unit for ``ppl``).
    """

    key: str
    load: str
    group: str
    ctx: int
    ppl: Estimate
    tok_s: Estimate
    #: the ``group`` of the same configuration with the format's lossless cache when this one's cache is a lossy copy
    #: of it, decoded to it every step (never faster, perplexity not lower); None otherwise
    lossless: str | None = None

    def predicted(self) -> Point:
        return Point(self.ppl.value, self.tok_s.value, self.ctx)

    def optimistic(self, margin: float = 0.0) -> Point:
        """The best corner of the prediction interval, widened by ``margin`` (relative)."""
        return Point(self.ppl.low * (1 - margin), self.tok_s.high * (1 + margin), self.ctx)


@dataclass(frozen=True)
class Skipped:
    """A configuration not measured, its predicted values and why."""

    item: Item
    reason: str


def largest_context_only(items: Iterable[Item]) -> tuple[list[Item], list[Skipped]]:
    """Keep the largest context of each group; the smaller ones are dominated by it (same ppl and speed)."""
    best: dict[str, Item] = {}
    for it in items:
        if it.group not in best or it.ctx > best[it.group].ctx:
            best[it.group] = it
    kept, skipped = [], []
    for it in items:
        top = best[it.group]
        if it is top:
            kept.append(it)
        else:
            skipped.append(Skipped(it, f"same perplexity and speed as context {top.ctx} ({top.key}), which holds more"))
    return kept, skipped


def front_layers(items: Sequence[Item]) -> dict[str, int]:
    """Non-dominated sorting of the predicted points: 0 = predicted front, 1 = front of the rest, ..."""
    left = {it.key: it.predicted() for it in items}
    layers: dict[str, int] = {}
    layer = 0
    while left:
        front = pareto(left)
        for k in front:
            layers[k] = layer
            del left[k]
        layer += 1
    return layers


def dominated_by(item: Item, measured: Mapping[str, Point], *, margin: float) -> str | None:
    """The key of a measured point that dominates ``item``'s optimistic corner (None if none does)."""
    opt = item.optimistic(margin)
    for k, p in measured.items():
        if k != item.key and dominates(p, opt):
            return k
    return None


@dataclass(frozen=True)
class Decision:
    """Outcome of a paired sequential comparison: ``worse`` True/False when settled, None when not."""

    settled: bool
    worse: bool | None
    mean_diff: float
    stderr: float
    n: int


def paired_decision(cand: Sequence[float], ref: Sequence[float], *, z: float = 3.0, min_windows: int = 3) -> Decision:
    """Compare per-window mean negative log-likelihoods of a candidate and a reference on the same windows.

    ``worse`` True: the candidate's perplexity is higher than the reference's (settled when the mean paired
    difference is more than ``z`` standard errors from 0, after at least ``min_windows`` windows).
    """
    n = min(len(cand), len(ref))
    if n == 0:
        return Decision(False, None, 0.0, math.inf, 0)
    d = [c - r for c, r in zip(cand[:n], ref[:n], strict=True)]
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else math.inf
    if n < min_windows or not abs(mean) > z * se:
        return Decision(False, None, mean, se, n)
    return Decision(True, mean > 0, mean, se, n)


@dataclass(frozen=True)
class Measured:
    """What a measurement gave: perplexity (from ``windows`` windows), tok/s, and per-window NLLs if known."""

    key: str
    ppl: float
    tok_s: float
    windows: tuple[float, ...] = ()


Predictor = Callable[[Sequence[Measured]], Mapping[str, tuple[Estimate, Estimate]]]


@dataclass
class Schedule:
    """The running decisions of one search.

    ``predictor(measured)`` returns fresh ``(ppl, tok_s)`` estimates per key given the measurements so far (the
    refit); ``margin`` widens optimistic bounds before pruning. Call :meth:`next` for the item to measure,
    :meth:`record` with its result; :attr:`skipped` explains everything not measured.
    """

    items: list[Item]
    predictor: Predictor | None = None
    margin: float = 0.002
    skipped: list[Skipped] = field(default_factory=list)
    measured: dict[str, Measured] = field(default_factory=dict)
    loaded: str | None = None
    dropped: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.items, small = largest_context_only(self.items)
        self.skipped.extend(small)
        self._index()

    def _index(self) -> None:
        self._by_key = {it.key: it for it in self.items}
        self._by_group = {it.group: it for it in self.items}  # one item per group after largest_context_only

    def lossless_sibling(self, item: Item) -> Item | None:
        """The same variant and split with the lossless cache, if it holds at least ``item``'s context."""
        sib = self._by_group.get(item.lossless) if item.lossless is not None else None
        return sib if sib is not None and sib is not item and sib.ctx >= item.ctx else None

    @property
    def points(self) -> dict[str, Point]:
        return {k: Point(m.ppl, m.tok_s, self._by_key[k].ctx) for k, m in self.measured.items()}

    def pending(self) -> list[Item]:
        done = set(self.measured) | {s.item.key for s in self.skipped} | self.dropped
        return [it for it in self.items if it.key not in done]

    def item(self, key: str) -> Item:
        return self._by_key[key]

    def drop(self, key: str) -> None:
        """Take ``key`` out of the schedule without a result (failed, or measured elsewhere)."""
        self.dropped.add(key)

    def next(self, exclude: Collection[str] = ()) -> Item | None:
        """The next configuration to measure: the loaded variant's first (a reload costs more than a measurement),
        then the variant whose best pending configuration has the best predicted front layer (ties: lower
        predicted perplexity). ``exclude``: pending keys not to take now (being measured by another worker); a
        lossy cache still waits for its excluded lossless sibling."""
        left = self.pending()
        pending = {it.key for it in left}
        todo = [it for it in left if it.key not in exclude]
        if not todo:
            return None
        layers = front_layers(todo)

        def waits(it: Item) -> int:  # a lossy cache after its lossless sibling, whose result may skip it
            sib = self.lossless_sibling(it)
            return int(sib is not None and sib.key in pending)

        rank = {it.key: (waits(it), layers[it.key], it.ppl.value, -it.tok_s.value) for it in todo}
        same = [it for it in todo if it.load == self.loaded]
        if same:
            return min(same, key=lambda it: rank[it.key])
        best_of: dict[str, tuple[int, int, float, float]] = {}
        for it in todo:
            best_of[it.load] = min(best_of.get(it.load, rank[it.key]), rank[it.key])
        load = min(best_of, key=lambda k: best_of[k])
        return min((it for it in todo if it.load == load), key=lambda it: rank[it.key])

    def threshold_reference(self, item: Item, tok_s: float | None = None) -> str | None:
        """The measured point that beats ``item`` in tok/s and context with the lowest perplexity: ``item`` is
        dominated iff its perplexity is not below that point's (None: nothing beats it there). ``tok_s``: the
        item's measured speed, when known, instead of its optimistic prediction."""
        pts = self.points
        opt = item.optimistic(self.margin)
        speed = opt.tok_s if tok_s is None else tok_s
        refs = [k for k, p in pts.items() if k != item.key and p.tok_s >= speed and p.ctx >= opt.ctx]
        return min(refs, key=lambda k: pts[k].ppl) if refs else None

    def record(self, *ms: Measured, own: bool = True) -> list[Skipped]:
        """Store measurements, refit the predictions once, prune; returns what they let us skip. ``own`` False:
        another worker measured them (their load is not the one loaded here); several results that arrive together
        are recorded in one call, so no pruning rests on only a part of them."""
        for m in ms:
            self.measured[m.key] = m
            if own and m.key in self._by_key:
                self.loaded = self._by_key[m.key].load
        if self.predictor is not None:
            fresh = self.predictor(list(self.measured.values()))
            self.items = [replace(it, ppl=fresh[it.key][0], tok_s=fresh[it.key][1]) if it.key in fresh else it
                          for it in self.items]
            self._index()
        new = []
        pts = self.points
        for it in self.pending():
            by = dominated_by(it, pts, margin=self.margin)
            if by is not None:
                p = pts[by]
                new.append(Skipped(it, f"dominated by measured {by} (ppl {p.ppl:.4g}, {p.tok_s:.4g} tok/s, ctx {p.ctx}) "
                                       f"even at its optimistic bound (ppl {it.ppl.low:.4g}, {it.tok_s.high:.4g} tok/s)"))
        self.skipped.extend(new)
        return new + self._skip_lossy()

    def skip(self, item: Item, reason: str) -> list[Skipped]:
        """Skip ``item`` (e.g. settled worse by the paired test); returns it and what that lets us skip with it."""
        s = Skipped(item, reason)
        self.skipped.append(s)
        return [s, *self._skip_lossy()]

    def _skip_lossy(self) -> list[Skipped]:
        """Skip lossy-cache items whose lossless sibling (with as much context) is measured or dominated: the
        lossy one is then no faster, not lower in perplexity and holds no more context (module rule 5)."""
        dominated = {s.item.key: s for s in self.skipped}
        new = []
        for it in self.pending():
            sib = self.lossless_sibling(it)
            if sib is None:
                continue
            if sib.key in self.measured:
                why = f"measured {sib.key}"
            elif sib.key in dominated:
                why = f"{sib.key}, itself skipped ({dominated[sib.key].reason})"
            else:
                continue
            new.append(Skipped(it, f"its cache is a lossy copy of the lossless one decoded every step (never faster, "
                                   f"perplexity not lower), and the same variant and split with the lossless cache "
                                   f"holds context {sib.ctx} >= {it.ctx}: {why}"))
        self.skipped.extend(new)
        return new
