"""The Query/Retrieve services (PS3.4 Annex C): C-FIND, C-MOVE and C-GET, answered from
the sources the rules name (``bridge.sources``). They sit above ``bridge.dimse`` (the
listener, the bridge's own associations, the pynetdicom seam), whose listener serves
them as it serves C-ECHO and C-STORE."""
