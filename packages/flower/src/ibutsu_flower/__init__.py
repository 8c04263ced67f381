"""The Flower role: broker-only monitoring, no database."""
