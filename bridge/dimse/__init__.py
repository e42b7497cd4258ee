"""DIMSE: the listener and its services, the bridge's own associations (SCU), statuses,
transcoding, and the one seam where pynetdicom's behaviour is changed."""
