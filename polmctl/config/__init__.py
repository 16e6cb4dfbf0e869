"""Typed config schemas: one dataclass per config group (a help string per field) and the
helpers every ``method`` schema uses. Validation against the method registry is polmctl/validate.py."""
