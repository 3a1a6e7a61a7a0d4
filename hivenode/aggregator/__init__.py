"""aggregator part of hivenode (see DESIGN.md)."""
