"""The local archive: its index (the ``archive`` destination writes it, the ``local`` source reads it)."""
