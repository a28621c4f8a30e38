"""What the Kowalski agent and controller share: config, wire messages, errors."""
