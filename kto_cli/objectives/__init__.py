"""Every loss kto-train knows, one module each; importing the package registers them all (any
module added here is found and imported, so a new loss is one file)."""
import importlib
import pkgutil

from .base import (REGISTRY, LossInputs, Needs, Objective, Paired, check_data, choices, create, objective_class,
                   register, single_process, units)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "LossInputs", "Needs", "Objective", "Paired", "check_data", "choices", "create",
           "objective_class", "register", "single_process", "units"]
