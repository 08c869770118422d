"""Network definitions (pure torch). One module per paper; ids in :data:`NoduleMTLLib.NETWORK_IDS`."""
