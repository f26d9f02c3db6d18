"""The pipeline's internal constants: values chosen by measurement, not settings a user tunes.

Each has a one-line reason; the measurements behind it are in ``docs/design-decisions.md``
(the section named after ``§``). They are grouped in one frozen dataclass so that a run records
them all (``run.json``: ``constants``) and so that the tests and benchmarks can run the real
pipeline at a small size (``Params(constants=Constants(encoder_max_epochs=5))``). The user's
parameters are in ``locsort.params``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import UsageError


@dataclass(frozen=True)
class Constants:
    # --- preprocessing (§ Preprocessing) ---
    bad_channel_flat: float = 0.2  # noise below this x the median channel's: a dead contact
    bad_channel_noisy: float = 5.0  # above this x the median: SpikeInterface's std/mad threshold
    noise_chunks: int = 20  # 10,000-sample slices per segment: a stable MAD per channel
    reference_min_channels: int = 16  # fewer: one spike moves their median, so no common reference

    # --- chunking ---
    chunk_margin_ms: float = 2.0  # read on each side of a chunk: no window cuts a spike

    # --- detection (§ Detection) ---
    detect_method: str = "matched"  # "matched" filter or "peak" on the traces: matched sorts better
    detect_sweep_ms: float = 0.3  # a peak is the minimum within +/- this time ...
    detect_radius_um: float = 60.0  # ... and among channels this close: 40 and 80 µm sorted worse
    matched_filter_ms_before: float = 0.5  # the spike prototype before its trough ...
    matched_filter_ms_after: float = 0.8  # ... and after: the trough and the repolarization

    # --- neighbourhood and amplitudes (§ Amplitudes) ---
    neighbourhood_channels: int = 25  # lattice slots around the centre channel (5 x 5 on a grid)
    shank_gap_um: float = 100.0  # contact columns farther apart: separate shanks (no spike spans)
    amplitude_window_ms: float = 0.17  # amplitude = minimum within +/- this (the paper's 5 samples)
    amplitude_components: int = 5  # temporal PCs the snippet is projected on (0: raw); 3, 8 worse
    amplitude_denoise_min_gain: float = 0.3  # Wiener-denoised components need this gain (1: none)
    snippet_ms_before: float = 0.6  # waveform kept before the peak ...
    snippet_ms_after: float = 1.0  # ... and after

    # --- localization (§ Localization) ---
    localization_method: str = "locsort"  # "locsort" (amortized Bayesian) or "center_of_mass"
    com_channels: int = 9  # centre of mass (baseline and fallback): nearest real channels
    decay_law: str = "exponential"  # amplitude against distance, or "monopole" (the paper's 1/r)
    source_offset_um: float = 8.0  # SD per axis of soma against point source: honest x/y SDs
    jitter_uv: float = 0.0  # the paper's amplitude jitter (0: none): same errors, 2-3x training
    max_jitter_centres: int = 4  # with jitter: at most this many centres per spike
    encoder_hidden: int = 256  # width of the encoder MLP
    encoder_batch_size: int = 512  # spikes per ELBO step
    encoder_max_epochs: int = 30  # from scratch; 15 was worse, 45 gained little
    encoder_patience: int = 8  # epochs without held-out ELBO improvement before stopping
    encoder_lr: float = 2e-3  # Adam learning rate
    encoder_init_epochs: int = 10  # from a pretrained start: a third of the training, same errors
    encoder_refine_epochs: int = (
        3  # a sort's reported locations: more epochs on denoised amplitudes
    )
    min_training_spikes: int = 300  # fewer: centre of mass instead (and the run says so)
    localize_min_channels: int = 8  # fewer on a shank: x, y, z and size are not determined; CoM

    # --- training sample (§ Training sample) ---
    sample_chunks: int = 30  # chunks spread over the recording that the models learn from
    max_training_spikes: int = 50_000  # spikes kept from those chunks: bounds memory
    sample_spikes_per_channel: int = 200  # a sort's sample stops here: ~200 spikes per unit

    # --- motion (§ Motion) ---
    motion_bin_s: float = 1.0  # time bins of the estimate: DREDge's default, follows fast jumps
    motion_time_smooth_s: float = 0.5  # DREDge's raster smoothing in time: its 1 s blurs motion
    motion_window_um: float = 400.0  # non-rigid depth windows this wide ...
    motion_window_step_um: float = 400.0  # ... this far apart (spykingcircus2's dredge_fast)
    motion_max_um: float = 100.0  # largest displacement between two time bins searched for
    motion_min_windows: int = 3  # non-rigid on probes this many windows long: fewer were worse
    motion_min_rows: int = 4  # distinct contact depths needed to follow spikes along the probe
    motion_min_aspect: float = 2.0  # "auto": a shank this many times taller than wide (not an MEA)
    motion_min_spikes_per_bin: int = 20  # fewer spikes in a typical time bin: no estimate
    motion_screen_min_chunks: int = 5  # sample chunks needed to screen for drift
    motion_min_um: float = 5.0  # "auto": a smaller largest displacement on the sample is no drift
    motion_kriging_sigma_um: float = 20.0  # registration's kriging kernel (SpikeInterface's)
    motion_merge_max_um: float = 12.0  # a neuron's pieces after registration lie this close ...
    motion_merge_max_overlap: float = 0.2  # ... over disjoint displacements (0: never merged)

    # --- sorting (§ Neural sorter) ---
    sorter: str = "neural"  # "cluster" (every spike clustered) is the benchmarks' baseline
    neural_epochs: int = 30  # upper bound; early stopping usually ends sooner
    neural_lr: float = 3e-3  # Adam, the head's; a pretrained backbone learns at 0.3 x this
    neural_batch_size: int = 256  # candidate windows per step
    neural_frozen_epochs: int = 10  # a pretrained backbone stays frozen while the new head trains
    neural_patience: int = 1  # epochs without held-out improvement: 3 was no better, and slower
    neural_threshold: float = 0.5  # a candidate is a spike when its units' probabilities pass this
    neural_refractory_ms: float = 0.5  # one unit's candidates closer than this are one spike
    neural_min_z: float = 4.5  # a first-pass spike must match its template this far above noise
    neural_min_z_shift_ms: float = 0.3  # ... searched this far around it (off-channel detections)
    label_tolerance_ms: float = 0.4  # a labelled spike marks the nearest candidate within this
    few_label_ensemble: int = 3  # with K labels per unit: networks from different seeds, averaged
    few_label_synthetic_positives: int = 4  # ... each with this many synthetic spikes per label

    # --- peeling (§ Peeling) ---
    neural_peel: bool = True  # subtract assigned spikes and detect again: overlapping spikes
    peel_radius_um: float = 100.0  # templates cover channels this close: large spikes' edges
    peel_max_channels: int = 40  # ... at most this many: bounds the sample's memory
    peel_detect_threshold: float = 4.0  # the residual is searched this low (x noise): faint units
    neural_peel_threshold: float = 0.6  # a spike found under others must be this probable ...
    neural_peel_min_fit: float = 0.3  # ... its template must remove this share of its energy ...
    neural_peel_min_z: float = 4.5  # ... and match it this far above the noise (0: no test)
    neural_rescue_min_probability: float = 0.1  # a rejected candidate may go to a unit this likely
    neural_rescue_min_fit: float = 0.5  # ... whose template removes this share of its energy

    # --- clustering (§ Clustering) ---
    waveform_pcs: int = 3  # temporal PCs kept of the centre channel's waveform
    cluster_pcs: int = 2  # whitened PCs that join x, y and amplitude (as the paper)
    cluster_min_size: int = 25  # HDBSCAN's min_cluster_size: fewer spikes is not a unit
    cluster_sample: int = 40_000  # spikes HDBSCAN sees; the rest go to their nearest neighbours
    cluster_location_scale_um: float = 5.0  # µm that count as one unit of clustering distance
    split_max_rounds: int = 3  # clusters split again on multi-channel waveforms (0: never)
    split_pcs: int = 6  # ... described by this many PCs of their spikes' waveforms ...
    split_more_pcs: int = 10  # ... and, where those show one group, this many (0: no second look)
    merge_min_similarity: float = 0.95  # clusters whose templates agree this well merge (1: never)
    merge_max_amplitude_ratio: float = 1.5  # ... when their sizes differ by at most this factor
    merge_max_shift_ms: float = 0.3  # ... also at a shift of up to this (0: lag 0 only)
    merge_max_trough_ratio: float = 1.15  # ... troughs on one channel within this (still probe)
    merge_refractory_ms: float = 1.5  # ... unless their spikes break this period (0: no test)
    duplicate_unit_min_shared: float = 0.5  # a unit repeating this share of a larger one's spikes
    duplicate_unit_max_lag_ms: float = 2.5  # ... within this lag is removed: late far copies
    lagged_copy_min_share: float = 0.02  # spikes at one fixed lag from a larger unit's (1: never)
    lagged_copy_max_lag_ms: float = 0.8  # ... at most this late or early: far channels' copies
    collision_min_excess: float = 0.5  # a unit whose spikes mostly meet a neighbour's (1: never)
    collision_window_ms: float = 0.8  # ... this close, beyond chance: two neurons' sums
    cluster_adopt_min_fit: float = 0.5  # unclustered spikes go to a template that fits this well
    cluster_adopt_max_residual: float = 1.3  # ... leaving at most this x the expected noise energy

    # --- curation outputs (§ Curation) ---
    analyzer_max_waveforms: int = 50  # waveforms kept per unit: templates and SNR settle by then
    noise_max_snr: float = 3.0  # a template peak under 3 noise SDs: indistinguishable from noise
    good_max_isi_violations: float = 0.1  # Kilosort's "good": about 10 % contamination at most
    good_min_presence_ratio: float = 0.7  # bombcell: firing in 70 % of the 60 s bins ...
    good_max_amplitude_cutoff: float = 0.2  # ... with at most 20 % of its spikes under threshold
    good_min_spikes: int = 100  # fewer spikes leave the metrics above too uncertain to trust

    @classmethod
    def from_dict(cls, values: dict) -> Constants:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown constant(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes) -> Constants:
        return self.from_dict({**asdict(self), **changes})

    def asdict(self) -> dict:
        return asdict(self)
