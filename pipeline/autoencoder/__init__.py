"""Stage 2b: train the first-stage autoencoder on a dataset's tiled patches (held-out ones never
trained on) and measure it on the held-out ones against a bicubic baseline."""

from pipeline.autoencoder.outputs import AutoencoderMetrics, read_autoencoder_metrics, trained_model_dir
from pipeline.autoencoder.settings import AutoencoderTrainSettings

__all__ = ["AutoencoderMetrics", "AutoencoderTrainSettings", "read_autoencoder_metrics", "trained_model_dir"]
