"""protocol part of hivenode (see DESIGN.md)."""
