"""planner part of hivenode (see DESIGN.md)."""
