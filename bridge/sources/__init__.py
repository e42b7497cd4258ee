"""Sources: where queries and retrievals are answered from (the ``Source`` protocol is in ``bridge.model``)."""
