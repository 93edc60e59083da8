"""Argument checks and initializer copies shared by the layers and models."""

import keras


def check_int(name, value, low):
    """Raises a ValueError naming `name` unless `value` is a Python int >= low.

    Args:
        name: the argument's name, for the message.
        value: the value passed.
        low: the smallest value allowed.

    Returns:
        `value`.

    Example:

    >>> check_int("num_slots", 16, 0)
    16
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}`: expected a Python int >= {low}, got "
                         f"{value!r}.")
    return value


def copy_initializer(initializer):
    """A fresh initializer with the same config, one per weight.

    Not through `keras.initializers.serialize()`: that imports TensorFlow
    whenever it is installed.

    Args:
        initializer: a `keras.initializers.Initializer`.

    Returns:
        A new initializer of the same class and config.

    Example:

    >>> copy_initializer(keras.initializers.RandomNormal(stddev=0.02)).stddev
    0.02
    """
    return initializer.__class__.from_config(initializer.get_config())


def default_initializer(initializer=None):
    """`initializer` resolved by `keras.initializers.get`, or normal(0, 0.02).

    Args:
        initializer: None, a name, a config or an initializer.

    Returns:
        A `keras.initializers.Initializer`.
    """
    return keras.initializers.get(
        initializer or keras.initializers.RandomNormal(stddev=0.02))
