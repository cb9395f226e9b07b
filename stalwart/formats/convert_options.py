"""Constants shared by the converter and its command line (no torch import here, so
``stalwart --help`` stays fast)."""

TARGETS = ("native", "hf", "dcp", "ds-universal", "torch")
DEFAULT_MAX_SHARD = "5GB"
DEFAULT_BUFFER = 256 * 1024 * 1024
