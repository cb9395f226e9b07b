"""stalwart: keeps PyTorch training alive and cheap to restart."""

from stalwart.errors import ChecksumError, ConversionError, FormatError, LayoutError, StalwartError

__version__ = "0.1.0"



def __getattr__(name: str):
    # ``stalwart.protect`` without importing the checkpoint engine for format-only users.
    if name in ("protect", "init_distributed", "Guard", "Timeouts"):
        import stalwart.ckpt as _ckpt

        return getattr(_ckpt, name)
    raise AttributeError(f"module 'stalwart' has no attribute {name!r}")


__all__ = [
    "ChecksumError",
    "ConversionError",
    "FormatError",
    "LayoutError",
    "StalwartError",
    "__version__",
    "init_distributed",
    "protect",
]
