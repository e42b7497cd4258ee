"""Rules: which destinations or sources an operation goes to, and what a rule changes in a copy."""
