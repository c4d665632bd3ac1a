"""Training and quick evaluation of the bundled reasoning model (`kvpilot train-model`)."""
