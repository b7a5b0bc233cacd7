"""Pure folds from events to read models, and the code that keeps their tables in step.
Imports `events` only."""
