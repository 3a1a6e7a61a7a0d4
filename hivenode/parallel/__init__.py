"""parallel part of hivenode (see DESIGN.md)."""
