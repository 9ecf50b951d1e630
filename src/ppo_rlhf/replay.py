"""A replay buffer of scored experience rows, for updates that accept off-policy data.

The buffer holds the rows of past rollouts (an `Experience`, or any NamedTuple / mapping of
tensors with one row per sample) with the policy version that sampled each row:

    buffer = ReplayBuffer(capacity=4096, max_staleness=4, pad_id=tok.pad_token_id, row_type=Experience)
    buffer.add(exp, version=iteration)              # after scoring the iteration's rollout
    buffer.evict_stale(current_version=iteration)   # rows more than 4 versions behind go
    plan = replay_plan(iteration, new_rows=B, replay_ratio=0.25, minibatch_rows=M)
    for _ in range(plan.updates):
        mb = buffer.sample(M // group_size, generator)   # mb.rows: an Experience of whole groups
        ...  # recompute the proximal log-probs, IS-correct (algo/off_policy.py), step

- Bounds: `capacity` rows (the oldest groups are evicted first) and `max_staleness` policy
  versions (a row sampled at version v is dropped once current - v > max_staleness).
- Groups: the consecutive rows of one prompt (equal consecutive `groups` ids) are added, evicted
  and sampled together, so group-relative estimators stay valid on replayed rows. The buffer gives
  every group its own key (rollouts reuse `groups` ids), and sampled rows carry that key in
  `groups`.
- Widths: rows of rollouts with different prompt / response widths concatenate: the sequence fields
  (B, P+R) are left-padded in the prompt part and right-padded in the response part, response
  fields (B, R) right-padded (`rollout.pad_scored`'s convention); sequences pad with `pad_id`,
  booleans with False, numbers with 0. Columns that are padding in every row are trimmed, so a
  minibatch is only as wide as its rows.
- Determinism: `sample` draws from the `torch.Generator` it is given; `state_dict()` holds every
  row, version and key (tensors and ints: `torch.load(weights_only=True)` loads it), so a resumed
  run samples the same minibatches.

Under torchrun there are two ways to run it:

- replicated (rank=0, world_size=1 on every rank, the default): the trainer gathers the global
  rollout on every rank, so every rank's buffer holds the same rows; with the same generator seed
  all ranks draw the same global minibatch and split it by rank as the on-policy update does. The
  checkpoint saves rank 0's state.
- sharded (rank=r, world_size=W): rank r keeps the groups whose key k has k % W == r, so each
  rank stores 1/W of the rows (give each `capacity // W`). Each rank samples its own part of the
  minibatch (`num_groups // W` groups, a generator seeded per rank) and the loss normalisers
  (token counts) are all-reduced. To checkpoint, gather the ranks' `state_dict()`s to rank 0
  (`torch.distributed.gather_object`) and save `merge_shards(states)`; on resume every rank loads
  the merged state and keeps its own shard -- at any world size, since the shard is a function of
  the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

SEQUENCE_FIELDS = ("sequences", "attention_mask")
RESPONSE_FIELDS = ("response_mask", "loss_mask", "logprobs", "behaviour_logprobs", "prox_logprobs",
                   "ref_logprobs", "values", "rewards", "advantages", "returns", "kl", "entropy", "dense")
REQUIRED_FIELDS = ("sequences", "response_mask", "groups")


class ReplaySample(NamedTuple):
    """A sampled minibatch: `rows` (the buffer's row type, or a dict of tensors), each row's
    policy `versions` (B,) and its position `index` (B,) in the buffer at sampling time."""

    rows: Any
    versions: Tensor
    index: Tensor


class ReplayPlan(NamedTuple):
    """What one iteration takes from the buffer: `updates` gradient updates, one minibatch of
    `minibatch_rows` rows each, `rows` = updates * minibatch_rows rows drawn in all."""

    updates: int
    rows: int


def replay_plan(iteration: int, new_rows: int, replay_ratio: float, minibatch_rows: int) -> ReplayPlan:
    """Gradient updates of iteration `iteration` (0-based) at `replay_ratio` updates per newly
    sampled row, with `new_rows` rows sampled per iteration:

        updates_k = floor(rho * N * (k + 1)) - floor(rho * N * k)

    so a fractional rho * N (say 2.5 updates per iteration) alternates 2, 3, 2, 3 and the total
    after k iterations is floor(rho * N * k): exact over time and a pure function of the iteration
    (nothing to checkpoint). On-policy PPO with E epochs of K minibatches over N rows is
    rho = E * K / N; each new row is then used rho * minibatch_rows times on average.
    """
    if replay_ratio < 0 or new_rows < 0 or minibatch_rows < 1 or iteration < 0:
        raise ValueError(f"replay_plan needs replay_ratio >= 0, new_rows >= 0, minibatch_rows >= 1 and "
                         f"iteration >= 0 (got {replay_ratio}, {new_rows}, {minibatch_rows}, {iteration})")
    # Fraction(str(x)) is the decimal the config wrote: 0.3 * 10 in floats is 2.9999999999999996,
    # whose floor would lose an update.
    per_iteration = Fraction(str(replay_ratio)) * new_rows
    updates = int(per_iteration * (iteration + 1)) - int(per_iteration * iteration)
    return ReplayPlan(updates, updates * minibatch_rows)


def _columns(batch) -> dict[str, Tensor]:
    cols = batch._asdict() if hasattr(batch, "_asdict") else dict(batch)
    for name, value in cols.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"replay rows must be tensors; field {name!r} is a {type(value).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in cols]
    if missing:
        raise ValueError(f"replay rows need the fields {', '.join(missing)}")
    return cols


def _pad_value(name: str, t: Tensor, pad_id: int) -> float | int | bool:
    if name == "sequences":
        return pad_id
    return False if t.dtype == torch.bool else 0


class ReplayBuffer:
    """Rows of scored experience with their policy versions; see the module docstring."""

    def __init__(self, capacity: int, max_staleness: int | None = None, *, pad_id: int, row_type: type | None = None,
                 sequence_fields: Sequence[str] = SEQUENCE_FIELDS, response_fields: Sequence[str] = RESPONSE_FIELDS,
                 rank: int = 0, world_size: int = 1):
        if capacity < 1:
            raise ValueError(f"replay capacity must be at least 1 row (got {capacity})")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"replay max_staleness must be >= 0 policy versions or None (got {max_staleness})")
        if not 0 <= rank < world_size:
            raise ValueError(f"replay shard rank {rank} is not in [0, world_size={world_size})")
        self.capacity, self.max_staleness, self.pad_id, self.row_type = capacity, max_staleness, pad_id, row_type
        self.sequence_fields, self.response_fields = tuple(sequence_fields), tuple(response_fields)
        self.rank, self.world_size = rank, world_size
        self._cols: dict[str, Tensor] = {}
        self._version = torch.zeros(0, dtype=torch.long)
        self._key = torch.zeros(0, dtype=torch.long)  # group key: the order groups were offered in
        self._next_key = 0  # groups offered so far, on all shards

    def __len__(self) -> int:
        return int(self._key.numel())

    @property
    def num_groups(self) -> int:
        return int(torch.unique_consecutive(self._key).numel())

    # -- layout -------------------------------------------------------------------------------------
    def _widths(self, cols: Mapping[str, Tensor]) -> tuple[int, int]:
        """(prompt width P, response width R) of a set of columns."""
        R = cols["response_mask"].size(1)
        return cols["sequences"].size(1) - R, R

    def _pad(self, cols: dict[str, Tensor], P: int, R: int) -> dict[str, Tensor]:
        """The columns padded to prompt width P and response width R."""
        P0, R0 = self._widths(cols)
        left, right = P - P0, R - R0
        if left == 0 and right == 0:
            return cols
        out = {}
        for name, t in cols.items():
            if name in self.sequence_fields:
                t = F.pad(t, (left, right), value=_pad_value(name, t, self.pad_id))
            elif name in self.response_fields:
                t = F.pad(t, (0, right), value=_pad_value(name, t, self.pad_id))
            out[name] = t
        return out

    def _trim(self, cols: dict[str, Tensor]) -> dict[str, Tensor]:
        """The columns without the prompt columns that are left padding in every row and the
        response columns that are right padding in every row."""
        if not cols or cols["sequences"].size(0) == 0:
            return cols
        P, R = self._widths(cols)
        # the attention mask marks real prompt tokens; without one, the pad id does
        real = cols["attention_mask"] if "attention_mask" in cols else cols["sequences"] != self.pad_id
        lead = int((~real[:, :P].bool()).all(0).int().cumprod(0).sum())
        lead = min(lead, P - 1)  # keep one prompt column: position P - 1 predicts the first response token
        used = cols["response_mask"].bool().any(0)
        keep_r = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
        if lead == 0 and keep_r == R:
            return cols
        out = {}
        for name, t in cols.items():
            if name in self.sequence_fields:
                t = t[:, lead:P + keep_r]
            elif name in self.response_fields:
                t = t[:, :keep_r]
            out[name] = t
        return out

    # -- adding and evicting ------------------------------------------------------------------------
    def add(self, batch, version: int | Tensor) -> int:
        """Add a rollout's rows (B of them, groups consecutive) sampled by policy `version` (an int,
        or (B,) per row); keeps this shard's groups and evicts the oldest groups beyond capacity.
        Returns the number of rows added to this shard."""
        cols = _columns(batch)
        B = cols["sequences"].size(0)
        for name, t in cols.items():
            if t.size(0) != B:
                raise ValueError(f"replay field {name!r} has {t.size(0)} rows, sequences has {B}")
        groups = cols["groups"]
        starts = torch.ones(B, dtype=torch.bool, device=groups.device)
        starts[1:] = groups[1:] != groups[:-1]
        key = self._next_key + starts.long().cumsum(0) - 1
        largest = int(torch.unique_consecutive(key, return_counts=True)[1].max()) if B else 0
        if largest > self.capacity:
            raise ValueError(f"a group of {largest} rows does not fit in a replay buffer of capacity "
                             f"{self.capacity} rows: raise the capacity")
        self._next_key += int(starts.sum())
        versions = torch.as_tensor(version, dtype=torch.long).expand(B).to(key.device)
        mine = key % self.world_size == self.rank
        cols = {name: t[mine].detach() for name, t in cols.items()}
        self._append(cols, versions[mine], key[mine])
        self._evict_to(self.capacity)
        return int(mine.sum())

    def _append(self, cols: dict[str, Tensor], version: Tensor, key: Tensor) -> None:
        if self._cols:
            if set(cols) != set(self._cols):
                raise ValueError(f"replay rows changed fields: buffer has {sorted(self._cols)}, "
                                 f"added rows have {sorted(cols)}")
            (P0, R0), (P1, R1) = self._widths(self._cols), self._widths(cols)
            P, R = max(P0, P1), max(R0, R1)
            old, new = self._pad(self._cols, P, R), self._pad(cols, P, R)
            for name in old:
                if old[name].shape[1:] != new[name].shape[1:]:
                    raise ValueError(f"replay field {name!r} has shape {tuple(new[name].shape[1:])} per row, the "
                                     f"buffer {tuple(old[name].shape[1:])}: a (B, R) field must be listed in "
                                     "response_fields, a (B, P+R) one in sequence_fields")
            cols = {name: torch.cat([old[name], new[name].to(old[name].device)]) for name in old}
            version = torch.cat([self._version, version.to(self._version.device)])
            key = torch.cat([self._key, key.to(self._key.device)])
        self._cols, self._version, self._key = self._trim(cols), version.cpu(), key.cpu()

    def _keep(self, rows: Tensor) -> int:
        """Keep only rows `rows` (bool (N,)); returns the number dropped."""
        dropped = len(self) - int(rows.sum())
        if dropped:
            self._cols = self._trim({name: t[rows.to(t.device)] for name, t in self._cols.items()})
            self._version, self._key = self._version[rows], self._key[rows]
        return dropped

    def _evict_to(self, capacity: int) -> int:
        """Evict the oldest whole groups until at most `capacity` rows remain."""
        if len(self) <= capacity:
            return 0
        keys, counts = torch.unique_consecutive(self._key, return_counts=True)
        # rows kept if we keep the groups from i on: suffix sums of the group sizes
        from_here = counts.flip(0).cumsum(0).flip(0)
        fits = (from_here <= capacity).nonzero()
        first = keys[fits[0, 0]] if fits.numel() else self._next_key
        return self._keep(self._key >= first)

    def evict_stale(self, current_version: int) -> int:
        """Drop rows sampled more than max_staleness versions before `current_version`; returns
        how many. (A group shares one version, so groups go whole.)"""
        if self.max_staleness is None or not len(self):
            return 0
        return self._keep(current_version - self._version <= self.max_staleness)

    # -- sampling -----------------------------------------------------------------------------------
    def sample(self, num_groups: int, generator: torch.Generator) -> ReplaySample:
        """A minibatch of `num_groups` distinct groups, uniformly without replacement, drawn from
        `generator` (on the CPU); rows in buffer order (oldest first), padding-only columns trimmed."""
        keys, counts = torch.unique_consecutive(self._key, return_counts=True)
        if num_groups < 1 or num_groups > keys.numel():
            raise ValueError(f"cannot sample {num_groups} groups from a replay buffer holding {keys.numel()} "
                             "(fill it first: sample at most buffer.num_groups)")
        chosen = torch.randperm(keys.numel(), generator=generator)[:num_groups].sort().values
        starts = counts.cumsum(0) - counts
        index = torch.cat([torch.arange(int(starts[g]), int(starts[g] + counts[g])) for g in chosen.tolist()])
        cols = {name: t[index.to(t.device)] for name, t in self._cols.items()}
        cols["groups"] = self._key[index].to(cols["groups"].device, cols["groups"].dtype)
        cols = self._trim(cols)
        rows = self.row_type(**cols) if self.row_type is not None else cols
        return ReplaySample(rows, self._version[index], index)

    # -- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every row, its version and group key, and the key counter (CPU tensors and ints)."""
        return {"columns": {name: t.cpu() for name, t in self._cols.items()}, "version": self._version.clone(),
                "key": self._key.clone(), "next_key": self._next_key}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` -- this buffer's own, or `merge_shards` of all ranks' (then
        this rank keeps its shard: keys k with k % world_size == rank) -- and apply the capacity."""
        key = state["key"].long()
        mine = key % self.world_size == self.rank
        self._cols = {name: t[mine] for name, t in state["columns"].items()}
        self._version, self._key, self._next_key = state["version"].long()[mine], key[mine], int(state["next_key"])
        if self._cols:
            self._cols = self._trim(self._cols)
        self._evict_to(self.capacity)


def merge_shards(states: Sequence[Mapping[str, Any]], pad_id: int, sequence_fields: Sequence[str] = SEQUENCE_FIELDS,
                 response_fields: Sequence[str] = RESPONSE_FIELDS) -> dict[str, Any]:
    """One state holding the rows of every shard's `state_dict()`, in group-key order (the order
    the groups were added in); load it into a buffer of any world size."""
    merger = ReplayBuffer(capacity=1, pad_id=pad_id, sequence_fields=sequence_fields, response_fields=response_fields)
    cols: dict[str, Tensor] = {}
    for s in states:
        if s["columns"]:
            merger._append(dict(s["columns"]), s["version"], s["key"])
    if merger._cols:
        order = merger._key.argsort(stable=True)
        cols = {name: t[order] for name, t in merger._cols.items()}
        versions, keys = merger._version[order], merger._key[order]
    else:
        versions = keys = torch.zeros(0, dtype=torch.long)
    return {"columns": cols, "version": versions, "key": keys,
            "next_key": max((int(s["next_key"]) for s in states), default=0)}
