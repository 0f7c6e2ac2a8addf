"""The methods, one module each: its loss, its terms, its builder, its reference and formula, its parameters.

:mod:`.spec` (plain data) and :mod:`.catalogue` (the specs read without torch) are what the config and the CLI
see; :mod:`.registry` holds :data:`~.registry.METHODS` and :func:`~.registry.register_method`. A method module
imports the core (terms, signals, the objective) and nothing of another method, except the feature family's
shared helpers in :mod:`.features`. See ``CONTRIBUTING.md``: "add a method in one file".
"""
