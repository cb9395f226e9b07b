"""The order of a model's params, for optimizer state saved by position.

torch optimizer state dicts index params by position. Their names come from the user
(``--param-order FILE``: one name per line, or a JSON list) or from a model config:
the transformers model it describes is built on the meta device (no memory, no
download) and its ``named_parameters()`` order read.
"""

from __future__ import annotations

import json

from stalwart.errors import ConversionError


def read_param_order(spec: str) -> tuple[list[str] | None, str | None]:
    """``--param-order``: (names, None) from a list file, or (None, config path) for a model config."""
    try:
        with open(spec, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConversionError(f"--param-order {spec}: cannot read it ({e.strerror})") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return None, spec
    if stripped.startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConversionError(f"--param-order {spec}: not a JSON list ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConversionError(f"--param-order {spec}: a JSON list must hold param names (strings)")
        return names, None
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return names, None


def model_param_order(config_path: str) -> tuple[list[str], set[str], str]:
    """(trainable param names in ``named_parameters()`` order, the names Trainer decays, the class name)
    of the transformers model ``config_path`` describes, built on the meta device."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConversionError(f"reading the param order from {config_path} needs transformers ({e})") from None
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
        config = transformers.AutoConfig.for_model(**raw) if "model_type" in raw else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{config_path}: not a transformers model config ({e})") from None
    if config is None:
        raise ConversionError(f"{config_path}: not a transformers model config (no model_type)")
    archs = raw.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    try:
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as e:  # a model class's own construction error, whatever its kind
        raise ConversionError(f"{config_path}: transformers could not build {archs[:1] or 'the model'} ({e})") from None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    return names, decay, type(model).__name__


__all__ = ["model_param_order", "read_param_order"]
