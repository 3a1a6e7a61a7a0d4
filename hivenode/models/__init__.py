"""models part of hivenode (see DESIGN.md)."""
