"""Amortized variational inference for the model of model.py: an encoder network, trained on
the recording's own spikes by maximizing the ELBO, that gives every spike a posterior over
(x, y, z, log alpha) in one forward pass.

Encoder input per (spike, centre channel): the K neighbourhood amplitudes in noise units,
divided by their maximum (shape), the log of that maximum and of the largest amplitude in
µV (scale), and the real/virtual flag of each slot (plus slot positions on probes that are
not a lattice). Output: a diagonal Gaussian over x, y and log alpha and a log-normal over z
(so z > 0 by construction).

Amplitude jitter (the paper's): every real slot whose amplitude is within ``jitter_uv`` of
the largest also serves as centre channel; each gives a training example, and at inference
the posteriors of one spike's centres are pooled (mean of means, mixture SD). Off by default
(constants.jitter_uv): the extra centres did not make the positions more accurate
(docs/design-decisions.md, § Localization).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LocsortError, UsageError
from .baseline import CenterOfMass
from .model import ModelGlobals, elbo, latents, mean_field, soma_sd

FORMAT = "locsort-encoder"
FORMAT_VERSION = 1
# spikes per forward pass at inference: the activations of larger batches leave the CPU caches
# and every spike costs more (docs/design-decisions.md, § Execution)
INFERENCE_BATCH = 2048


class Encoder(nn.Module):
    """MLP from neighbourhood features to the variational parameters (loc and scale per latent)."""

    def __init__(self, num_inputs: int, hidden: int = 256, num_outputs: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_inputs, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden // 2),
            nn.SiLU(),
            nn.Linear(hidden // 2, num_outputs),
        )

    def forward(self, features):
        return self.net(features)


class _LearnedGlobals(nn.Module):
    """Log-parameters of the globals fitted with the encoder (empirical Bayes). The z prior
    stays fixed: fitted jointly with per-spike decay lengths it collapses onto a narrow band
    closer to the probe than the somas are (docs/design-decisions.md, § Localization)."""

    def __init__(self, g: ModelGlobals):
        super().__init__()
        self.log_decay_length = nn.Parameter(torch.tensor(math.log(g.decay_length_um)))
        self.log_floor = nn.Parameter(torch.tensor(math.log(g.floor)))
        self.log_rel_error = nn.Parameter(torch.tensor(math.log(g.rel_error)))
        self.log_noise_scale = nn.Parameter(torch.tensor(math.log(g.noise_scale)))

    def values(self) -> dict:
        return {
            "decay_length": self.log_decay_length.exp(),
            "floor": self.log_floor.exp(),
            "rel_error": self.log_rel_error.exp(),
            "noise_scale": self.log_noise_scale.exp(),
        }


class AmortizedLocalizer:
    """locsort's localizer: fit on a sample of spikes, then one forward pass per spike."""

    name = "locsort"

    def __init__(
        self,
        decay: str = "exponential",
        source_offset_um: float = 8.0,
        jitter_uv: float = 0.0,
        max_centres: int = 4,
        hidden: int = 256,
        batch_size: int = 512,
        max_epochs: int = 30,
        patience: int = 8,
        lr: float = 2e-3,
        min_training_spikes: int = 300,
        min_channels: int = 8,
        fallback_channels: int = 9,
        device: str = "cpu",
        seed: int = 0,
        init: str | None = None,  # Params.encoder_init (the pipeline's default: "pretrained")
        init_epochs: int = 10,
    ):
        self.globals = ModelGlobals(decay=decay, source_offset_um=source_offset_um)
        self.jitter_uv = float(jitter_uv)
        self.max_centres = int(max_centres) if jitter_uv > 0 else 1
        self.hidden = hidden
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.lr = lr
        self.min_training_spikes = min_training_spikes
        self.min_channels = min_channels
        self.device = torch.device(device)
        self.seed = seed
        # where training starts: None (from scratch), "pretrained" (shipped) or an encoder file
        self.init = init
        self.init_epochs = init_epochs  # training epochs from a trained start
        # how a saved encoder was made (pretrained encoders: their script and data)
        self.info: dict = {}
        self.net: Encoder | None = None
        self.fallback: CenterOfMass | None = None
        self.fallback_reason = ""
        self.fallback_channels = fallback_channels
        self.geometry: dict | None = None
        self.noise: np.ndarray | None = None
        self.history: dict = {}

    # ------------------------------------------------------------------ per chunk

    def observe(self, batch, neighbourhood) -> dict:
        """Centres (n, J; -1 unused) and their neighbourhood amplitudes (n, J, K), in-chunk."""
        n, k = batch.amplitudes.shape
        centres = np.full((n, self.max_centres), -1, dtype=np.int64)
        amplitudes = np.zeros((n, self.max_centres, k), dtype=np.float32)
        centres[:, 0] = batch.centre
        amplitudes[:, 0] = batch.amplitudes
        if self.max_centres > 1 and n:
            slots = neighbourhood.index[batch.centre]
            amp = np.where(slots >= 0, batch.amplitudes, -np.inf)
            amp[:, 0] = -np.inf  # the centre itself is already column 0
            order = np.argsort(-amp, axis=1)[:, : self.max_centres - 1]
            best = np.take_along_axis(amp, order, axis=1)
            chosen = best >= batch.amplitudes[:, :1] - self.jitter_uv
            for j in range(self.max_centres - 1):
                rows = np.flatnonzero(chosen[:, j])
                if len(rows) == 0:
                    continue
                channels = slots[rows, order[rows, j]]
                centres[rows, j + 1] = channels
                amplitudes[rows, j + 1] = batch.subset(rows).amplitudes_around(
                    channels, neighbourhood
                )
        return {"centres": centres, "amplitudes": amplitudes}

    # ------------------------------------------------------------------ tensors

    def _inputs(self, centres: np.ndarray, amplitudes: np.ndarray, neighbourhood):
        """Model and encoder tensors for flat (centre, amplitudes) pairs."""
        real = neighbourhood.real[centres]
        slot_xy = neighbourhood.offsets[centres]
        sigma = np.where(real, self.noise[np.maximum(neighbourhood.index[centres], 0)], 1.0)
        t = lambda a, dtype=torch.float32: torch.as_tensor(
            np.ascontiguousarray(a), dtype=dtype, device=self.device
        )
        return t(amplitudes), t(real, torch.bool), t(slot_xy), t(sigma)

    def _features(self, amplitudes, real, slot_xy, sigma):
        snr = torch.where(real, amplitudes / sigma, torch.zeros_like(amplitudes))
        peak_snr = snr.max(dim=1, keepdim=True).values.clamp(min=1e-3)
        peak_uv = (
            torch.where(real, amplitudes, torch.zeros_like(amplitudes))
            .max(dim=1, keepdim=True)
            .values.clamp(min=1e-3)
        )
        parts = [snr / peak_snr, real.float(), peak_snr.log(), peak_uv.log()]
        if self._reads_slots():
            parts.append(slot_xy.flatten(1) / self._scale_um()[0])
        return torch.cat(parts, dim=1), peak_uv.squeeze(1).log()

    def _reads_slots(self) -> bool:
        """Whether the encoder reads the slots' positions (off a lattice a slot's place varies)."""
        return not self.geometry["regular"]

    def _scale_um(self) -> tuple[float, float]:
        """(µm per unit of the slots' positions and of the x, y outputs, the farthest x, y may lie
        from the centre channel): the neighbourhood's pitch and reach (+ one pitch)."""
        return self.geometry["pitch_um"], self.geometry["reach_um"]

    def _posterior(self, amplitudes, real, slot_xy, sigma):
        """Variational parameters: loc and scale (n, L) for x, y, log z, log alpha[, log length]."""
        features, log_peak = self._features(amplitudes, real, slot_xy, sigma)
        out = self.net(features)
        num = out.shape[1] // 2
        pitch, reach = self._scale_um()
        g = self.globals
        # bounded outputs keep exp() finite while training: log z within e^+-4 of the prior
        # median, log alpha within +-4 of 3 + the largest amplitude, SDs within (1e-3, 4) units
        columns = [
            reach * torch.tanh(out[:, 0] * pitch / reach),
            reach * torch.tanh(out[:, 1] * pitch / reach),
            math.log(g.prior_z_um) + 4.0 * torch.tanh(out[:, 2] / 4.0),
            log_peak + 3.0 + 4.0 * torch.tanh(out[:, 3] / 4.0),
        ]
        units = [pitch, pitch, 1.0, 1.0]
        if num == 5:
            columns.append(math.log(g.decay_length_um) + 2.0 * torch.tanh(out[:, 4] / 2.0))
            units.append(1.0)
        loc = torch.stack(columns, dim=1)
        scale = (1e-3 + 4.0 * torch.sigmoid(out[:, num:] - 3.0)) * torch.tensor(
            units, device=out.device
        )
        return loc, scale

    def _approximation(self, amplitudes, real, slot_xy, sigma) -> dict:
        """The approximate posterior of every latent (name -> distribution, batch (n,))."""
        return mean_field(*self._posterior(amplitudes, real, slot_xy, sigma), self.globals.decay)

    def _loss(self, batch, learned) -> torch.Tensor:
        """Negative ELBO summed over the batch's spikes."""
        return -elbo(self._approximation(*batch), *batch, self.globals, learned).sum()

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        observations: dict,
        neighbourhood,
        noise,
        params=None,
        progress: bool = False,
        initial: "Encoder | None" = None,
    ) -> "AmortizedLocalizer":
        """Train on ``observations`` by maximizing the ELBO, stopping early on a held-out 10 %:
        from ``initial``'s weights when given (``refined``; up to ``max_epochs``), else from the
        trained encoder ``init`` names (its weights and cells' globals; up to ``init_epochs``),
        else from scratch (up to ``max_epochs``)."""
        self.noise = np.asarray(noise, dtype=np.float32)
        self.geometry = _geometry_of(neighbourhood)
        epochs, started_from = (
            self.max_epochs,
            "given weights" if initial is not None else "scratch",
        )
        pretrained = self._starting_point() if initial is None else None
        if pretrained is not None:
            # the cells' globals carry over; floor and noise_scale say how this recording's
            # amplitudes are read (denoised or not), so they start afresh rather than keep the
            # pretraining data's values, which worsened sorting (docs/design-decisions.md,
            # § Localization)
            for name in ("rel_error", "decay_length_um"):
                setattr(self.globals, name, getattr(pretrained.globals, name))
            initial, epochs, started_from = (
                pretrained.net,
                self.init_epochs,
                pretrained.info.get("name", self.init),
            )
        centres, amplitudes = _flatten(observations)
        num_spikes = len(observations["centres"])
        per_shank = int(np.bincount(neighbourhood.shank_ids).max())
        if per_shank < self.min_channels:
            reason = (
                f"only {per_shank} channel{'s' if per_shank > 1 else ''} per shank (a point "
                f"source's x, y, z and size need at least {self.min_channels}): centre of mass "
                f"over the {min(self.fallback_channels, per_shank)} nearest channels used instead"
            )
        elif num_spikes < self.min_training_spikes:
            reason = (
                f"only {num_spikes} spikes to train the encoder on "
                f"(at least {self.min_training_spikes} needed): "
                f"centre of mass over {self.fallback_channels} channels used instead"
            )
        else:
            reason = ""
        if reason:
            self.fallback = CenterOfMass(self.fallback_channels)
            self.fallback_reason = reason
            return self
        self.fallback = None
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        peak = (amplitudes * neighbourhood.real[centres]).max(axis=1)
        self.globals.prior_log_alpha = float(np.median(np.log(np.clip(peak, 1e-3, None)))) + 1.0
        tensors = self._inputs(centres, amplitudes, neighbourhood)
        num_inputs = self._features(*[t[:2] for t in tensors])[0].shape[1]
        self.net = (
            copy.deepcopy(initial)
            if initial is not None
            else Encoder(num_inputs, self.hidden, 2 * len(latents(self.globals.decay)))
        ).to(self.device)
        learned = _LearnedGlobals(self.globals).to(self.device)
        optimizer = torch.optim.Adam(
            list(self.net.parameters()) + list(learned.parameters()), lr=self.lr
        )
        order = rng.permutation(len(centres))
        num_val = max(1, len(order) // 10)
        val, train = order[:num_val], order[num_val:]
        pick = lambda idx: [t[torch.as_tensor(idx, device=self.device)] for t in tensors]
        val_batch = pick(val)
        # from a pretrained start the learning rate falls to 0 along a cosine: the last steps
        # settle instead of stopping mid-stride, which mostly lowers the localization error and
        # makes runs with different seeds agree more closely (docs/design-decisions.md,
        # § Localization)
        schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, epochs * math.ceil(len(train) / self.batch_size)
            )
            if pretrained is not None
            else None
        )
        best, best_state, stale, history = math.inf, None, 0, []
        start = time.perf_counter()
        bar = tqdm(
            range(epochs), desc="train encoder", unit="epoch", disable=not progress, leave=False
        )
        for _epoch in bar:
            self.net.train()
            rng.shuffle(train)
            for i in range(0, len(train), self.batch_size):
                batch = pick(train[i : i + self.batch_size])
                loss = self._loss(batch, learned.values())
                optimizer.zero_grad()
                (loss / len(batch[0])).backward()
                nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
            self.net.eval()
            with torch.no_grad():
                val_loss = float(self._loss(val_batch, learned.values())) / len(val)
            history.append(val_loss)
            bar.set_postfix(val_loss=f"{val_loss:.2f}")
            if val_loss < best - 1e-3:
                best, stale = val_loss, 0
                best_state = (
                    copy.deepcopy(self.net.state_dict()),
                    {k: float(v.detach()) for k, v in learned.values().items()},
                )
            else:
                stale += 1
            if stale >= self.patience:
                break
        if best_state is None:
            self.net = None
            self.fallback = CenterOfMass(self.fallback_channels)
            self.fallback_reason = (
                "encoder training diverged (non-finite ELBO): centre of mass used instead"
            )
            return self
        self.net.load_state_dict(best_state[0])
        self.net.eval()
        fitted = best_state[1]
        self.globals.floor = fitted["floor"]
        self.globals.rel_error = fitted["rel_error"]
        self.globals.noise_scale = fitted["noise_scale"]
        if self.globals.decay == "exponential":
            self.globals.decay_length_um = fitted["decay_length"]
        self.history = {
            "epochs": len(history),
            "started_from": started_from,
            "val_loss_per_spike": history,
            "train_examples": int(len(train)),
            "held_out_examples": int(len(val)),
            "seconds": time.perf_counter() - start,
            "globals": self.globals.asdict(),
        }
        return self

    def _starting_point(self) -> "AmortizedLocalizer | None":
        """The trained encoder that ``init`` names for this probe (``geometry``), or None: from
        scratch. A shipped encoder is used only where its neighbourhood layout, decay law and
        width are this one's (pretrained.matching_encoder); a file the user names must fit or is
        refused."""
        if self.init is None:
            return None
        if self.init == "pretrained":
            from .pretrained import matching_encoder

            return matching_encoder(self.geometry, self.globals.decay, self.hidden, self.device)
        start = AmortizedLocalizer.load(self.init, device=self.device)
        _check_geometry(start.geometry, self.geometry)
        if start.globals.decay != self.globals.decay or start.hidden != self.hidden:
            raise UsageError(
                f"the encoder to start from ({self.init}) has the {start.globals.decay} "
                f"decay law and width {start.hidden}, "
                f"this one {self.globals.decay} and {self.hidden}: set decay_law / "
                "encoder_hidden to match, or encoder_init=None"
            )
        return start

    def refined(
        self, observations: dict, neighbourhood, noise, epochs: int, progress: bool = False
    ) -> "AmortizedLocalizer":
        """A copy of this trained encoder trained up to ``epochs`` more epochs on ``observations``
        (weights and fitted globals as the start, a fresh optimizer): cheap adaptation to amplitudes
        read another way (the neural sort's denoised ones), a few epochs instead of a training from
        scratch (docs/design-decisions.md, § Neural sorter). This encoder when it has none to
        refine or the refinement diverged."""
        if self.net is None or self.fallback is not None:
            return self
        other = copy.deepcopy(self)
        other.max_epochs = epochs
        other.fit(observations, neighbourhood, noise, progress=progress, initial=self.net)
        if other.net is None or other.fallback is not None:
            return self
        other.history["refined_from"] = self.history
        return other

    # ------------------------------------------------------------------ inference

    def transform(self, observations: dict, neighbourhood) -> dict:
        if self.fallback is not None:
            return self.fallback.transform_centres(
                observations["centres"][:, 0], observations["amplitudes"][:, 0], neighbourhood
            )
        if self.net is None:
            raise LocsortError("the encoder is not trained: call fit() or load() first")
        n = len(observations["centres"])
        spike, centres, amplitudes = _flatten(observations, with_spike=True)
        loc_parts, scale_parts = [], []
        with torch.no_grad():
            for i in range(0, len(centres), INFERENCE_BATCH):
                tensors = self._inputs(
                    centres[i : i + INFERENCE_BATCH],
                    amplitudes[i : i + INFERENCE_BATCH],
                    neighbourhood,
                )
                loc, scale = self._posterior(*tensors)
                loc_parts.append(loc.cpu().numpy())
                scale_parts.append(scale.cpu().numpy())
        loc = np.concatenate(loc_parts) if loc_parts else np.zeros((0, 4), np.float32)
        scale = np.concatenate(scale_parts) if scale_parts else np.zeros((0, 4), np.float32)
        absolute = neighbourhood.positions[centres]
        # per-centre posterior moments of x, y, z, alpha in absolute coordinates
        mean = np.column_stack(
            [
                absolute[:, 0] + loc[:, 0],
                absolute[:, 1] + loc[:, 1],
                np.exp(loc[:, 2] + scale[:, 2] ** 2 / 2),
                loc[:, 3],
            ]
        )
        var = np.column_stack(
            [
                scale[:, 0] ** 2,
                scale[:, 1] ** 2,
                np.expm1(scale[:, 2] ** 2) * np.exp(2 * loc[:, 2] + scale[:, 2] ** 2),
                scale[:, 3] ** 2,
            ]
        )
        # pool the centres of each spike: mean of means, mixture variance
        count = np.bincount(spike, minlength=n).astype(np.float64)[:, None]
        count[count == 0] = 1
        pooled = (
            np.stack([np.bincount(spike, weights=mean[:, c], minlength=n) for c in range(4)], 1)
            / count
        )
        second = (
            np.stack(
                [
                    np.bincount(spike, weights=var[:, c] + mean[:, c] ** 2, minlength=n)
                    for c in range(4)
                ],
                1,
            )
            / count
        )
        var = np.clip(second - pooled**2, 0, None)
        sd = np.sqrt(var)
        sd[:, :2] = soma_sd(var[:, :2], self.globals)
        return {
            "x": pooled[:, 0].astype(np.float32),
            "y": pooled[:, 1].astype(np.float32),
            "z": pooled[:, 2].astype(np.float32),
            "alpha": np.exp(pooled[:, 3]).astype(np.float32),
            "x_std": sd[:, 0].astype(np.float32),
            "y_std": sd[:, 1].astype(np.float32),
            "z_std": sd[:, 2].astype(np.float32),
        }

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | Path, info: dict | None = None) -> None:
        """Weights + model globals + geometry (+ ``info``: how it was made) in one safetensors
        file (no pickle)."""
        from ..io import save_safetensors_atomic

        if self.net is None:
            raise LocsortError(
                "nothing to save: the encoder was not trained"
                + (f" ({self.fallback_reason})" if self.fallback_reason else "")
            )
        meta = {
            "format": FORMAT,
            "version": str(FORMAT_VERSION),
            "globals": json.dumps(self.globals.asdict()),
            "geometry": json.dumps(self.geometry),
            "noise": json.dumps(self.noise.tolist()),
            "config": json.dumps(
                {
                    "hidden": self.hidden,
                    "jitter_uv": self.jitter_uv,
                    "max_centres": self.max_centres,
                    "num_inputs": self.net.net[0].in_features,
                    "num_outputs": self.net.net[-1].out_features,
                }
            ),
            "info": json.dumps(info if info is not None else self.info),
        }
        save_safetensors_atomic(path, self.net.state_dict(), meta)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "AmortizedLocalizer":
        """A trained encoder from ``save``; the noise levels are replaced by ``fit`` or
        ``use_recording`` for a new recording of the same probe type."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UsageError(f"encoder file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != FORMAT:
                raise ValueError("not a locsort encoder file")
            config = json.loads(meta["config"])
            globals_ = ModelGlobals(**json.loads(meta["globals"]))
            localizer = cls(
                decay=globals_.decay,
                jitter_uv=config["jitter_uv"],
                max_centres=config["max_centres"],
                hidden=config["hidden"],
                device=device,
            )
            localizer.globals = globals_
            localizer.geometry = json.loads(meta["geometry"])
            localizer.noise = np.asarray(json.loads(meta["noise"]), dtype=np.float32)
            localizer.info = json.loads(meta.get("info", "{}"))
            localizer.net = Encoder(config["num_inputs"], config["hidden"], config["num_outputs"])
            localizer.net.load_state_dict(state)
        except UsageError:
            raise
        except Exception as exc:
            raise LocsortError(
                f"cannot load encoder file {path}: it is corrupt or not a locsort encoder ({exc})"
            ) from None
        localizer.net.to(localizer.device).eval()
        return localizer

    def use_recording(self, neighbourhood, noise) -> "AmortizedLocalizer":
        """Apply a loaded encoder to another recording: same probe geometry, its own noise."""
        _check_geometry(self.geometry, _geometry_of(neighbourhood))
        self.noise = np.asarray(noise, dtype=np.float32)
        return self


def _geometry_of(neighbourhood) -> dict:
    """What an encoder depends on in the probe: slot layout, pitch and reach (µm)."""
    pitch = neighbourhood.pitch_um
    return {
        "regular": bool(neighbourhood.regular),
        "num_slots": int(neighbourhood.size),
        "pitch_um": pitch,
        "reach_um": float(np.abs(neighbourhood.offsets).max()) + pitch,
        "offsets": neighbourhood.offsets[0].round(2).tolist() if neighbourhood.regular else None,
    }


def same_geometry(saved: dict, current: dict) -> bool:
    """True when an encoder made for the probe geometry ``saved`` (``_geometry_of``) reads
    ``current``'s spikes alike."""
    same = saved["regular"] == current["regular"] and saved["num_slots"] == current["num_slots"]
    if same and saved["regular"]:
        same = np.allclose(np.asarray(saved["offsets"]), np.asarray(current["offsets"]), atol=1.0)
    return bool(same)


def _check_geometry(saved: dict, current: dict) -> None:
    if not same_geometry(saved, current):
        raise UsageError(
            "the saved encoder was trained for another probe geometry "
            "(its neighbourhood slots differ from this probe's); "
            "train a new one on this recording (omit the encoder file)"
        )


def _flatten(observations: dict, with_spike: bool = False):
    """Valid (spike, centre) pairs as flat arrays."""
    valid = observations["centres"] >= 0
    spike, j = np.nonzero(valid)
    centres = observations["centres"][spike, j]
    amplitudes = observations["amplitudes"][spike, j]
    return (spike, centres, amplitudes) if with_spike else (centres, amplitudes)
