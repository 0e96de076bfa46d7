"""Expert maps and the bounded Expert Map Store (FineMoE §3.1-3.2 of the spec).

An expert map is one iteration's router probabilities for one token, `[L, E]` float32, paired
with that token's semantic embedding `[D]`. The store keeps at most C rows; when full, a new row
overwrites the stored row it is most redundant with:

    RDY[x, y] = (d/L) * cos(emb_x, emb_y) + ((L - d)/L) * cos(vec map_x, vec map_y)

Plain torch (and NumPy views of the same memory for single-row searches) on the CPU; no
transformers, no CUDA. Not thread-safe: one thread owns a store (the
searcher's, when search runs asynchronously).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from finemoe.predictor import RankedRow, ranked_row

EPS = 1e-12
# TrajectoryQuery.best with candidates: the full search runs for layers 0..PRUNE_AT_LAYER-1, then
# only the rows leading at that point are followed.
PRUNE_AT_LAYER = 4
RANKED_CACHE = 16384  # ranked map rows kept (each a few lists of E items); cleared when full
SEMANTIC_CACHE = 1024  # single-query semantic matches kept by embedding; cleared when full or reloaded
# a remembered semantic match older than this many written rows is searched again, not brought up to date
SEMANTIC_CATCH_UP = 64
WRITE_LOG = 4096  # (version, row) of the latest writes kept, for copies that follow the store row by row


try:  # `np.einsum` without `optimize` hands its operands to this C function unchanged
    from numpy._core._multiarray_umath import c_einsum as _c_einsum
except ImportError:  # another NumPy layout: the public function (the same result, ~1.3 µs more per call)
    _c_einsum = np.einsum


_F32 = np.dtype(np.float32)


def _mv(mat: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """`mat` [C, K] @ `vec` [K] on the calling thread only. BLAS (NumPy's OpenBLAS) spreads even a
    1000 x 16 product over every core and its threads keep spinning afterwards, competing with
    torch's own threads: routing the semantic match (1000 x 576) through BLAS made the 2-core CPU
    decode step ~2x slower (docs/results/policies.md, overhead); einsum's loop stays on this thread.

    Small products through BLAS `dot` (one thread below 9,216 elements) were 4x faster but not
    kept (session 18): its kernel sums the last rows of a block in another order, so identical
    stored rows (a token stored twice) got scores differing in the last bit and `argmax` picked
    another copy, changing plans; einsum scores identical rows identically, on every machine."""
    return _c_einsum("ck,k->c", mat, vec)


@dataclass(frozen=True)
class SemanticPart:
    """`ExpertMapStore.semantic_part`: the embedding's share of the redundancy score [N, size] of N
    new rows, valid while the store is at `version` with semantic weight `weight`."""

    version: int
    part: torch.Tensor
    weight: float


@dataclass(frozen=True)
class StoreGeometry:
    """What a store's rows look like: L MoE layers, E experts each, D embedding width."""

    num_layers: int
    num_experts: int
    dim: int


class ExpertMapStore:
    """C rows of (embedding [D], map [L, E]) with redundancy-based replacement.

    Invariants: rows `[0, size)` are valid; `prefix_sq[c, m]` is the squared norm of row c's
    layers `0..m` flattened (so trajectory cosines over any prefix need no recomputation);
    `emb_unit` holds the unit-normalised embeddings.
    """

    def __init__(self, geometry: StoreGeometry, capacity: int = 1000, distance: int = 3) -> None:
        if capacity < 1:
            raise ValueError(f"map store capacity must be >= 1, got {capacity}")
        self.geometry = geometry
        self.capacity, self.distance = capacity, distance
        self.size = 0
        self.inserts = 0  # rows ever offered
        self.replacements = 0  # rows overwritten because the store was full
        self.version = 0  # counts writes: a copy elsewhere (`device_plans.DevicePlanner`) is current iff equal
        self._written: deque[tuple[int, int]] = deque(maxlen=WRITE_LOG)  # (version after, row) per write
        # (row * L + layer) -> that map row ranked for δ selection (`predictor.ranked_row`), made on
        # first use and dropped when the row is rewritten: decode keeps matching the same rows.
        self._ranked: dict[int, RankedRow] = {}
        # embedding bytes -> (score, row, version, raw) of a single-query semantic match at store
        # version `version` (raw: the row's unnormalised product): a token's embedding is the same
        # every time it recurs; a match made before later writes is brought up to date from the rows
        # written since (`_catch_up`), so a learning store keeps its matches too
        self._semantic: dict[bytes, tuple[float, int, int, float]] = {}
        # an insert held back (`add_later`), applied before anything reads or writes the store
        self._pending: tuple[torch.Tensor, torch.Tensor | Callable[[], torch.Tensor], SemanticPart | None] | None = None
        self._alloc(0)

    def _alloc(self, rows: int) -> None:
        """(Re)allocate room for `rows` rows (<= capacity), keeping the valid ones: memory grows
        with use, not with the capacity."""
        g, n = self.geometry, self.size
        old = (
            None
            if rows == 0
            else (self.emb, self.emb_unit, self.maps, self.prefix_sq, self.by_layer, self.prefix_norm, self.maps_unit)
        )
        self.allocated = rows
        # Normal tensors even when the store grows during generate (inference mode): inference
        # tensors could not be written outside it later (loading saved rows, pulling a search
        # process's rows back at reconfigure).
        with torch.inference_mode(False):
            self.emb = torch.zeros(rows, g.dim)  # [C, D]
            self.emb_unit = torch.zeros(rows, g.dim)  # [C, D]
            self.maps = torch.zeros(rows, g.num_layers, g.num_experts)  # [C, L, E]
            self.prefix_sq = torch.zeros(rows, g.num_layers)  # [C, L]
            # Layer-major copies for the per-layer trajectory step (contiguous [C, E] slices).
            self.by_layer = torch.zeros(g.num_layers, rows, g.num_experts)  # [L, C, E]
            self.prefix_norm = torch.zeros(g.num_layers, rows)  # [L, C] = sqrt(prefix_sq).T
            # [C, L*E] each map flattened over its norm sqrt(prefix_sq[:, -1]) (>= EPS): `redundancy`'s
            # stored side, kept per write rather than divided out again at every insert
            self.maps_unit = torch.zeros(rows, g.num_layers * g.num_experts)
            if old is not None and n:
                self.emb[:n], self.emb_unit[:n], self.maps[:n], self.prefix_sq[:n] = (t[:n] for t in old[:4])
                self.by_layer[:, :n], self.prefix_norm[:, :n] = old[4][:, :n], old[5][:, :n]
                self.maps_unit[:n] = old[6][:n]
        # NumPy views of the same memory: single-row searches dispatch much faster through NumPy.
        self._by_layer_np = self.by_layer.numpy()
        self._maps_np = self.maps.numpy()
        self._prefix_norm_np = self.prefix_norm.numpy()
        # [C, L] the prefix norms row-major, clipped to >= EPS: a pruned trajectory query gathers
        # its candidates' remaining layers as one run per row (`TrajectoryQuery.best`)
        self._norm_rows_np = np.ascontiguousarray(np.maximum(self._prefix_norm_np, EPS).T)
        # [L, C] the same clipped norms layer-major: the full search's per-layer divisor, one
        # contiguous slice (no clipping pass per layer)
        self._norm_layers_np = np.maximum(self._prefix_norm_np, EPS)
        self._emb_unit_np = self.emb_unit.numpy()

    def _room_for(self, rows: int) -> None:
        if rows > self.allocated:
            self._alloc(min(self.capacity, max(rows, 2 * self.allocated, 64)))

    # -- weights of the redundancy score --------------------------------------------------------
    @property
    def semantic_weight(self) -> float:
        """d / L, clipped to [0, 1]: the share of layers semantic search guides."""
        return min(max(self.distance / self.geometry.num_layers, 0.0), 1.0)

    def nbytes(self) -> int:
        parts = (self.emb, self.emb_unit, self.maps, self.prefix_sq, self.by_layer, self.prefix_norm, self.maps_unit)
        return sum(t.numel() * t.element_size() for t in parts) + 2 * self._norm_rows_np.nbytes

    # -- writes ---------------------------------------------------------------------------------
    def _write(self, row: int, emb: torch.Tensor, emap: torch.Tensor) -> None:
        self.version += 1
        self._written.append((self.version, row))
        if self._ranked:
            L = self.geometry.num_layers
            for key in range(row * L, row * L + L):
                self._ranked.pop(key, None)
        self.emb[row] = emb
        self.emb_unit[row] = emb / emb.norm().clamp_min(EPS)
        self.maps[row] = emap
        self.prefix_sq[row] = (emap * emap).sum(dim=1).cumsum(dim=0)
        self.by_layer[:, row] = emap
        self.prefix_norm[:, row] = self.prefix_sq[row].sqrt()
        self.maps_unit[row] = self.maps[row].reshape(-1) / self.prefix_sq[row, -1:].sqrt().clamp_min(EPS)
        self._norm_rows_np[row] = self._norm_layers_np[:, row] = np.maximum(self._prefix_norm_np[:, row], EPS)

    def rows_written_since(self, version: int, apply: bool = True) -> list[int] | None:
        """The rows written after `version` (ascending, each once), or None when the write log no
        longer reaches back that far (then a copy must take every row). `apply` False: an insert held
        back (`add_later`) stays held back and is not among them."""
        if apply and self._pending is not None:
            self.apply_pending()
        if version == self.version:
            return []
        log = self._written
        if version < 0 or not log or log[0][0] > version + 1:
            return None
        rows = set()
        for v, row in reversed(log):  # newest first: a step's copy reads only the few latest writes
            if v <= version:
                break
            rows.add(row)
        return sorted(rows)

    def clipped_norms(self) -> np.ndarray:
        """[L, size] the valid rows' prefix norms, clipped to >= EPS, layer-major (a NumPy view:
        read it before the next write)."""
        if self._pending is not None:
            self.apply_pending()
        return self._norm_layers_np[:, : self.size]

    def add(self, emb: torch.Tensor, maps: torch.Tensor, semantic: SemanticPart | None = None) -> list[int]:
        """Insert rows: `emb` [N, D], `maps` [N, L, E]. Returns the row each landed in.

        Appends while there is room; then each new row overwrites the stored row with the highest
        redundancy score against it, in order, so later rows see earlier replacements. `semantic`:
        `semantic_part(emb)` made earlier, used if the store has not changed since (the same result).
        """
        if self._pending is not None:
            self.apply_pending()
        emb, maps = emb.float().reshape(-1, self.geometry.dim), maps.float()
        maps = maps.reshape(-1, self.geometry.num_layers, self.geometry.num_experts)
        rows: list[int] = []
        n = emb.shape[0]
        self.inserts += n
        i = 0
        self._room_for(min(self.capacity, self.size + n))
        while i < n and self.size < self.capacity:
            self._write(self.size, emb[i], maps[i])
            rows.append(self.size)
            self.size += 1
            i += 1
        if i == n:
            return rows
        rest_emb, rest_maps = emb[i:], maps[i:]
        rdy = self.redundancy(rest_emb, rest_maps, semantic if i == 0 else None)  # [N', C]
        w_sem = self.semantic_weight
        if rest_emb.shape[0] > 1:  # (read only for the rows after the first: none in decode at batch 1)
            rest_emb_unit = rest_emb / rest_emb.norm(dim=1, keepdim=True).clamp_min(EPS)
            rest_flat = rest_maps.reshape(rest_maps.shape[0], -1)
            rest_flat_unit = rest_flat / rest_flat.norm(dim=1, keepdim=True).clamp_min(EPS)
        for j in range(rest_emb.shape[0]):
            y = int(torch.argmax(rdy[j]))
            self._write(y, rest_emb[j], rest_maps[j])
            self.replacements += 1
            rows.append(y)
            if j + 1 < rest_emb.shape[0]:  # later rows now compare against the new row y
                flat_y = self.maps[y].reshape(-1)
                flat_y = flat_y / flat_y.norm().clamp_min(EPS)
                rdy[j + 1 :, y] = w_sem * (rest_emb_unit[j + 1 :] @ self.emb_unit[y]) + (1 - w_sem) * (
                    rest_flat_unit[j + 1 :] @ flat_y
                )
        return rows

    def add_later(
        self,
        emb: torch.Tensor,
        maps: torch.Tensor | Callable[[], torch.Tensor],
        semantic: SemanticPart | None = None,
    ) -> None:
        """`add(emb, maps, semantic)`, held back until the store is next read or written (any method
        here, `apply_pending`): the same rows, in the same order, as an `add` now. A graphed decode
        step's map goes in this way, so that its insert runs when the next step first reads the
        store, where the GPU has that step's segments queued, instead of at its own end, where the
        GPU has nothing left (`history.HistoryRecorder`); `maps` may be a reader of them [N, L, E],
        called then (the device's record of the step, `StepRecord.later`). Attributes read directly
        (`size`, the tensors) are current only after `apply_pending`."""
        if self._pending is not None:
            self.apply_pending()
        self._pending = (emb, maps, semantic)

    def apply_pending(self) -> None:
        """Insert the row `add_later` held back (nothing if none)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            emb, maps, semantic = pending
            self.add(emb, maps() if callable(maps) else maps, semantic)

    def redundancy(self, emb: torch.Tensor, maps: torch.Tensor, semantic: SemanticPart | None = None) -> torch.Tensor:
        """RDY [N, size] of new rows (`emb` [N, D], `maps` [N, L, E]) against the stored rows; the
        embedding's share taken from `semantic` where it was made for these rows at this version."""
        if self._pending is not None:
            self.apply_pending()
        c = self.size
        flat = maps.reshape(maps.shape[0], -1)
        q_flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(EPS)
        w = self.semantic_weight
        if (
            semantic is not None
            and semantic.version == self.version
            and semantic.weight == w
            and semantic.part.shape == (flat.shape[0], c)
        ):
            part = semantic.part
        else:
            part = self.semantic_part(emb).part
        return part + (1 - w) * (q_flat @ self.maps_unit[:c].T)

    def semantic_part(self, emb: torch.Tensor) -> SemanticPart:
        """The embedding's share of `redundancy` for rows `emb` [N, D] at the store's current version:
        (d/L) * cos(emb, stored) [N, size], the same bits `redundancy` computes. Made early (a decode
        step's start, `history.HistoryRecorder`), it leaves only the maps' share to the insert."""
        if self._pending is not None:
            self.apply_pending()
        emb = emb.float().reshape(-1, self.geometry.dim)
        q_emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(EPS)
        w = self.semantic_weight
        return SemanticPart(self.version, w * (q_emb @ self.emb_unit[: self.size].T), w)

    # -- reads ----------------------------------------------------------------------------------
    def ranked(self, layer: int, row: int) -> RankedRow:
        """Stored row `row`'s map at `layer`, ranked for δ selection (`predictor.ranked_row`)."""
        if self._pending is not None:
            self.apply_pending()
        key = row * self.geometry.num_layers + layer
        hit = self._ranked.get(key)
        if hit is None:
            if len(self._ranked) >= RANKED_CACHE:
                self._ranked.clear()
            hit = self._ranked[key] = ranked_row(self._by_layer_np[layer, row])
        return hit

    def semantic_match(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best stored row per query embedding: (`scores` [N] cosine, `rows` [N]). Store non-empty."""
        if self._pending is not None:
            self.apply_pending()
        if emb.shape[0] == 1:
            score, row = self.semantic_match_one(emb[0])
            return torch.tensor([score]), torch.tensor([row])
        q = emb.float() / emb.float().norm(dim=1, keepdim=True).clamp_min(EPS)
        sim = q @ self.emb_unit[: self.size].T  # [N, size]
        scores, rows = sim.max(dim=1)
        return scores, rows

    def semantic_match_one(self, emb: torch.Tensor | np.ndarray) -> tuple[float, int]:
        """`semantic_match` of one embedding [D] (a tensor, or float32 NumPy) as plain numbers
        (score, row), the score rounded to float32 as `semantic_match`'s tensor holds it: NumPy,
        remembered by the embedding's bytes (and brought up to date after writes). Store non-empty."""
        if self._pending is not None:
            self.apply_pending()
        q = emb if isinstance(emb, np.ndarray) else emb.float().numpy()
        key = q.tobytes()
        hit = self._semantic.get(key)
        if hit is not None and hit[2] != self.version:
            hit = self._catch_up(hit, q)
            if hit is not None:
                self._semantic[key] = hit
        if hit is None:
            sim = _mv(self._emb_unit_np[: self.size], q)
            row = int(sim.argmax())
            raw = float(sim[row])
            hit = (float(np.float32(raw / max(float(np.sqrt(q @ q)), EPS))), row, self.version, raw)
            if len(self._semantic) >= SEMANTIC_CACHE:
                self._semantic.clear()
            self._semantic[key] = hit
        return hit[0], hit[1]

    def _catch_up(self, hit: tuple[float, int, int, float], q: np.ndarray) -> tuple[float, int, int, float] | None:
        """A remembered match of `q` brought to the store's version: the best row stays unless a row
        written since scores higher (or equal at a lower index: `argmax`'s first maximum), each scored
        by the same product as the full search (the same bits). None: search again (its best row was
        rewritten, or too many rows were written since)."""
        score, row, version, raw = hit
        if self.geometry.dim > np.getbufsize() or raw != raw:
            # (einsum sums a row longer than its buffer in chunks, in another order for a lone row
            # than inside the whole matrix; a NaN score wins `argmax`, never a comparison)
            return None
        written = self.rows_written_since(version)
        if written is None or len(written) > SEMANTIC_CATCH_UP or row in written:
            return None
        sims = _mv(self._emb_unit_np[written], q)  # [n] (rows gathered: each scored as in `_mv` over all)
        if np.isnan(sims).any():
            return None
        best, best_raw = row, raw
        for y, s in zip(written, sims.tolist(), strict=True):
            if s > best_raw or (s == best_raw and y < best):
                best, best_raw = y, s
        if best != row:
            score = float(np.float32(best_raw / max(float(np.sqrt(q @ q)), EPS)))
        return score, best, self.version, best_raw

    def trajectory_scores_from_scratch(self, traj: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Cosine [N, size] of trajectories `traj` [N, m, E] (layers start..start+m-1) with the
        same layers of every stored row."""
        if self._pending is not None:
            self.apply_pending()
        n, m, _ = traj.shape
        q = traj.reshape(n, -1)
        stored = self.maps[: self.size, start : start + m].reshape(self.size, -1)
        num = q @ stored.T
        den = q.norm(dim=1, keepdim=True) * stored.norm(dim=1).unsqueeze(0)
        return num / den.clamp_min(EPS)

    def state(self) -> dict[str, torch.Tensor]:
        """The valid rows, for persistence: emb [size, D], maps [size, L, E]."""
        if self._pending is not None:
            self.apply_pending()
        return {"emb": self.emb[: self.size].clone(), "maps": self.maps[: self.size].clone()}

    def load_rows(self, emb: torch.Tensor, maps: torch.Tensor) -> None:
        """Replace the contents with saved rows (at most `capacity`; the newest kept if more)."""
        if self._pending is not None:
            self.apply_pending()
        self.size = 0
        self._semantic.clear()
        emb, maps = emb[-self.capacity :], maps[-self.capacity :]
        self._room_for(emb.shape[0])
        for i in range(emb.shape[0]):
            self._write(i, emb[i].float(), maps[i].float())
        self.size = emb.shape[0]


class TrajectoryQuery:
    """Incremental trajectory matching for N query rows against a store (spec §3.4).

    After `extend(m, probs)` for layers 0..m in order, the scores equal the cosine of each query's
    flattened layers 0..m with every stored row's layers 0..m (the paper), at O(C * E) per layer
    instead of O(C * m * E). With `window` w > 0 only the latest w layers m-w+1..m count (a
    measured variant, see docs/design/finemoe.md). The store must not change between `extend`
    calls of one query. A single query row (decode at batch 1) may use `best()` instead.
    """

    def __init__(self, store: ExpertMapStore, num_rows: int, window: int = 0, candidates: int = 0) -> None:
        store.apply_pending()
        self.store, self.window = store, window
        # best(): from layer `prune_at` on, follow only the `candidates` best-scoring rows (0: all)
        self.candidates = candidates if 0 < candidates < store.size and window <= 0 else 0
        self.prune_at = PRUNE_AT_LAYER
        self._cand: np.ndarray | None = None  # [K] store rows followed
        self._cdot: np.ndarray | None = None  # [K] their running dot products
        self._cbase = 0  # the first layer after the pruning
        self._cmaps: np.ndarray | None = None  # [K, L - cbase, E] their maps from layer cbase on
        self._cnorm: np.ndarray | None = None  # [K, L - cbase] their prefix norms (>= EPS) likewise
        self._rows = num_rows
        self._dot: torch.Tensor | None = None  # [N, size] running dot products (`dot`, made on first use)
        self._q_sq: torch.Tensor | None = None  # [N] running squared norms (`q_sq`, likewise)
        # best(): the single row's running dot products, updated in place (`dot`'s memory, if made)
        self._dot1 = np.zeros(store.size, dtype=np.float32) if num_rows == 1 else None
        self._q1 = 0.0  # best(): the single row's running squared norm
        self.layers = 0
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (dot [N, size], q_sq [N])

    @property
    def dot(self) -> torch.Tensor:
        """[N, size] running dot products of `extend` (made on first use: a batch-1 decode query
        that only calls `best` makes no tensor)."""
        if self._dot is None:
            one = self._dot1
            self._dot = torch.from_numpy(one)[None] if one is not None else torch.zeros(self._rows, self.store.size)
        return self._dot

    @property
    def q_sq(self) -> torch.Tensor:
        """[N] running squared norms of `extend` (made on first use)."""
        if self._q_sq is None:
            self._q_sq = torch.zeros(self._rows)
        return self._q_sq

    def _stored_norm(self, layer: int) -> torch.Tensor:
        """Norms [size] of every stored row's compared layers (prefix, or the window)."""
        s, w = self.store, self.window
        if w <= 0 or layer < w:
            return s.prefix_norm[layer, : s.size]
        sq = s.prefix_sq[: s.size, layer] - s.prefix_sq[: s.size, layer - w]
        return sq.clamp_min(0).sqrt()

    def extend(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """Add layer `layer`'s probabilities `probs` [N, E]; returns the scores [N, size]."""
        if layer != self.layers:
            raise ValueError(f"trajectory layers must arrive in order: expected {self.layers}, got {layer}")
        s = self.store
        probs = probs.float()
        d = probs @ s.by_layer[layer, : s.size].T
        q = (probs * probs).sum(dim=1)
        dot, q_sq = self.dot, self.q_sq
        dot += d
        q_sq += q
        if self.window > 0:
            self._parts.append((d, q))
            if len(self._parts) > self.window:
                old_d, old_q = self._parts.pop(0)
                dot -= old_d
                q_sq -= old_q
        self.layers += 1
        den = self.q_sq.clamp_min(0).sqrt().unsqueeze(1) * self._stored_norm(layer).unsqueeze(0)
        return self.dot / den.clamp_min(EPS)

    def best(self, layer: int, probs: torch.Tensor | np.ndarray) -> tuple[float, int]:
        """`extend` for a single query row [E], returning only its best (score, row): the query's
        norm is common to every row, so the argmax needs one division fewer. NumPy, no torch ops."""
        if layer != self.layers:
            raise ValueError(f"trajectory layers must arrive in order: expected {self.layers}, got {layer}")
        s = self.store
        if type(probs) is not np.ndarray or probs.dtype is not _F32:  # (host rows arrive as float32 NumPy)
            probs = probs.float().numpy() if isinstance(probs, torch.Tensor) else probs.astype(np.float32)
        p = probs
        if self._cand is not None:
            return self._best_pruned(layer, p)
        dot = self._dot1
        d = _mv(s._by_layer_np[layer, : s.size], p)
        q = float(p.dot(p))  # (`@` gives the same sdot, through the slower matmul dispatch)
        dot += d
        q_sq = self._q1 + q
        if self.window > 0:
            self._parts.append((d, q))
            if len(self._parts) > self.window:
                old_d, old_q = self._parts.pop(0)
                dot -= old_d
                q_sq -= old_q
        self._q1 = q_sq
        self.layers += 1
        if self.window > 0 and layer >= self.window:
            norm = np.maximum(self._stored_norm(layer).numpy(), EPS)
        else:
            norm = s._norm_layers_np[layer, : s.size]  # (clipped to >= EPS)
        ratio = dot / norm
        row = int(ratio.argmax())
        if self.candidates and layer + 1 >= self.prune_at:
            k = self.candidates  # the rows still in the running: the best k so far (the best included)
            self._cand = cand = np.argpartition(-ratio, k - 1)[:k]
            self._cdot = dot[cand].copy()
            # the rows' remaining layers gathered once, not per layer (the same numbers), from the
            # row-major maps: one run per row (the layer-major copy scatters them). Read per layer as
            # a strided [K, E] view: einsum sums each row's contiguous E the same way, and a
            # layer-major copy cost more than the views (10.7 against 2.1 µs per iteration)
            self._cbase = layer + 1
            self._cmaps = s._maps_np[cand, layer + 1 :]  # [K, L-b, E]
            self._cnorm = s._norm_rows_np[cand, layer + 1 :]  # [K, L-b], likewise (>= EPS)
        return float(ratio[row]) / max(max(q_sq, 0.0) ** 0.5, EPS), row

    def _best_pruned(self, layer: int, p: np.ndarray) -> tuple[float, int]:
        """`best` over the candidate rows only: [K, E] per layer instead of [C, E]."""
        i = layer - self._cbase
        self._cdot += _c_einsum("ck,k->c", self._cmaps[:, i], p)  # [K, E] view (`_mv`, without its frame)
        self._q1 += float(p.dot(p))
        self.layers += 1
        ratio = self._cdot / self._cnorm[:, i]
        i = int(ratio.argmax())
        return float(ratio[i]) / max(self._q1**0.5, EPS), int(self._cand[i])
