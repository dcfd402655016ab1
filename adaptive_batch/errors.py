"""What the library raises and warns, and how renamed arguments keep working.

Every error the library raises on purpose is an :class:`AdaptiveBatchError`, so one ``except``
catches ours. It subclasses ``ValueError`` (what the library raised before it had its own type);
where a ``TypeError`` or ``KeyError`` is the conventional signal (an unknown ``len()``, a missing
batch field), the error subclasses that too.

Example:
    >>> from adaptive_batch import AdaptiveBatchSampler, AdaptiveBatchError
    >>> try:
    ...     AdaptiveBatchSampler(10, min_batch_size=0)
    ... except AdaptiveBatchError as error:
    ...     print(type(error).__name__, isinstance(error, ValueError))
    AdaptiveBatchError True
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "AdaptiveBatchError",
    "AdaptiveBatchKeyError",
    "AdaptiveBatchTypeError",
    "AdaptiveBatchWarning",
    "renamed_arguments",
]


class AdaptiveBatchError(ValueError):
    """A bad argument, a misuse, or a state that cannot be honoured; the message names the fix."""


class AdaptiveBatchTypeError(AdaptiveBatchError, TypeError):
    """An :class:`AdaptiveBatchError` where Python conventionally raises ``TypeError``."""


class AdaptiveBatchKeyError(AdaptiveBatchError, KeyError):
    """An :class:`AdaptiveBatchError` where Python conventionally raises ``KeyError``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdaptiveBatchWarning(UserWarning):
    """Something works, but not as you probably meant it to (the message says what to change)."""


F = TypeVar("F", bound=Callable[..., Any])


def renamed_arguments(**old_to_new: str) -> Callable[[F], F]:
    """Keep old keyword names working, with a ``DeprecationWarning`` naming the new one.

    Example:
        >>> import warnings
        >>> @renamed_arguments(decay="ema_decay")
        ... def smooth(*, ema_decay=0.9):
        ...     return ema_decay
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     smooth(decay=0.5), caught[0].category.__name__
        (0.5, 'DeprecationWarning')
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise AdaptiveBatchTypeError(
                            f"{function.__qualname__}() got both {old}= (renamed) and {new}="
                        )
                    warnings.warn(
                        f"{function.__qualname__}: the argument {old}= is now called {new}=",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
