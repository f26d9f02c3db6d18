"""The E-Sort-style neural sorter: a network that maps multi-channel snippets to per-unit
spike probabilities, trained from labels (locsort's own clustering, ground truth or another
sorter), with a backbone that can be pretrained once and fine-tuned with few labels.

Differences from the published design (E-Sort), and why:

- **Any probe.** E-Sort flattens 384 channels into its spatial layer. Here a spike is seen on
  the fixed-shape neighbourhood of its centre channel (neighbourhood.py) and the spatial
  stage is a set function over the neighbourhood's slots: every slot's temporal features are
  tagged with the slot's position relative to the centre (µm) and pooled (masked mean and
  max), so the backbone has no channel count or slot order in its weights and transfers
  across probe geometries. Virtual slots are left out of the pooling.
- **Replaceable head, usable from a few labels.** The head (one sigmoid output per unit)
  scores a spike against one prototype per unit: cosine similarity of the embedding to the
  unit's prototype, minus a Gaussian penalty on the distance between where the spike is (the
  centre channel plus the centre of mass of its neighbourhood) and where the unit is (so that
  units alike in shape but far apart differ). Before any training the head is *imprinted*:
  each prototype is the mean embedding of the unit's labelled spikes and each unit position
  their mean position, so a pretrained backbone sorts from the first epoch and a handful of
  labels per unit goes further (BENCHMARKS.md, transfer learning). The head belongs to one
  recording; a pretrained backbone gets a new head.
- **Speed on CPU.** The published network runs at every sample of every window. Here it runs
  once per candidate event (a threshold crossing that is a local minimum across time and
  nearby channels, detect.py), which is a few thousand windows per second of recording
  instead of 30,000 x channels. Spike-free stretches cost nothing; a candidate no unit claims
  is rejected (all outputs low), so the detection threshold can stay permissive.
- **Time axis in ms.** Snippets are resampled to ``NUM_TIME_POINTS`` over the snippet span, so
  a backbone trained at one sampling rate serves another.

Inputs are in noise units (each channel divided by its noise level): a backbone pretrained on
one noise level applies to another.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import LocsortError, UsageError

FORMAT = "locsort-neural-sorter"
FORMAT_VERSION = 2  # 2: prototype head (version 1 files had an MLP head)
NUM_TIME_POINTS = 40  # snippet samples after resampling to a rate-independent grid
EMBEDDING = 128  # backbone output width
MAX_SHIFT = (
    1  # training augmentation: snippets move by up to this many points (candidate times wander)
)
SLOT_SCALES_UM = (
    15.0,
    30.0,
    60.0,
)  # Fourier features of slot offsets: near neighbours to neighbourhood edge
# windows per forward pass without gradients: the per-slot activations of larger batches leave
# the CPU caches and every window costs more (docs/design-decisions.md, § Execution)
INFERENCE_BATCH = 1024
# the network sees no slot farther than this from the centre channel (on a single column the
# 25 slots span 600 µm): a spike keeps under a tenth of its peak there, so such slots show only
# other neurons' spikes (docs/design-decisions.md, § Neural sorter)
WINDOW_REACH_UM = 100.0


@dataclass
class Windows:
    """What the network sees of n candidate spikes.

    waveforms : (n, NUM_TIME_POINTS, K) float16, traces in noise units on the centre channel's
        neighbourhood (virtual slots 0), resampled over the snippet span
    real : (n, K) bool, slot holds a real contact within the network's reach
        (``WINDOW_REACH_UM``); the others read zeros
    slot_xy : (n, K, 2) float32, slot position relative to the centre channel (µm)
    centre_xy : (n, 2) float32, the centre channel's position on the probe (µm)
    """

    waveforms: np.ndarray
    real: np.ndarray
    slot_xy: np.ndarray
    centre_xy: np.ndarray

    def __len__(self) -> int:
        return len(self.waveforms)

    @classmethod
    def from_batch(cls, batch, neighbourhood, noise: np.ndarray) -> "Windows":
        """From a scan.SpikeBatch (waveforms in µV)."""
        index = neighbourhood.index[batch.centre]
        real = neighbourhood.near(batch.centre, WINDOW_REACH_UM)
        scale = np.where(real, 1.0 / noise[np.maximum(index, 0)], 0.0).astype(np.float32)
        waveforms = batch.waveforms * scale[:, None, :]
        return cls(
            resample(waveforms),
            real,
            neighbourhood.offsets[batch.centre],
            neighbourhood.positions[batch.centre].astype(np.float32),
        )

    @classmethod
    def concatenate(cls, parts: list["Windows"]) -> "Windows":
        return cls(
            *[
                np.concatenate([getattr(p, name) for p in parts])
                for name in ("waveforms", "real", "slot_xy", "centre_xy")
            ]
        )

    def subset(self, rows) -> "Windows":
        return Windows(
            self.waveforms[rows], self.real[rows], self.slot_xy[rows], self.centre_xy[rows]
        )


def resample(waveforms: np.ndarray) -> np.ndarray:
    """(n, T, K) -> (n, NUM_TIME_POINTS, K) float16 by linear interpolation over the span."""
    n, t, k = waveforms.shape
    if t == NUM_TIME_POINTS:
        return waveforms.astype(np.float16)
    position = np.linspace(0, t - 1, NUM_TIME_POINTS)
    lo = np.floor(position).astype(int)
    hi = np.minimum(lo + 1, t - 1)
    w = (position - lo).astype(np.float32)[None, :, None]
    return (waveforms[:, lo] * (1 - w) + waveforms[:, hi] * w).astype(np.float16)


def _fourier(values: torch.Tensor, scales) -> torch.Tensor:
    """Sin/cos features of µm values (..., D) at the given length scales."""
    freq = torch.tensor([2 * math.pi / s for s in scales], device=values.device, dtype=values.dtype)
    angles = values[..., None] * freq  # (..., D, S)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class Backbone(nn.Module):
    """Temporal filter shared by all channels, then a spatial stage pooled over the slots."""

    def __init__(self, temporal: int = 16, slot_hidden: int = 64):
        super().__init__()
        self.temporal = nn.Sequential(
            nn.Linear(NUM_TIME_POINTS, 32), nn.ReLU(), nn.Linear(32, temporal)
        )
        position_features = 3 + 2 * 2 * len(SLOT_SCALES_UM)
        self.slot = nn.Sequential(
            nn.Linear(temporal + position_features, slot_hidden),
            nn.ReLU(),
            nn.Linear(slot_hidden, slot_hidden),
            nn.ReLU(),
        )
        self.spatial = nn.Sequential(
            nn.Linear(2 * slot_hidden, EMBEDDING), nn.ReLU(), nn.LayerNorm(EMBEDDING)
        )

    def forward(self, waveforms, real, slot_xy):
        """waveforms (n, T, K), real (n, K), slot_xy (n, K, 2) -> (n, EMBEDDING)."""
        per_slot = self.temporal(waveforms.transpose(1, 2))  # (n, K, temporal)
        distance = slot_xy.norm(dim=-1, keepdim=True)
        position = torch.cat(
            [slot_xy / 50.0, distance / 50.0, _fourier(slot_xy, SLOT_SCALES_UM)], dim=-1
        )
        h = self.slot(torch.cat([per_slot, position], dim=-1))  # (n, K, slot_hidden)
        mask = real.unsqueeze(-1).to(h.dtype)
        mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        peak = h.masked_fill(mask == 0, float("-inf")).amax(1)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        return self.spatial(torch.cat([mean, peak], dim=-1))


def spike_position(waveforms, real, slot_xy, centre_xy):
    """(n, 2) where a spike is on the probe (µm): the centre channel moved by the centre of mass
    of the neighbourhood's negative peaks above 3 noise units (inputs are in noise units), so
    that noise on far slots does not pull it."""
    weight = ((-waveforms.amin(1)).clamp(min=0.0) * real - 3.0).clamp(min=0.0) ** 2  # (n, K)
    offset = (weight.unsqueeze(-1) * slot_xy).sum(1) / weight.sum(1, keepdim=True).clamp(min=1e-6)
    return centre_xy + offset


class Head(nn.Module):
    """One logit per unit,
    scale * cos(embedding, prototype) + bias - |position - unit position|^2 / 2 sigma^2.

    The prototype and position of each unit are imprinted from its labelled spikes (``imprint``)
    and then trained; scale, per-unit bias and sigma (µm) are trained from their defaults (a
    logit of 0 at cosine 0.6 on the unit's position, a 15 µm spatial width)."""

    def __init__(
        self,
        num_units: int,
        scale: float = 10.0,
        threshold_cosine: float = 0.6,
        sigma_um: float = 15.0,
    ):
        super().__init__()
        self.num_units = num_units
        self.prototype = nn.Parameter(F.normalize(torch.randn(num_units, EMBEDDING), dim=-1))
        self.position = nn.Parameter(torch.zeros(num_units, 2))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.bias = nn.Parameter(torch.full((num_units,), -threshold_cosine * scale))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma_um)))

    def forward(self, embedding, position):
        cosine = F.normalize(embedding, dim=-1) @ F.normalize(self.prototype, dim=-1).T
        distance2 = ((position[:, None, :] - self.position[None]) ** 2).sum(-1)
        return (
            self.log_scale.exp() * cosine + self.bias - distance2 / (2 * self.log_sigma.exp() ** 2)
        )

    @torch.no_grad()
    def imprint(self, embedding, position, targets, mask) -> None:
        """Each unit's prototype and position from the mean of its known positives (units
        without one keep their random prototype)."""
        positive = (targets * mask > 0).to(embedding.dtype)  # (n, U)
        count = positive.sum(0)
        has = count > 0
        self.prototype[has] = (positive.T @ F.normalize(embedding, dim=-1))[has] / count[has, None]
        self.position[has] = (positive.T @ position)[has] / count[has, None]


