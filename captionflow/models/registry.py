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
            if (
                name in self.classes and self.classes[name] is not cls
            ):  # a second class would silently replace the first
                raise ValueError(
                    f"{self.kind} name {name!r} is registered twice: {self.classes[name].__qualname__} and {cls.__qualname__}"
                )
            self.classes[name] = cls
            cls.registry_name = name
            return cls

        return wrap

    # Constructor arguments the training stages fill in from the data, never from a config.
    FROM_DATA = ("vocab_size", "feat_dim")

    def options(self, name):
        """The options a config may give `name` (its constructor's, less FROM_DATA)."""
        self._known(name)
        params = inspect.signature(self.classes[name].__init__).parameters
        return [p for p in params if p != "self" and p not in self.FROM_DATA]

    def check_options(self, name, cfg):
        """Refuse, in one line, a config option `name` does not have (`cfg`: its model_args)."""
        unknown = sorted(set(cfg) - set(self.options(name)) - set(self.FROM_DATA))
        if unknown:
            raise CaptionflowError(
                f"{self.kind} {name} has no option(s) {', '.join(unknown)}; its options: {', '.join(self.options(name))}"
            )

    def bad_values(self, name, cfg):
        """(option, why) for each value of `cfg` that its constructor default rules out: an int
        default (a size or count) asks for a positive int, or a non-negative one for a layer
        count (`*layers`: 0 is an ablation, e.g. AoANet without its refiner; a model that
        needs a layer says so itself), a float default of a *dropout* option for a
        probability in [0, 1), a None default of a *_size option for null or a positive int, a
        bool default for a bool, an option the class lists in its
        `option_choices` ({option: allowed values}) for one of those values. Other options (and
        options `name` does not have: check_options) are not checked."""
        params = inspect.signature(self.classes[name].__init__).parameters
        choices = getattr(self.classes[name], "option_choices", {})
        for option, value in cfg.items():
            default = params[option].default if option in params else None
            if option in choices:
                if value not in choices[option]:
                    yield option, f"{value!r} must be one of {', '.join(map(str, choices[option]))}"
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    yield option, f"{value!r} must be true or false"
            elif isinstance(default, int):
                least = 0 if option.endswith("layers") else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    yield option, f"{value!r} must be a {'non-negative' if least == 0 else 'positive'} integer"
            elif default is None and option.endswith("_size"):  # null: a size the model derives
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    yield option, f"{value!r} must be a positive integer or null"
            elif isinstance(default, float) and "dropout" in option:
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                    yield option, f"{value!r} must be a probability from 0 up to (not including) 1"

    def create(self, name, **cfg):
        """Build `name`; unknown options and values their defaults rule out are refused naming them."""
        self.check_options(name, cfg)
        for option, why in self.bad_values(name, cfg):
            raise CaptionflowError(f"{self.kind} {name} option {option}: {why}")
        return self.classes[name](**cfg)

    def _known(self, name):
        if name not in self.classes:
            raise CaptionflowError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self.classes))}")


CAPTIONERS = Registry("model")
MODELS = CAPTIONERS.classes
register_model = CAPTIONERS.register
create_model = CAPTIONERS.create
