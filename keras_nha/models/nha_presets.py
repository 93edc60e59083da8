"""Presets bundled with keras_nha, and their short names in keras-hub.

A bundled preset is a keras-hub preset directory inside this package, so it
loads without any download: `NHACausalLM.from_preset("nha_tiny_python_bytes")`
or, by path, `from_preset(preset_path("nha_tiny_python_bytes"))`.
"""

import contextlib
import json
import os
import warnings

PRESET_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "presets")

backbone_presets = {
    "nha_tiny_python_bytes": {
        "metadata": {
            "description": (
                "Tiny byte-level NHA causal LM (2 layers, width 128, window "
                "64, 16 slots) trained for a few CPU minutes on Python "
                "standard-library source by examples/train_causal_lm.py. A "
                "demo and test fixture, not a useful language model."),
            "params": 337152,
            "path": "nha",
        },
        "kaggle_handle": os.path.join(PRESET_ROOT, "nha_tiny_python_bytes"),
    },
}


def preset_path(name):
    """The local directory of a bundled preset.

    Args:
        name: a key of `backbone_presets`.

    Returns:
        An absolute path usable with any `from_preset`.
    """
    if name not in backbone_presets:
        raise ValueError(f"`name`: expected one of {sorted(backbone_presets)}, "
                         f"got {name!r}.")
    return backbone_presets[name]["kaggle_handle"]


def register_bundled_presets(backbone_cls):
    """Registers the short names of the bundled presets that are present.

    keras-hub's registry is private (`keras_hub.src.utils.preset_utils`); if
    it moves or changes, short names are skipped with a warning and paths
    keep working.

    Args:
        backbone_cls: the backbone class the presets belong to.

    Returns:
        The names registered.
    """
    present = {name: preset for name, preset in backbone_presets.items()
               if os.path.isfile(os.path.join(preset["kaggle_handle"],
                                              "config.json"))}
    if not present:
        return []
    try:
        from keras_hub.src.utils.preset_utils import register_presets

        register_presets(present, backbone_cls)
    except Exception as error:  # A private API: never break the import.
        warnings.warn(f"keras_nha: bundled preset names not registered with "
                      f"keras-hub ({error!r}); load them by path with "
                      f"keras_nha.models.nha_presets.preset_path().")
        return []
    return sorted(present)


def _is_local_preset(preset, cls):
    """A preset folder on this machine, by path or by a bundled name."""
    if isinstance(preset, str) and os.path.isdir(preset):
        return True
    return preset in getattr(cls, "presets", {})


@contextlib.contextmanager
def explain_preset_errors(preset):
    """Re-raises a failed preset load as one ValueError that names the preset.

    Keras' own messages (a truncated HDF5 file, "N objects could not be
    loaded", a JSON syntax error) stay attached as the cause.
    """
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError,
            json.JSONDecodeError) as error:
        raise ValueError(
            f"Could not load the preset {preset!r}: {type(error).__name__}: "
            f"{error}. The preset may be incomplete or corrupt (re-save or "
            "re-download it), or its config.json may not match its weights "
            "(e.g. an edited num_layers or hidden_dim).") from error


def explained_preset_loading(cls):
    """Class decorator: `from_preset` failures become a ValueError naming the preset.

    A decorator rather than a mixin base: keras-hub names a preset's tasks
    after each task class's first base (`metadata.json`), which must stay
    the keras-hub class (`CausalLM`).

    Args:
        cls: a keras-hub `Backbone` or `Task` subclass.

    Returns:
        `cls`, with a `from_preset` that explains failed loads.

    Example:

    >>> NHACausalLM.from_preset("nha_tiny_python_bytes")
    """

    @classmethod
    def from_preset(klass, preset, load_weights=True, **kwargs):
        """Loads a keras-hub preset (directory, handle or bundled name).

        Args:
            preset: a preset path, a keras-hub handle, or a bundled short
                name such as "nha_tiny_python_bytes".
            load_weights: load the saved weights (else random init).
            **kwargs: forwarded to keras-hub (e.g. `dtype`).

        Returns:
            The loaded model. A corrupt or mismatched preset raises a
            ValueError naming the preset.
        """
        load = super(cls, klass).from_preset
        if not _is_local_preset(preset, klass):
            # An unknown name or a remote handle: keras-hub's own message
            # says what is wrong better than "corrupt" would.
            return load(preset, load_weights=load_weights, **kwargs)
        with explain_preset_errors(preset):
            return load(preset, load_weights=load_weights, **kwargs)

    cls.from_preset = from_preset
    return cls
