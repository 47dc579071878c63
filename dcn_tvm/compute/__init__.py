"""Pure TE definitions of the operators: no torch, no schedules (compiler side only)."""
