"""Network definitions (pure torch). One module per paper; ids in :mod:`NoduleMTLLib.registry`."""
