"""The scheduler role: runs beat, sends periodic tasks to the workers, executes nothing."""