class SpikeNet(nn.Module):
    def __init__(self, num_units: int, backbone: Backbone | None = None):
        super().__init__()
        self.backbone = backbone if backbone is not None else Backbone()
        self.head = Head(num_units)

    def forward(self, waveforms, real, slot_xy, centre_xy):
        return self.head(
            self.backbone(waveforms, real, slot_xy),
            spike_position(waveforms, real, slot_xy, centre_xy),
        )

    @torch.no_grad()
    def imprint(self, tensors, targets, mask, batch_size: int = INFERENCE_BATCH) -> None:
        """Imprint the head from labelled spikes (tensors: waveforms, real, slot_xy, centre_xy)."""
        embedding = torch.cat(
            [
                self.backbone(*(t[i : i + batch_size] for t in tensors[:3]))
                for i in range(0, len(tensors[0]), batch_size)
            ]
        )
        self.head.imprint(embedding, spike_position(*tensors), targets, mask)

    @property
    def num_units(self) -> int:
        return self.head.num_units


class Ensemble(nn.Module):
    """SpikeNets trained alike from different seeds; outputs the logit of their mean
    probability. With a few labels per unit, one network's head fits its K positives tightly
    and what it calls an unseen spike of the unit depends on its seed; the average of several
    is steadier (BENCHMARKS.md, transfer learning)."""

    def __init__(self, members: list[SpikeNet]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, waveforms, real, slot_xy, centre_xy):
        probability = torch.stack(
            [torch.sigmoid(net(waveforms, real, slot_xy, centre_xy)) for net in self.members]
        ).mean(0)
        return torch.logit(probability, eps=1e-6)

    @property
    def num_units(self) -> int:
        return self.members[0].num_units


