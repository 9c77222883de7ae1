"""The training order: a function of ``(seed, epoch)`` and the global sample index alone.

Sample ``g`` of the run is the block a keyed pseudorandom permutation (a Feistel network) puts at
position ``g mod N`` of epoch ``g div N``. So the data position saved in a checkpoint is one number,
resuming at any position costs the same (nothing is skipped or replayed), and because Accelerate
deals each global batch of that one order to the processes in turn, any world size reads the same
blocks. With ``--data_mix`` each sample's source follows a fixed pattern of 1,000 slots that holds
the weights (exact to 0.1%), and each source runs through its own epochs in its own permuted order.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..errors import DataError
from .shards import TokenBlocks

MIX_PERIOD = 1000
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Permutation:
    """A keyed pseudorandom permutation of ``range(n)``, evaluated at any index in O(1): a 4-round
    Feistel network on the smallest even power of two >= n, with cycle walking back into range."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"Permutation of {n} elements")
        self.n = n
        self.half = max(1, math.ceil(math.log2(n) / 2)) if n > 1 else 1
        self.mask = (1 << self.half) - 1
        self.keys = [_mix64((key * 8 + r) & _MASK64) for r in range(self.ROUNDS)]

    def __call__(self, i: int) -> int:
        x = i
        while True:  # the domain is < 4n, so this loops fewer than 4 times on average
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix64(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


def _key(seed: int, source: int, epoch: int) -> int:
    return _mix64((seed * 1_000_003 + source) * 1_000_033 + epoch)


def mix_pattern(weights: list[float], period: int = MIX_PERIOD) -> list[int]:
    """Which source each of ``period`` consecutive samples comes from: counts by largest remainder,
    spread evenly (smooth weighted round robin)."""
    total = sum(weights)
    raw = [w / total * period for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: period - sum(counts)]:
        counts[i] += 1
    current, pattern = [0] * len(counts), []
    for _ in range(period):
        for i, c in enumerate(counts):
            current[i] += c
        pick = max(range(len(counts)), key=lambda i: (current[i], -i))
        current[pick] -= period
        pattern.append(pick)
    return pattern


def too_little_data(source: TokenBlocks) -> str:
    raw = (source.manifest.get("source") or {}).get("data_files")
    origin = f" (prepared from --data_files {' '.join(raw)})" if raw else ""
    total = source.manifest["total_tokens"]
    return (f"{source.path}{origin}: too little data: {total:,} tokens make {source.num_blocks} block(s) of "
            f"--block_size={source.block_size}, and training needs at least 2 (one to train on, one to validate); "
            f"give more text or a smaller --block_size")


class TrainBlocks(Dataset):
    """Training sample ``g`` (a global index over the whole run) -> its block's tokens.

    ``len()`` is one epoch: every training block of every source once. Without weights the sources'
    blocks form one space in one permuted order per epoch; with weights see :func:`mix_pattern`.
    Items are ``{"input_ids": tokens, "block": global block id}``.
    """

    def __init__(self, sources: list[TokenBlocks], seed: int, weights: list[float] | None = None):
        self.sources, self.seed, self.weights = sources, seed, weights
        sizes = [s.num_train for s in sources]
        for s in sources:
            if not s.num_train:
                raise DataError(too_little_data(s))
        self.starts = np.cumsum([0] + sizes)  # a global block id = source's start + its block
        self.epoch_size = int(self.starts[-1])
        self._perms: dict[tuple[int, int], Permutation] = {}
        if weights is not None:
            self.pattern = mix_pattern(weights)
            self.per_period = [self.pattern.count(i) for i in range(len(sources))]
            seen = [0] * len(sources)
            self.rank_in_period = []
            for source in self.pattern:
                self.rank_in_period.append(seen[source])
                seen[source] += 1

    def __len__(self) -> int:
        return self.epoch_size

    def _perm(self, source: int, epoch: int, n: int) -> Permutation:
        perm = self._perms.get((source, epoch))
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            perm = self._perms[(source, epoch)] = Permutation(n, _key(self.seed, source, epoch))
        return perm

    def locate(self, g: int) -> tuple[int, int]:
        """(source, block within the source) of sample ``g``."""
        if self.weights is None:
            epoch, pos = divmod(g, self.epoch_size)
            block = self._perm(-1, epoch, self.epoch_size)(pos)
            source = int(np.searchsorted(self.starts, block, side="right")) - 1
            return source, block - int(self.starts[source])
        period, slot = divmod(g, MIX_PERIOD)
        source = self.pattern[slot]
        j = period * self.per_period[source] + self.rank_in_period[slot]
        n = self.sources[source].num_train
        epoch, pos = divmod(j, n)
        return source, self._perm(source, epoch, n)(pos)

    def __getitem__(self, g: int) -> dict:
        source, block = self.locate(int(g))
        return {**self.sources[source].item(block), "block": int(self.starts[source]) + block}


class ValidationBlocks(Dataset):
    """The sources' held-out tails, in order."""

    def __init__(self, sources: list[TokenBlocks]):
        self.items = [(s, s.num_train + i) for s in sources for i in range(s.num_validation)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        source, block = self.items[i]
        return source.item(block)


class RunSampler(Sampler[int]):
    """Global sample indices of one epoch, ``epoch * len .. (epoch + 1) * len``; :meth:`set_start`
    begins the next pass mid-epoch at once (what a resume asks; :class:`ResumableLoader` uses it)."""

    def __init__(self, epoch_size: int):
        self.epoch_size = epoch_size
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, samples: int) -> None:
        self._start = samples

    def __iter__(self):
        start, self._start = self._start, 0
        return iter(range(self.epoch * self.epoch_size + start, (self.epoch + 1) * self.epoch_size))

    def __len__(self) -> int:
        return self.epoch_size


