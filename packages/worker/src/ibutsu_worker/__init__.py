"""The worker role: executes every Ibutsu task."""
