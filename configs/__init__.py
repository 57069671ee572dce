"""The run presets (``<name>.toml``), read by :func:`entities.config.load_config` as ``--config <name>``.

A package only so the presets ship as package data: ``pip install .`` (not only ``-e``) installs them
beside the code and :mod:`importlib.resources` finds them in a checkout and an installed copy alike.
"""
