"""Per-bundle DoFn inspection on the Python DirectRunner, done once per class.

Beam's streaming DirectRunner unpickles a fresh copy of every DoFn for every
bundle, and each copy is inspected again: ``userstate.get_dofn_specs`` walks
every method of the DoFn through ``inspect.signature`` to find its state and
timer parameters, three to five times per bundle and ParDo (the evaluator,
``DoFnSignature``, ``validate_stateful_dofn``). In a profile of the streaming
job at 108 tweets/s that inspection was 38% of the runner's only worker
thread, more than the model.

The answer depends only on the DoFn's class when the instance adds no
methods of its own: then it is computed once per class.
DoFns whose methods depend on the instance (``beam.Map``'s wrapper, which
inspects the wrapped callable, or ``with_exception_handling``'s, which binds
``process`` per instance) are inspected every time, as before.
"""

from __future__ import annotations

import logging
import threading
import types

_LOG = logging.getLogger(__name__)
_installed = False


_ELIGIBLE: dict[type, bool] = {}


def _class_decides(cls) -> bool:
    """Whether the class alone fixes the answer (no per-instance hooks)."""
    eligible = _ELIGIBLE.get(cls)
    if eligible is None:
        eligible = _ELIGIBLE[cls] = (
            cls.__getattribute__ is object.__getattribute__
            and not hasattr(cls, "__getattr__")
            # Beam's per-instance signature hooks (beam.Map's wrapper has one).
            and not any(name.startswith("_inspect_") for name in dir(cls)))
    return eligible


def _class_key(dofn):
    """A key that fixes ``get_dofn_specs(dofn)``, or None when the instance
    could change the answer."""
    cls = type(dofn)
    if not _class_decides(cls):
        return None
    # Methods bound on the instance are inspected too.
    if any(isinstance(v, types.MethodType) for v in vars(dofn).values()):
        return None
    return cls


def install() -> bool:
    """Memoizes ``get_dofn_specs`` for class-determined DoFns in this
    process. Idempotent; returns False (and logs) when this Beam no longer
    has the function it wraps."""
    global _installed
    if _installed:
        return True
    try:
        from apache_beam.runners.direct import transform_evaluator
        from apache_beam.transforms import userstate

        original = userstate.get_dofn_specs
    except (ImportError, AttributeError) as err:
        _LOG.warning("DirectRunner DoFn inspection left as is: %s", err)
        return False
    cache: dict = {}
    lock = threading.Lock()

    def get_dofn_specs(dofn):
        key = _class_key(dofn)
        if key is None:
            return original(dofn)
        with lock:
            found = cache.get(key)
        if found is None:
            found = original(dofn)  # raises for an invalid DoFn, every time
            with lock:
                cache[key] = found
        state_specs, timer_specs = found
        return set(state_specs), set(timer_specs)  # callers get their own sets

    get_dofn_specs.__wrapped__ = original
    # userstate's own helpers (is_stateful_dofn, validate_stateful_dofn) and
    # the runners call it through the module; the evaluator imported it by name.
    userstate.get_dofn_specs = get_dofn_specs
    if getattr(transform_evaluator, "get_dofn_specs", None) is original:
        transform_evaluator.get_dofn_specs = get_dofn_specs
    _installed = True
    return True
