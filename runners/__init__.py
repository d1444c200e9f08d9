"""Runner support: the runner profiles (``profiles``), the DirectRunner's
adjustments, and the local servers a run starts (Redis, the SDK worker pool)."""
