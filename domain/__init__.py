"""The domain: aggregates, events, commands and the state machine. No I/O."""
