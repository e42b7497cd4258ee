"""HTTP to upstream peers: streaming multipart, authentication."""
