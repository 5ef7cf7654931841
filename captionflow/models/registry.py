"""Model registries: `@register_model("name")` on a class, `create_model(name, **cfg)` for
captioners; the retrieval models (models/retrieval.py) have a registry of their own."""

import inspect

from captionflow.errors import CaptionflowError


class Registry:
    """Classes by config name; `kind` names them in errors ("model", "retrieval model")."""

    def __init__(self, kind):
        self.kind, self.classes = kind, {}

    def register(self, name):
        """Class decorator adding `cls` under `name` (the config value)."""

        def wrap(cls):
            if name in self.classes and self.classes[name] is not cls:  # a second class would silently replace the first
                raise ValueError(f"{self.kind} name {name!r} is registered twice: {self.classes[name].__qualname__} and {cls.__qualname__}")
            self.classes[name] = cls
            cls.registry_name = name
            return cls

        return wrap

    def create(self, name, **cfg):
        """Build `name`; unknown options are refused naming them."""
        if name not in self.classes:
            raise CaptionflowError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self.classes))}")
        cls = self.classes[name]
        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(cfg) - set(allowed))
        if unknown:
            raise CaptionflowError(f"{self.kind} {name} has no option(s) {', '.join(unknown)}; its options: {', '.join(allowed)}")
        return cls(**cfg)


CAPTIONERS = Registry("model")
MODELS = CAPTIONERS.classes
register_model = CAPTIONERS.register
create_model = CAPTIONERS.create
