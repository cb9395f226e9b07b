"""stalwart: keeps PyTorch training alive and cheap to restart."""

from stalwart.errors import ChecksumError, ConversionError, FormatError, LayoutError, StalwartError

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "ConversionError",
    "FormatError",
    "LayoutError",
    "StalwartError",
    "__version__",
]
