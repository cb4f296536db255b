"""One registry pattern for every seat (source, grounder, composer, editor, judge).

A backend registers a factory under a name; a build names it in `BuildConfig` with an options
dict. The registry checks the name and the options against the factory's signature before
anything is built, so a bad argument is one clear line ("editor 'photo' has no option 'steps'")
and nothing heavy is imported for a backend nobody asked for: the modules that register backends
are imported on first use.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, seat: str, modules: tuple[str, ...]):
        self.seat = seat
        self.modules = modules  # imported lazily; each registers its backends on import
        self._factories: dict[str, Callable[..., T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            self._factories[name] = factory
            return factory

        return wrap

    def _load(self) -> None:
        if self._loaded:
            return
        for module in self.modules:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:  # a backend's own dependency is missing: say so
                    raise
        self._loaded = True

    def names(self) -> list[str]:
        self._load()
        return sorted(self._factories)

    def factory(self, name: str) -> Callable[..., T]:
        self._load()
        if name not in self._factories:
            raise ValueError(f"unknown {self.seat} {name!r}; known: {', '.join(self.names())}")
        return self._factories[name]

    def check_options(self, name: str, options: dict[str, Any],
                      provided: tuple[str, ...] = ()) -> None:
        """ValueError naming the first option the backend does not take, or the first it needs
        and was not given (`provided`: what the build passes itself)."""
        parameters = inspect.signature(self.factory(name)).parameters
        Kind = inspect.Parameter
        for key, p in parameters.items():
            required = p.default is Kind.empty and p.kind in (Kind.KEYWORD_ONLY, Kind.POSITIONAL_OR_KEYWORD)
            if required and key not in options and key not in provided:
                raise ValueError(f"{self.seat} {name!r} needs option {key!r}")
        if any(p.kind is Kind.VAR_KEYWORD for p in parameters.values()):
            return
        known = [p for p, v in parameters.items() if v.kind is not Kind.VAR_POSITIONAL]
        for key in options:
            if key not in known:
                raise ValueError(f"{self.seat} {name!r} has no option {key!r}; "
                                 f"its options: {', '.join(known) or 'none'}")

    def make(self, name: str, context: dict[str, Any] | None = None, **options: Any) -> T:
        """Build backend `name` with the user's `options`, plus whatever of the build's
        `context` (resolution, seed, ...) its factory takes by name."""
        context = context or {}
        for key in options:
            if key in context:
                raise ValueError(f"{self.seat} option {key!r} is set by the build, not per backend")
        self.check_options(name, options, provided=tuple(context))
        factory = self.factory(name)
        parameters = inspect.signature(factory).parameters
        given = {k: v for k, v in context.items() if k in parameters}
        return factory(**given, **options)
