"""agent part of hivenode (see DESIGN.md)."""
