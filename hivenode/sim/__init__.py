"""sim part of hivenode (see DESIGN.md)."""
