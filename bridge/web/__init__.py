"""HTTP to upstream peers: the client (``client``), streaming multipart, authentication."""
