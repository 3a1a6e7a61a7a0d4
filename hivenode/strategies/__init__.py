"""strategies part of hivenode (see DESIGN.md)."""
