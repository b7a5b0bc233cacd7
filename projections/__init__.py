"""Pure folds from events to read models (tasks.py, approvals.py, ...), the read models'
interface (readmodels.py) and its backends (sqlite.py). Imports `events` only."""
