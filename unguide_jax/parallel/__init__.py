"""Devices and hosts: the mesh and partition rules (``mesh``), multi-host start-up and coordination
(``hosts``), batches placed over the mesh's data axis (``batches``)."""
