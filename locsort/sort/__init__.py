"""Spike sorting stages: clustering on locations + waveform features."""
