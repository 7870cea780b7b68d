"""The scheduler: which stage outputs are kept, the passes over the tiles, and the halo a tile reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastlatent.ops.group_norm import group_norm_stats, merge_group_stats
from fastlatent.tiling.graph import StageGraph
from fastlatent.tiling.regions import Region, clamp, contains, crop, union
from fastlatent.tiling.stages import AttentionStage


@dataclass
class TiledRunInfo:
    """What a tiled run did (pass ``info=TiledRunInfo()`` to fill one in).

    Attributes:
        tiles: tiles per pass (rows x columns of the grid).
        passes: passes over the tiles (statistics, stores, keys/values and the output pass).
        stage_evaluations: stage computations over a tile (the unit of work; an untiled run is one per stage).
        stages: stages of the schedule.
        halo: the largest halo, in input pixels, a tile reads around itself.
        stored_bytes: peak bytes of activations kept between passes (on the host with ``store="host"``).
        stats_from: where the GroupNorm statistics came from: always "image" (the whole image).
    """

    tiles: int = 0
    passes: int = 0
    stage_evaluations: int = 0
    stages: int = 0
    halo: int = 0
    stored_bytes: int = 0
    stats_from: str = "image"


class GroupStats:
    """Whole-input statistics of one stage for one group count: (mean, var) in float64 [N, G]."""

    def __init__(self, mean, var):
        self.mean, self.var = mean, var
        self._cache = {}

    def mean_rstd(self, eps):
        if eps not in self._cache:
            self._cache[eps] = (self.mean.float(), torch.rsqrt(self.var + eps).float())
        return self._cache[eps]


def stage_roles(stages, store: str):
    """Consumers of each stage, the group counts whose statistics each stage's output needs, and which stage
    outputs are kept between passes: those read by a GroupNorm (or by two consumers, e.g. a residual add),
    unless
    everything is recomputed."""
    k = len(stages)
    consumers = [[] for _ in range(k)]
    for i, s in enumerate(stages):
        for d in s.deps:
            consumers[d].append(i)
    stats_groups = [set() for _ in range(k)]
    for s in stages:
        if s.norm is not None:
            stats_groups[s.deps[0]].add(s.norm.groups)
    if store == "recompute":
        stored = [i == 0 for i in range(k)]
    else:
        stored = [
            i == 0 or (i != k - 1 and (bool(stats_groups[i]) or len(consumers[i]) > 1)) for i in range(k)
        ]
    return consumers, stats_groups, stored


class TileScheduler:
    """Runs a :class:`StageGraph` over a grid of tiles, in passes, with bounded memory.

    Vocabulary: stage ``k`` of the graph has its own pixel grid (``stages[k].size``) cut into the same rows x
    columns of tiles (``stages[k].cell`` pixels each, so a tile is the same part of the image at every
    resolution). Stage 0 is the input tensor.

    What ``__init__`` decides (all from the graph, before any computation):

    * ``consumers[k]``: the stages that read stage ``k``; ``stats_groups[k]``: the GroupNorm group counts
      whose
      whole-image statistics stage ``k``'s output needs (one per GroupNorm reading it).
    * ``stored[k]``: whether stage ``k``'s output is kept between passes, per tile with the halo its readers
      need (``_plan``): outputs read by a GroupNorm or by two consumers, unless ``store="recompute"`` (then
      only
      the input is "stored").
    * ``pass_stage[k]``: whether there is a pass over all tiles ending at stage ``k``: stored stages, stages
      whose statistics must be gathered, and the last stage (whose pass writes the output).
    * ``last_read[k]`` / ``last_eval[k]``: after which pass stage ``k``'s stored tiles (its attention keys and
      values) are no longer read and are freed.

    :meth:`run` then makes the passes in stage order. Pass ``k`` evaluates stage ``k`` on every tile
    (:meth:`evaluate` computes, with their halos, the stages between it and the nearest materialised ones),
    accumulates per-tile ``(mean, M2)`` for the GroupNorms that read it, stores the tile when ``stored[k]``,
    and, for the last stage, copies the tile's core into the output. After the pass its statistics are merged
    (:class:`GroupStats`), and stages no later pass reads are freed. An attention stage first computes keys
    and
    values of the whole image tile by tile (``prepare``), then serves queries per tile.
    """

    def __init__(
        self,
        graph: StageGraph,
        store: str,
        batch: int,
        device: torch.device,
        progress,
        info: TiledRunInfo,
        desc: str,
    ):
        self.stages = graph.stages
        self.store_kind = store
        self.batch, self.device = batch, device
        self.info = info
        k = len(self.stages)
        self.consumers, self.stats_groups, self.stored = stage_roles(self.stages, store)
        self.stats: dict = {}
        self.need_stats_pass = [any((i, g) not in self.stats for g in self.stats_groups[i]) for i in range(k)]
        last = k - 1
        self.pass_stage = [
            i != 0 and (self.stored[i] or self.need_stats_pass[i] or i == last) for i in range(k)
        ]
        # the last pass that reads each stage (to free stored tiles after it)
        reach = [-1] * k
        for i in reversed(range(k)):
            r = i if self.pass_stage[i] else -1
            for c in self.consumers[i]:
                r = max(r, c if self.stored[c] else reach[c])
            reach[i] = r
        self.last_read = [
            max([c if self.stored[c] else reach[c] for c in self.consumers[i]], default=-1) for i in range(k)
        ]
        # the last pass that evaluates each stage (attention keys and values are dropped after it)
        self.last_eval = [i if self.stored[i] else reach[i] for i in range(k)]
        base = self.stages[0]
        rows = math.ceil(base.size[0] / base.cell[0])
        cols = math.ceil(base.size[1] / base.cell[1])
        self.tiles = [(i, j) for i in range(rows) for j in range(cols)]
        self.materialized = [i == 0 for i in range(k)]
        self.store: dict = {}
        self.stored_bytes = 0
        self._plans = {t: self._plan(t) for t in self.tiles}
        self.passes = sum(self.pass_stage) + sum(isinstance(s, AttentionStage) for s in self.stages)
        info.tiles, info.passes, info.stages = len(self.tiles), self.passes, k - 1
        self._bar = None
        if progress is not False:
            self._bar = tqdm(
                total=self.passes * len(self.tiles),
                desc=desc,
                unit="tile",
                disable=None if progress is None else False,
                leave=False,
            )

    # -- geometry

    def core(self, k: int, t) -> Region:
        s = self.stages[k]
        (i, j), (ch, cw) = t, s.cell
        return clamp((i * ch, (i + 1) * ch, j * cw, (j + 1) * cw), s.size)

    def _propagate(self, targets: dict, stop) -> dict:
        """Regions each stage must produce so that ``targets`` can be computed; stages where ``stop`` holds
        are
        read as they are."""
        need = dict(targets)
        for j in range(max(need), -1, -1):
            r = need.get(j)
            if r is None or stop(j):
                continue
            s = self.stages[j]
            for pos, d in enumerate(s.deps):
                need[d] = union(need.get(d), clamp(s.input_region(pos, r), self.stages[d].size))
        return need

    def _plan(self, t) -> dict:
        """For tile t: the region every stage may be asked for (stored stages keep exactly this)."""
        targets = {k: self.core(k, t) for k in range(1, len(self.stages)) if self.pass_stage[k]}
        return self._propagate(targets, stop=lambda j: j == 0)

    # -- statistics

    def _accumulate(self, parts, k, t, value, have):
        core = self.core(k, t)
        x = crop(value, have, core)
        for g in self.stats_groups[k]:
            if (k, g) in self.stats:
                continue
            count = (x.shape[1] // g) * x.shape[2] * x.shape[3]
            parts.setdefault(g, []).append((group_norm_stats(x, g), count))

    def _finish_stats(self, k, parts):
        for g, items in parts.items():
            mean, m2, count = merge_group_stats([p for p, _ in items], [c for _, c in items])
            self.stats[(k, g)] = GroupStats(mean, m2 / count)

    def stats_by_group(self, k):
        return {g: self.stats[(k, g)] for g in self.stats_groups[k]}

    # -- storage

    def _put(self, k, t, region, value):
        if self.store_kind == "host" and value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            value = host
        self.store[(k, t)] = (region, value)
        self.stored_bytes += value.numel() * value.element_size()
        self.info.stored_bytes = max(self.info.stored_bytes, self.stored_bytes)

    def _get(self, k, t, want: Region):
        if k == 0:
            x = self.stages[0].tensor[:, :, want[0] : want[1], want[2] : want[3]]
            return x.to(self.device, non_blocking=True)
        have, value = self.store[(k, t)]
        if not contains(have, want):
            raise RuntimeError(
                f"fastlatent.tiled: internal error, stage {self.stages[k].name} tile {t} holds "
                f"{have} but {want} was asked for"
            )
        # the whole kept tile in one contiguous copy (a strided slice of host memory would copy synchronously)
        return crop(value.to(self.device, non_blocking=True), have, want)

    def _free_after(self, p):
        for k in range(1, len(self.stages)):
            if self.stored[k] and self.materialized[k] and self.last_read[k] == p:
                for t in self.tiles:
                    _, value = self.store.pop((k, t), (None, None))
                    if value is not None:
                        self.stored_bytes -= value.numel() * value.element_size()
        for k, s in enumerate(self.stages):
            if isinstance(s, AttentionStage) and self.last_eval[k] <= p:
                s.release()

    # -- evaluation

    def evaluate(self, k: int, t, region: Region) -> torch.Tensor:
        """Stage k over ``region`` of tile t, computing whatever is not stored."""
        available = lambda j: self.materialized[j]  # noqa: E731
        need = self._propagate({k: region}, stop=available)
        uses = {j: 0 for j in need}
        for j in need:
            if not available(j):
                for d in self.stages[j].deps:
                    uses[d] += 1
        values = {}
        for j in sorted(need):
            r = need[j]
            if available(j):
                values[j] = (r, self._get(j, t, r))
                continue
            s = self.stages[j]
            values[j] = (r, s.compute(r, [values[d] for d in s.deps], self))
            self.info.stage_evaluations += 1
            for d in s.deps:
                uses[d] -= 1
                if uses[d] == 0 and d != k:
                    del values[d]
        return values[k][1]

    def tick(self):
        if self._bar is not None:
            self._bar.update(1)

    def run(self, out: torch.Tensor) -> None:
        last = len(self.stages) - 1
        try:
            for k in range(1, len(self.stages)):
                s = self.stages[k]
                if isinstance(s, AttentionStage):
                    s.prepare(self)
                if not self.pass_stage[k]:
                    continue
                parts = {}
                for t in self.tiles:
                    region = self._plans[t][k] if self.stored[k] else self.core(k, t)
                    value = self.evaluate(k, t, region)
                    if self.need_stats_pass[k]:
                        self._accumulate(parts, k, t, value, region)
                    if self.stored[k]:
                        self._put(k, t, region, value)
                    if k == last:
                        core = self.core(k, t)
                        out[:, :, core[0] : core[1], core[2] : core[3]].copy_(
                            crop(value, region, core), non_blocking=True
                        )
                    del value
                    self.tick()
                self._finish_stats(k, parts)
                self.materialized[k] = self.stored[k]
                self._free_after(k)
        finally:
            for s in self.stages:
                if isinstance(s, AttentionStage):
                    s.release()
            self.store.clear()
            if self._bar is not None:
                self._bar.close()
        if out.is_cuda or self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def max_halo(graph: StageGraph, store: str) -> int:
    """The farthest, in input pixels, that a tile's computation reads beyond the tile (for a tile far from the
    image border, where nothing is clamped)."""
    stages = graph.stages
    _, stats_groups, stored = stage_roles(stages, store)
    far = 1 << 40
    saved = [(s.size, getattr(s, "in_size", None)) for s in stages]
    try:
        for s in stages:  # an unbounded image
            s.size = (far, far)
            if hasattr(s, "in_size"):
                s.in_size = (far, far)
        mid = 1 << 20

        def interior(j):
            c = stages[j].cell
            return (mid * c[0], (mid + 1) * c[0], mid * c[1], (mid + 1) * c[1])

        worst = 0.0
        for target in range(1, len(stages)):
            if not (stored[target] or stats_groups[target] or target == len(stages) - 1):
                continue
            need = {target: interior(target)}
            for j in range(target, -1, -1):
                r = need.get(j)
                if r is None or (stored[j] and j != target):
                    continue
                for pos, d in enumerate(stages[j].deps):
                    need[d] = union(need.get(d), stages[j].input_region(pos, r))
            for j, r in need.items():
                base = interior(j)
                beyond = max(base[0] - r[0], r[1] - base[1], base[2] - r[2], r[3] - base[3])
                worst = max(worst, beyond * stages[0].cell[0] / stages[j].cell[0])
    finally:
        for s, (size, in_size) in zip(stages, saved):
            s.size = size
            if in_size is not None:
                s.in_size = in_size
    return math.ceil(worst)
