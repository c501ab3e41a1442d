"""Plumbing every VoiceJury service shares: settings, bus, object store, stage runtime, logs."""