def _shift(waveforms: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation: move each snippet by up to ``max_shift`` points in time, as
    candidate times wander by a sample or two around the true spike time."""
    if max_shift <= 0:
        return waveforms
    shift = torch.randint(-max_shift, max_shift + 1, (len(waveforms),), generator=generator).to(
        waveforms.device
    )
    return _move(waveforms, shift)


def _move(waveforms: torch.Tensor, shift) -> torch.Tensor:
    """(n, T, K) snippets moved by ``shift`` points in time (an int, or (n,) per snippet), edge
    padded."""
    t = waveforms.shape[1]
    shift = torch.as_tensor(shift, device=waveforms.device).reshape(-1, 1)
    index = (torch.arange(t, device=waveforms.device)[None, :] - shift).clamp(0, t - 1)
    return torch.gather(waveforms, 1, index[:, :, None].expand_as(waveforms))


def _with_synthetic_positives(tensors, targets, mask, rows, per_positive: int, generator):
    """Training augmentation for few labels: ``per_positive`` synthetic spikes for each labelled
    spike among ``rows`` (one known positive unit), each its unit's mean snippet on that centre
    channel plus the noise of a random labelled spike (that spike minus its unit's mean on its
    centre). With K labels per unit a head otherwise learns its K noise draws; the synthetic
    spikes make few-label sorting more accurate (docs/design-decisions.md, § Few labels).
    Returns (indices of the new rows, tensors, targets, mask) with the new rows appended; each
    copies its source spike's labels and geometry."""
    wave, real, slot_xy, centre_xy = tensors
    known = targets[rows] * mask[rows]
    single = known.sum(1) == 1
    rows, owner = rows[single], known[single].argmax(1)
    _, centre = torch.unique(centre_xy[rows], dim=0, return_inverse=True)
    _, group, count = torch.unique(
        owner * (len(centre_xy) + 1) + centre, return_inverse=True, return_counts=True
    )
    mean = (
        torch.zeros((len(count),) + wave.shape[1:], device=wave.device).index_add_(
            0, group, wave[rows]
        )
        / count[:, None, None]
    )
    keep = count[group] >= 2  # a lone spike's residual from its own mean is zero
    rows, group = rows[keep], group[keep]
    if len(rows) == 0:
        return np.zeros(0, np.int64), tensors, targets, mask
    n = count[group].float()[:, None, None]
    residual = (wave[rows] - mean[group]) * torch.sqrt(
        n / (n - 1)
    )  # the mean took 1/n of each spike's own noise
    # partners: spikes whose centres have the same real slots (any unit, any such centre: noise is
    # close to stationary across the probe), drawn uniformly within each pattern's block; a partner
    # from a centre with other virtual slots would bring zeros where the source has contacts
    _, pattern = torch.unique(real[rows], dim=0, return_inverse=True)
    order = torch.argsort(pattern)
    block_count = torch.bincount(pattern)
    block_start = torch.cumsum(block_count, 0) - block_count
    source = torch.arange(len(rows), device=wave.device).repeat(per_positive)
    draw = torch.rand(len(source), generator=generator).to(wave.device)
    partner = order[block_start[pattern[source]] + (draw * block_count[pattern[source]]).long()]
    src = rows[source]
    synthetic = (mean[group[source]] + residual[partner]).to(wave.dtype)
    new_rows = np.arange(len(wave), len(wave) + len(src))
    tensors = (
        torch.cat([wave, synthetic]),
        torch.cat([real, real[src]]),
        torch.cat([slot_xy, slot_xy[src]]),
        torch.cat([centre_xy, centre_xy[src]]),
    )
    return new_rows, tensors, torch.cat([targets, targets[src]]), torch.cat([mask, mask[src]])


def _masked_bce(logits, targets, mask) -> torch.Tensor:
    """Binary cross-entropy averaged over the (candidate, unit) pairs whose label is known.
    Positives are rare next to negatives; the imprinted bias, not a positive weight, starts each
    unit at a sensible operating point (weighting positives up made few-label heads call too
    many)."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


class NeuralSorter:
    """fit(windows, targets, mask) on labelled candidates, then predict_proba(windows).

    targets : (n, U) 1 where candidate i is a spike of unit u
    mask : (n, U) where the label of (i, u) is known; e.g. with only the first K spikes of a
        unit labelled, candidates after its K-th spike are unknown for that unit, not negatives
    synthetic_positives : training rows added per labelled spike (``_with_synthetic_positives``)
    """

    def __init__(
        self,
        epochs: int = 30,
        lr: float = 3e-3,
        batch_size: int = 256,
        patience: int = 5,
        device: str = "cpu",
        seed: int = 0,
        backbone_lr_scale: float = 0.3,
        frozen_epochs: int = 0,
        ensemble: int = 1,
        synthetic_positives: int = 0,
    ):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.patience = patience
        self.device = torch.device(device)
        self.seed = seed
        self.backbone_lr_scale = backbone_lr_scale
        self.frozen_epochs = frozen_epochs
        self.ensemble = max(1, int(ensemble))
        self.synthetic_positives = max(0, int(synthetic_positives))
        self.net: SpikeNet | Ensemble | None = None
        self.pretrained = False
        self.history: dict = {}

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        windows: Windows,
        targets: np.ndarray,
        mask: np.ndarray | None = None,
        backbone: Backbone | None = None,
        progress: bool = False,
    ) -> "NeuralSorter":
        """Train ``ensemble`` networks (one: a SpikeNet; more: an Ensemble of them)."""
        targets = np.asarray(targets, dtype=np.float32)
        if targets.shape[1] == 0:
            raise LocsortError(
                "no units to train the neural sorter on: "
                "the labels have no unit with a labelled spike"
            )
        mask = np.ones_like(targets, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        members, histories = [], []
        for j in range(self.ensemble):
            # members differ in seed (head start, held-out split, batch order); seeds 1000
            # apart, so that runs with neighbouring seeds share no member
            members.append(
                self._fit_member(windows, targets, mask, backbone, progress, self.seed + 1000 * j)
            )
            histories.append(self.history)
        self.net = members[0] if len(members) == 1 else Ensemble(members).eval()
        self.history = {
            **histories[0],
            "members": len(members),
            "seconds": sum(h["seconds"] for h in histories),
        }
        return self

    def _fit_member(
        self,
        windows: Windows,
        targets: np.ndarray,
        mask: np.ndarray,
        backbone: Backbone | None,
        progress: bool,
        seed: int,
    ) -> SpikeNet:
        """One SpikeNet trained from ``seed`` (also left in ``self.net`` and ``self.history``)."""
        num_units = targets.shape[1]
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.pretrained = backbone is not None
        self.net = SpikeNet(
            num_units, copy.deepcopy(backbone) if backbone is not None else None
        ).to(self.device)
        tensors = self._tensors(windows)
        y = torch.as_tensor(targets, device=self.device)
        m = torch.as_tensor(mask, dtype=torch.float32, device=self.device)
        groups = [
            {"params": self.net.head.parameters(), "lr": self.lr},
            {
                "params": self.net.backbone.parameters(),
                "lr": self.lr * (self.backbone_lr_scale if self.pretrained else 1.0),
            },
        ]
        optimizer = torch.optim.Adam(groups)
        order = rng.permutation(len(windows))
        num_val = max(1, len(order) // 10) if len(order) >= 50 else 0
        val, train = order[:num_val], order[num_val:]
        if len(train) == 0:
            raise LocsortError("too few labelled candidate spikes to train the neural sorter")
        if self.synthetic_positives:
            # synthetic rows join the training rows only: the held-out loss stays on real spikes
            extra, tensors, y, m = _with_synthetic_positives(
                tensors,
                y,
                m,
                torch.as_tensor(train, device=self.device),
                self.synthetic_positives,
                generator,
            )
            train = np.concatenate([train, extra])
        train_rows = torch.as_tensor(train, device=self.device)
        self.net.eval()
        self.net.imprint([t[train_rows] for t in tensors], y[train_rows], m[train_rows])

        def loss_of(rows, augment, frozen):
            rows = torch.as_tensor(rows, device=self.device)
            if (
                frozen
            ):  # the head reads the backbone's outputs computed once (same shift augmentation)
                shift = (
                    torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (len(rows),), generator=generator).to(
                        self.device
                    )
                    if augment
                    else torch.zeros(len(rows), dtype=torch.long, device=self.device)
                )
                embedding, position = frozen_features
                logits = self.net.head(
                    embedding[shift + MAX_SHIFT, rows], position[shift + MAX_SHIFT, rows]
                )
                return _masked_bce(logits, y[rows], m[rows])
            wave, real, slot_xy, centre_xy = (t[rows] for t in tensors)
            if augment:
                wave = _shift(wave, MAX_SHIFT, generator)
            return _masked_bce(self.net(wave, real, slot_xy, centre_xy), y[rows], m[rows])

        best, best_state, stale, history = math.inf, None, 0, []
        frozen_features = None
        start = time.perf_counter()
        bar = tqdm(
            range(self.epochs),
            desc="train neural sorter",
            unit="epoch",
            disable=not progress,
            leave=False,
        )
        for epoch in bar:
            # a pretrained backbone stays frozen while the new head learns to read it (linear
            # probing, then fine-tuning): gradients through a random head would first scramble
            # its features
            frozen = self.pretrained and epoch < self.frozen_epochs
            self.net.backbone.requires_grad_(not frozen)
            if frozen and frozen_features is None:
                frozen_features = self._shifted_features(tensors)
            self.net.train()
            rng.shuffle(train)
            for i in range(0, len(train), self.batch_size):
                loss = loss_of(train[i : i + self.batch_size], augment=True, frozen=frozen)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            self.net.eval()
            if num_val:
                with torch.no_grad():
                    val_loss = float(loss_of(val, augment=False, frozen=frozen))
            else:
                val_loss = float(loss.detach())
            history.append(val_loss)
            bar.set_postfix(val_loss=f"{val_loss:.4f}")
            if val_loss < best - 1e-4:
                best, stale, best_state = val_loss, 0, copy.deepcopy(self.net.state_dict())
            else:
                stale += 1
            if stale >= self.patience and not frozen:
                break
        if best_state is None or not math.isfinite(best):
            raise LocsortError("neural sorter training diverged (non-finite loss)")
        self.net.load_state_dict(best_state)
        self.net.eval()
        self.history = {
            "epochs": len(history),
            "val_loss": history,
            "train_windows": int(len(train)),
            "units": int(num_units),
            "pretrained_backbone": self.pretrained,
            "seconds": time.perf_counter() - start,
        }
        return self.net

    @torch.no_grad()
    def _shifted_features(self, tensors, batch_size: int = INFERENCE_BATCH):
        """(S, n, EMBEDDING) backbone outputs and (S, n, 2) spike positions of every window moved
        by each of the S shifts -MAX_SHIFT..MAX_SHIFT: all that a head on a frozen backbone reads,
        computed once instead of once per epoch."""
        wave, real, slot_xy, centre_xy = tensors
        embeddings, positions = [], []
        for shift in range(-MAX_SHIFT, MAX_SHIFT + 1):
            parts = [
                (
                    _move(wave[i : i + batch_size], shift),
                    real[i : i + batch_size],
                    slot_xy[i : i + batch_size],
                    centre_xy[i : i + batch_size],
                )
                for i in range(0, len(wave), batch_size)
            ]
            embeddings.append(torch.cat([self.net.backbone(*part[:3]) for part in parts]))
            positions.append(torch.cat([spike_position(*part) for part in parts]))
        return torch.stack(embeddings), torch.stack(positions)

    def _tensors(self, windows: Windows):
        t = lambda a, dtype=torch.float32: torch.as_tensor(
            np.ascontiguousarray(a), device=self.device
        ).to(dtype)
        return (
            t(windows.waveforms),
            t(windows.real, torch.bool),
            t(windows.slot_xy),
            t(windows.centre_xy),
        )

    # ------------------------------------------------------------------ predict

    @property
    def num_units(self) -> int:
        return 0 if self.net is None else self.net.num_units

    def predict_proba(self, windows: Windows, batch_size: int = INFERENCE_BATCH) -> torch.Tensor:
        """(n, U) spike probabilities per unit (a tensor on the sorter's device)."""
        if self.net is None:
            raise LocsortError("the neural sorter is not trained: call fit() or load() first")
        out = []
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                part = windows.subset(slice(i, i + batch_size))
                out.append(torch.sigmoid(self.net(*self._tensors(part))))
        return torch.cat(out) if out else torch.zeros((0, self.num_units), device=self.device)

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | Path, backbone_only: bool = False, info: dict | None = None) -> None:
        """Weights (the backbone alone, or backbone + head) in one safetensors file, no pickle."""
        from ..io import save_safetensors_atomic

        if self.net is None:
            raise LocsortError("nothing to save: the neural sorter was not trained")
        if backbone_only and isinstance(self.net, Ensemble):
            raise LocsortError("an ensemble of networks has no single backbone to save")
        module = self.net.backbone if backbone_only else self.net
        members = len(self.net.members) if isinstance(self.net, Ensemble) else 1
        meta = {
            "format": FORMAT,
            "version": str(FORMAT_VERSION),
            "kind": "backbone" if backbone_only else "sorter",
            "num_units": str(self.num_units),
            "members": str(members),
            "num_time_points": str(NUM_TIME_POINTS),
            "info": json.dumps(info or {}),
        }
        save_safetensors_atomic(path, module.state_dict(), meta)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", **kwargs) -> "NeuralSorter":
        kind, state, meta = _read(path)
        if kind != "sorter":
            raise UsageError(
                f"{path} holds a backbone only (load it with load_backbone and fine-tune a head)"
            )
        sorter = cls(device=device, **kwargs)
        num_units, members = int(meta["num_units"]), int(meta.get("members", 1))
        sorter.net = (
            SpikeNet(num_units)
            if members == 1
            else Ensemble([SpikeNet(num_units) for _ in range(members)])
        )
        _load_state(sorter.net, state, path)
        sorter.net.to(sorter.device).eval()
        return sorter


def load_backbone(path: str | Path) -> Backbone:
    """A backbone from a file written by ``save(backbone_only=True)`` or a full sorter file."""
    kind, state, _ = _read(path)
    if kind == "sorter":
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = Backbone()
    _load_state(backbone, state, path)
    return backbone.eval()


def backbone_info(path: str | Path) -> dict:
    return json.loads(_read(path)[2].get("info", "{}"))


def _read(path):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"neural sorter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise LocsortError(
            f"cannot read neural sorter file {path}: "
            f"it is corrupt or not a safetensors file ({exc})"
        ) from None
    if meta.get("format") != FORMAT:
        raise LocsortError(f"{path} is not a locsort neural sorter file")
    if meta.get("version") != str(FORMAT_VERSION):
        raise LocsortError(
            f"{path} was written by another locsort "
            f"(neural sorter format {meta.get('version')}, this one "
            f"reads {FORMAT_VERSION}): train it again"
        )
    if int(meta.get("num_time_points", -1)) != NUM_TIME_POINTS:
        raise LocsortError(
            f"{path} was made for {meta.get('num_time_points')} time points, "
            f"this locsort uses {NUM_TIME_POINTS}"
        )
    return meta.get("kind"), state, meta


