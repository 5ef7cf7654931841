"""Model registry: `@register_model("name")` on a class, `create_model(name, **cfg)`."""

import inspect

from captionflow.errors import CaptionflowError

MODELS = {}


def register_model(name):
    """Class decorator adding a CaptionModel subclass under `name` (the config value)."""

    def wrap(cls):
        if name in MODELS and MODELS[name] is not cls:  # a second model would silently replace the first
            raise ValueError(f"model name {name!r} is registered twice: {MODELS[name].__qualname__} and {cls.__qualname__}")
        MODELS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def create_model(name, **cfg):
    """Build registry model `name`; unknown options are refused naming them."""
    if name not in MODELS:
        raise CaptionflowError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise CaptionflowError(f"model {name} has no option(s) {', '.join(unknown)}; its options: {', '.join(allowed)}")
    return cls(**cfg)
