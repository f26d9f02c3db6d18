"""Every default of the pipeline in one place, with what it means and why it has that value.

``Params`` is a plain dataclass: build one with keyword overrides (``Params(detect_threshold=6)``)
or from a dict (``Params.from_dict(d)``, unknown keys are an error), and ``asdict()`` is what
``run.json`` records.
"""

from dataclasses import asdict, dataclass, fields

from .errors import UsageError


@dataclass
class Params:
    # --- preprocessing (SpikeInterface) ---
    preprocess: bool = True  # band-pass + common reference; turn off for already-filtered data
    freq_min: float = 300.0  # Hz, high-pass edge: removes LFP below the spike band
    freq_max: float = 6000.0  # Hz, low-pass edge: spikes carry little power above
    common_reference: str = (
        "median"  # "median", "average" or "none": removes noise shared by all channels
    )
    filter_direction: str = (
        "forward-backward"  # "forward-backward" (zero phase) or "forward" (causal, ~3x cheaper)
    )
    # 2 flat + 1 noisy of 64 channels (bench_bad_channels.py, 60 s generated): accuracy 0.855 / 1 FP unit kept
    # as they are, 0.873 / 0 interpolated (intact 0.873 / 0); median location error 8.10 -> 5.83 µm (intact 5.82)
    bad_channels: str = "auto"  # channels interpolated from their neighbours (SpikeInterface's interpolate_bad_channels) before the common reference: "auto" finds flat and very noisy ones (bad_channel_flat, bad_channel_noisy), "none" keeps every channel, or comma-separated channel ids
    bad_channel_flat: float = (
        0.2  # "auto": band-passed noise level below this x the median channel's: flat (dead)
    )
    bad_channel_noisy: float = 5.0  # ... above this x the median channel's: noisy (SpikeInterface's detect_bad_channels std/mad threshold)

    # --- chunking (every pass over the traces) ---
    chunk_duration: float = 1.0  # s of traces per chunk: memory per chunk, independent of duration
    chunk_margin_ms: float = (
        2.0  # ms read on each side of a chunk so that windows never cut a spike
    )

    # --- detection ---
    detect_method: str = "matched"  # "matched": threshold each channel's correlation with the recording's mean spike shape (detect.py); "peak": the traces themselves
    detect_threshold: float = 5.5  # x noise level (MAD-based SD) of each channel's detection signal: negative peaks below (matched: 5.5 sorted best on np128 MEArec / np64, NOTES.md session 6; use 5 with "peak")
    detect_sweep_ms: float = 0.3  # ms: a peak must be the minimum within +/- this time ...
    detect_radius_um: float = 60.0  # ... and among the channels within this distance (40 / 60 / 80 µm with ground-truth labels: np128 accuracy 0.918 / 0.926 / 0.921, np64 0.822 / 0.824 / 0.816; NOTES.md session 12)
    matched_filter_ms_before: float = 0.5  # ms of the spike prototype before its trough ...
    matched_filter_ms_after: float = (
        0.8  # ... and after (covers the trough and the repolarization peak)
    )
    noise_chunks: int = (
        20  # random 10,000-sample slices per segment used to estimate per-channel noise
    )

    # --- neighbourhood (fixed-shape channel window around the centre channel) ---
    neighbourhood_channels: int = 25  # lattice positions per neighbourhood (5 x 5 on a square grid)
    amplitude_window_ms: float = 0.17  # ms: channel amplitude = min within +/- this of the centre peak (the paper's +/- 5 samples)
    amplitude_components: int = 5  # ... of the snippet projected on this many temporal principal components of the recording's spikes (0: raw traces; median 2-D error np64 7.80 -> 7.00 µm, np128 11.43 -> 10.52, square MEA 10 / 20 / 30 µV 9.20 / 11.45 / 13.31 -> 8.74 / 10.30 / 13.05; 3 / 8 components worse; NOTES.md session 16)
    # median 2-D error at ground-truth peaks, seeds 0-1 (NOTES.md session 31), without -> with: square MEA 10 / 20 / 30 µV
    # 8.75 / 10.45 / 12.72 -> 9.27 / 10.29 / 10.98 µm, np64 6.67 -> 6.26, np128 10.66 -> 9.86; but clustering on them lost
    # np128 accuracy (0.960 -> 0.951 over seeds 0-2), so a sort clusters without it and reports with it (encoder_refine_epochs)
    amplitude_denoise_min_gain: float = 0.3  # ... and the neighbourhood's temporal coefficients replaced by their Wiener estimate on the principal components of the training sample's spikes whose gain (1 - noise / total) is at least this (neighbourhood.fit_amplitude_denoiser; 1: off)
    snippet_ms_before: float = 0.6  # ms of waveform kept before the peak for waveform features
    snippet_ms_after: float = 1.0  # ms after

    # --- localization ---
    localization_method: str = "locsort"  # "locsort" (amortized Bayesian) or "center_of_mass"
    com_channels: int = 9  # centre-of-mass baseline (and fallback): number of nearest real channels
    decay_law: str = "exponential"  # amplitude vs distance: "exponential" or "monopole" (1/r)
    source_offset_um: float = (
        8.0  # SD per axis of soma vs point source (model.py): widens x/y posterior SDs
    )
    # Off by default: on the five benchmark recordings 10 µV gave the same or worse errors at 2-3x the
    # training time of the same number of epochs without it (BENCHMARKS.md, session 11 in NOTES.md)
    jitter_uv: float = 0.0  # amplitude jitter (the paper's): channels within this many µV of the largest also serve as centre (0: off)
    max_jitter_centres: int = 4  # at most this many centres per spike
    encoder_hidden: int = 256  # width of the encoder MLP
    encoder_batch_size: int = 512  # spikes per ELBO step
    # training budget in passes over the sample (~4-8 s for 20,000 spikes on 2 cores); without jitter, 15 -> 30
    # epochs took the median error on sq_10uV from 10.3 to 9.2 µm (np64 7.83 -> 7.80), 45 gains less
    encoder_max_epochs: int = 30
    encoder_patience: int = 8  # epochs without held-out ELBO improvement before stopping
    encoder_lr: float = 2e-3  # Adam learning rate
    encoder_max_seconds: float = 0.0  # optional wall-time budget (0: none); with one, results depend on the machine's speed and load
    # the neural sort's reported locations: median 2-D error at ground-truth peaks, seeds 0-1, square MEA 10 / 20 / 30 µV,
    # np64, np128: clustering's encoder 8.75 / 10.46 / 12.72 / 6.68 / 10.66 µm -> 3 more epochs on denoised amplitudes
    # 8.66 / 9.75 / 10.84 / 6.20 / 10.08 in 0.4-1.2 s (NOTES.md session 32). localize() trains on denoised amplitudes from
    # the start (8.94 / 10.76 / 11.17 / 6.41 / 9.75): refined posteriors over-cover (±1 SD 0.85 on sq_30, target <= 0.8)
    encoder_refine_epochs: int = 3  # neural sort: its clustering's encoder trained this many more epochs on the amplitude denoiser's amplitudes reports the locations (0: no denoiser in a sort)
    # where the encoder's training starts. From the shipped encoder of the probe type (scripts/pretrain_encoder.py, on generated
    # recordings no benchmark uses), 10 epochs on the recording's own spikes, the learning rate falling to 0 along a cosine,
    # instead of 30 from scratch: a third of the training time (NOTES.md session 34). Median 2-D error at ground-truth peaks,
    # mean of seeds 0-1, square MEA 10 / 20 / 30 µV, np64, np128: from scratch 9.35 / 9.90 / 11.82 / 6.40 / 9.84 µm, from the
    # shipped encoder 8.61 / 9.56 / 10.95 / 6.10 / 9.87 (but square MEA 30 µV +-1 SD covers 0.84-0.86 of the true x, from
    # scratch 0.74-0.78); sort accuracy np64 / np128, seeds 0-2, 0.876 / 0.968 -> 0.873 / 0.967
    encoder_init: str = "pretrained"  # "pretrained": the shipped encoder for this probe's neighbourhood layout (Neuropixels-1.0-like staggered columns, 15 µm square MEA) when there is one, else from scratch; "none": from scratch; or a saved encoder (.safetensors) of the same probe type
    encoder_init_epochs: int = (
        10  # training epochs from a pretrained start (from scratch: encoder_max_epochs)
    )
    min_training_spikes: int = 300  # fewer spikes: fall back to centre of mass (and say so)
    encoder_path: str = ""  # a saved encoder (.safetensors) to use instead of training one

    # --- training sample (bounded, drawn across the whole recording) ---
    sample_chunks: int = (
        30  # chunks read to fit waveform PCA / models: bounded, spread over the recording
    )
    max_training_spikes: int = 50_000  # spikes kept from those chunks
    # clustering needs ~200 spikes per unit. Seeds 0-2, np64 (0.8 units and 10 detected spikes per channel a second): 30 / 15 /
    # 10 chunks 0.8736 / 0.8729 / 0.8740 (1 FP unit on each seed); 150 a channel (16 chunks) 0.8725, 1 FP unit on each seed; 200
    # (22 chunks) 0.8743, none. np128 (0.4 units, 2.7 spikes a channel a second) takes all 30 chunks: 30 / 15 / 10 chunks
    # 0.9663 / 0.9409 / 0.9168 (NOTES.md session 36)
    sample_spikes_per_channel: int = 200  # a sort's own training sample stops at this many detected spikes per channel: fewer than sample_chunks chunks where spikes are dense (at least 10; 0: always sample_chunks)
    trace_cache_mb: float = 512.0  # MB of the sample chunks' preprocessed traces kept in memory for the main pass, which then does not filter them again (0: none; all 30 chunks of 128 channels at 30 kHz take ~460 MB: np128 detect stage 7.0 -> 4.6 s; of 384 channels 11 fit: ~2 s of 94 for +500 MB peak memory, BENCHMARKS.md)

    # --- sorting ---
    sorter: str = "neural"  # "neural": cluster a training sample, train the network on it, let it assign every spike; "cluster": cluster every spike
    neural_backbone: str = "pretrained"  # backbone to fine-tune: "pretrained" (shipped), "none" (from scratch) or a .safetensors path
    neural_epochs: int = 30  # upper bound; early stopping on held-out loss usually ends sooner
    neural_lr: float = (
        3e-3  # Adam learning rate of the head (a pretrained backbone learns at 0.3 x this)
    )
    neural_batch_size: int = 256  # candidate windows per step
    neural_frozen_epochs: int = 10  # a pretrained backbone stays frozen this many epochs while the new (imprinted) head trains, then all is fine-tuned
    neural_ensemble: int = 0  # networks trained from different seeds, probabilities averaged; 0: 3 with a user's labels limited to K per unit (first 10 per unit, np64: 0.805 -> 0.820), else 1 (all first-half labels 0.843 -> 0.846 at twice the time; own clustering np128 0.925 -> 0.926)
    neural_synthetic_positives: int = -1  # synthetic spikes per labelled spike while training: its unit's mean snippet plus another labelled spike's noise; -1: 4 with a user's labels limited to K per unit (np64 pretrained K=10 0.820 -> 0.834, square MEA 0.712 -> 0.759), else 0 (own clustering: np64 0.849 -> 0.850, np128 unchanged, at more training time)
    neural_self_training: int = -1  # 1: a network trained on a user's labels labels a sample of the whole recording and a second network trains on both, from scratch (pipeline._self_trained); 0: never; -1: with labels limited to K per unit (3 seeds, K = 10, pretrained: np64 0.847 -> 0.870, square MEA 0.784 -> 0.823; scratch K = 20: 0.855 -> 0.868, 0.816 -> 0.845; NOTES.md session 26)
    neural_adapted_backbone: int = -1  # 1: before training on a user's labels, a network is trained on locsort's own clustering of a sample of the whole recording (no labels; as the default sort does, from neural_backbone) and the few-label networks fine-tune its backbone (pipeline._adapted_backbone); 0: never; -1: with labels limited to K per unit (bench_transfer, 3 seeds, K = 5 / 10 / 20: square MEA pretrained 0.723 / 0.823 / 0.822 -> 0.782 / 0.837 / 0.828, scratch 0.691 / 0.815 / 0.845 -> 0.811 / 0.836 / 0.840; np64 pretrained 0.871 / 0.870 / 0.868 -> 0.875 / 0.871 / 0.872, scratch K = 5 0.802 -> 0.873; about 1 s more per np64 sort; NOTES.md session 28)
    neural_patience: int = 1  # epochs without held-out loss improvement before stopping (once the backbone is fine-tuned; mean accuracy of seeds 0-2, np64 / np128: 3 0.8725 / 0.9669, 1 0.8736 / 0.9663 with 2-3 s less training; NOTES.md session 35)
    neural_max_seconds: float = 0.0  # optional wall-time budget (0: none); with one, results depend on the machine's speed and load
    neural_threshold: float = 0.5  # a candidate is a spike when its units' probabilities add up above this; it goes to its most probable unit
    neural_peel: bool = True  # subtract the assigned spikes' unit templates from each chunk and detect again under them (overlapping spikes; sort/peel.py)
    peel_radius_um: float = 100.0  # peeling templates cover the channels within this distance of the unit's usual centre (wider than detect_radius_um: a large spike's edges cross the threshold too; np64 accuracy 0.841 at the 25-channel neighbourhood -> 0.847)
    peel_max_channels: int = (
        40  # ... at most this many, the nearest (dense arrays: bounds the training sample's memory)
    )
    neural_rescue_min_probability: float = 0.1  # a candidate the network rejects goes to the best-fitting template among its 3 most probable units of at least this probability (overlapping spikes; 1: off; np64 0.847 -> 0.849, np128 0.923 -> 0.926; 0.05 / 0.1 and fit 0.3 / 0.5 / 0.7 within 0.001)
    neural_rescue_min_fit: float = (
        0.5  # ... when that template removes at least this fraction of its energy at the spike
    )
    peel_detect_threshold: float = 4.0  # the residual is searched at this threshold (x noise level), under the subtracted spikes and wherever the first pass found nothing: faint units' spikes between this and detect_threshold (session 23, with lagged_copy_min_share: 5.5 -> 4.5 np64 0.849 / 43 -> 0.869 / 44, np128 0.929 / 46 -> 0.944 / 46; session 24, with neural_peel_min_z: 4.5 / 4.0 / 3.5 np64 0.869 / 0.871 / 0.871, np128 0.962 / 0.963 / 0.963)
    neural_peel_threshold: float = 0.6  # a spike found under others must be this probable (the residual holds leftovers of imperfect subtraction; session 12, before the fit and noise tests below: 0.5 / 0.8 / 0.95 np64 0.831 / 0.834 / 0.837; session 25, with them, mean of seeds 0-2: 0.95 -> 0.6 np64 0.8709 -> 0.8729, np128 0.9595 -> 0.9604, higher on every seed; 0.5 / 0.8 like 0.6)
    neural_peel_min_fit: float = 0.3  # ... and one its unit's template fits: least squares removes at least this fraction of the template's energy from the residual (leftovers of imperfect subtraction: np64 0.837 -> 0.843, np128 0.917 -> 0.918; NOTES.md session 12)
    neural_peel_min_z: float = 4.5  # ... and match its unit's template, prewhitened by the noise's correlations across channels and time, this many noise SDs above noise alone (sort/peel.Significance; 0: off; np128 0.955 / 48 -> 0.962 / 49, np64 0.867 -> 0.869 / 44; 5.0: 0.963 / 0.868; NOTES.md session 24)
    # a spike the network assigns on the first pass must match its unit's template, prewhitened as for neural_peel_min_z, this
    # many noise SDs above noise alone, at its best within neural_min_z_shift_ms: the network passes noise events to faint
    # units (np128 #8, #42, #26: 19-35 false spikes each, most under 5 SDs). Mean accuracy of seeds 0-2, np128 / np64: off 0.9604 /
    # 0.8729; 3: 0.9644 / 0.8739; 4: 0.9667 / 0.8743; 4.5: 0.9683 / 0.8740; 5: 0.9700 / 0.8737; 6: 0.9684 / 0.8691;
    # 7: 0.9458 / 0.8579 (NOTES.md session 33)
    neural_min_z: float = 4.5  # (0: off)
    neural_min_z_shift_ms: float = 0.3  # ... a unit detected on another channel than usual peaks up to ~0.3 ms off its template's time (np128 #47: 186 spikes 6-9 samples late; searched at +-1 sample, the test at 4 removed them: np128 seed 0 0.9641, at +-0.3 ms 0.9686)
    neural_refractory_ms: float = (
        0.5  # one unit's candidates closer than this are one spike (the local maximum is kept)
    )
    label_max_spikes_per_unit: int = (
        0  # with user labels: train on the first K spikes of each unit (0: all)
    )
    label_tolerance_ms: float = 0.4  # a labelled spike marks the nearest candidate within this (SpikeInterface's match tolerance)

    # --- clustering ---
    waveform_pcs: int = 3  # temporal principal components kept per neighbourhood channel
    cluster_pcs: int = (
        2  # whitened PCs of the centre-channel waveform used for clustering (as the paper)
    )
    cluster_min_size: int = 25  # HDBSCAN min_cluster_size: fewer spikes than this is not a unit
    cluster_sample: int = (
        40_000  # spikes clustered by HDBSCAN; the rest are assigned by nearest neighbours
    )
    split_max_rounds: int = 3  # neural path: each cluster is split again on its multi-channel waveforms (sort/split.py) up to this many times (0: never)
    merge_min_similarity: float = 0.95  # merge clusters whose templates agree this well (cosine over shared contacts; 1: never)
    merge_max_amplitude_ratio: float = (
        1.5  # ... and whose template sizes differ by at most this factor
    )
    merge_max_shift_ms: float = 0.3  # ... also when one template is shifted by up to this (one neuron detected on channels its spike reaches at different times; 0: lag 0 only)
    duplicate_unit_min_shared: float = 0.5  # a unit with this share of its spikes within duplicate_unit_max_lag_ms of a larger unit's repeats it and is removed (own labels only; 1: never); on the training sample's clusters too, whose copies become negatives the network learns to reject (np128 0.925 / 45 -> 0.929 / 46, #8's precision 0.68 -> 0.88; every pair with a coincidence is examined, not only SpikeInterface's agreement >= 0.2: FP units 2 -> 0)
    duplicate_unit_max_lag_ms: float = 0.8  # ... (late copies on far channels come 0.4-0.7 ms after the spike: np128 FP units 4 -> 2 at 0.8 ms, accuracy unchanged; np64 unchanged; NOTES.md session 20)
    lagged_copy_min_share: float = 0.02  # a unit's spikes at one fixed lag (within duplicate_unit_max_lag_ms) from a larger unit's are that unit's spikes detected again on far channels and are removed, when they are at least this share of its spikes and far above chance (sort/postprocess.lagged_copy_spikes; 1: never; at peel_detect_threshold 4.5, without it: np64 0.863 / 42, np128 0.934 / 45)
    cluster_adopt_min_fit: float = 0.5  # neural path: a training-sample spike the clustering left out goes to the cluster whose template removes at least this share of its own energy from it (the unit detected on another channel than usual; sort/peel.adopt; 1: never; np128 0.944 / 46 -> 0.955 / 48, np64 0.869 / 44 -> 0.867 / 44; NOTES.md session 24)
    cluster_adopt_max_residual: float = 1.3  # ... and leaves at most this multiple of the noise energy expected on the spike's footprint (the template explains the spike down to the noise, not only part of it; without this test np128 fell to 0.915; 1.15 / 1.5: 0.956 / 0.955)
    cluster_location_scale_um: float = (
        5.0  # µm that count as one unit of distance in the clustering space
    )

    # --- execution ---
    device: str = "auto"  # "auto" (CUDA when present), "cpu" or "cuda"
    seed: int = 0  # every random choice (sampling, training, clustering) derives from this

    @classmethod
    def from_dict(cls, values: dict) -> "Params":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown parameter(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def descriptions(cls) -> dict:
        """{field: its comment in this file}: the meaning of every parameter, for help texts."""
        import inspect
        import re

        found = {}
        for line in inspect.getsource(cls).splitlines():
            match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
            if match:
                found[match.group(1)] = match.group(2).strip()
        return {f.name: found.get(f.name, "") for f in fields(cls)}

    def replace(self, **changes) -> "Params":
        return self.from_dict({**asdict(self), **changes})

    def asdict(self) -> dict:
        return asdict(self)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; an explicit 'cuda' without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto"
        )
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device
