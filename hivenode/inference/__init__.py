"""inference part of hivenode (see DESIGN.md)."""
