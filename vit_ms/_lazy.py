"""Package namespaces whose names load on first use, so `--help` and light commands skip MindSpore."""
import importlib
import sys


def lazy_exports(package: str, exports: dict, extra=()):
    """`(__getattr__, __dir__, __all__)` for a package exporting `exports` ({module: [names]}).

    A name is imported from its module on first access and stored in the package, so later look-ups are
    plain attribute reads.

    Args:
        package: the package's `__name__`.
        exports: submodule name -> the public names it provides.
        extra: names defined in the package itself, listed in `__all__` too.
    """
    module_of = {name: module for module, names in exports.items() for name in names}
    public = list(module_of) + list(extra)

    def __getattr__(name):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module_of[name]}", package), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__, public