def _load_state(module: nn.Module, state: dict, path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise LocsortError(
            f"{path} does not match this locsort's network ({str(exc).splitlines()[0]})"
        ) from None


def pretrain_backbone(
    datasets: list[tuple[Windows, np.ndarray, np.ndarray]],
    epochs: int = 20,
    lr: float = 3e-3,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[Backbone, dict]:
    """A backbone trained on several labelled recordings at once, one head per recording
    (each recording has its own units): batches alternate between recordings, so the backbone
    learns what separates units on any of them. Returns the backbone and a training summary."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    backbone = Backbone().to(device)
    nets, staged = [], []  # one head per recording on the shared backbone
    for windows, targets, mask in datasets:
        t = lambda a, dtype=torch.float32: torch.as_tensor(
            np.ascontiguousarray(a), device=device
        ).to(dtype)
        inputs = (
            t(windows.waveforms),
            t(windows.real, torch.bool),
            t(windows.slot_xy),
            t(windows.centre_xy),
        )
        net = SpikeNet(targets.shape[1], backbone).to(device)
        net.imprint(inputs, t(targets), t(mask))
        nets.append(net)
        staged.append((inputs, t(targets), t(mask)))
    optimizer = torch.optim.Adam(
        list(backbone.parameters()) + [p for net in nets for p in net.head.parameters()], lr=lr
    )
    losses = []
    for _ in tqdm(range(epochs), desc="pretrain backbone", unit="epoch", disable=not progress):
        steps = [
            (d, rows)
            for d, (inputs, *_rest) in enumerate(staged)
            for rows in np.array_split(
                rng.permutation(len(inputs[0])), max(1, len(inputs[0]) // batch_size)
            )
        ]
        rng.shuffle(steps)
        total = 0.0
        backbone.train()
        for d, rows in steps:
            (wave, real, slot_xy, centre_xy), y, m = staged[d]
            rows = torch.as_tensor(rows, device=device)
            loss = _masked_bce(
                nets[d](
                    _shift(wave[rows], MAX_SHIFT, generator),
                    real[rows],
                    slot_xy[rows],
                    centre_xy[rows],
                ),
                y[rows],
                m[rows],
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / max(len(steps), 1))
    return backbone.eval(), {"epochs": epochs, "train_loss": losses}


def save_backbone(backbone: Backbone, path: str | Path, info: dict) -> None:
    """Write a pretrained backbone (safetensors, with ``info`` on how it was made)."""
    sorter = NeuralSorter()
    sorter.net = SpikeNet(1, backbone)
    sorter.save(path, backbone_only=True, info=info)
